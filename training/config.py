"""The DINOv2 training recipe as typed config (the `pretrain` stage), named as in the official config.

    ssl_default_config values (the defaults here) <- preset (configs/demo.yaml, vitl14.yaml, vitg14.yaml)
      <- --set pretrain.optim.base_lr=... -> PretrainConfig (validated once, in build_config)

Defaults are the official `ssl_default_config.yaml` values (training/README.md lists where lvd departs
from them); the paper recipes live in presets. Iteration counts are "epochs" of `official_epoch_length`
iterations, as in the official code (one epoch is 1250 iterations whatever the dataset size).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pipelines.validation import require
from training.models.layers import FfnLayer
from training.models.vit import check_arch

Centering = Literal["centering", "sinkhorn_knopp"]
TrainPrecision = Literal["fp32", "bf16", "fp16"]
BlurMode = Literal["official", "paper"]
TrainDevice = Literal["auto", "cpu", "cuda"]

OFFICIAL_EPOCH_LENGTH = 1250


@dataclass(frozen=True, kw_only=True, slots=True)
class StudentConfig:
    """The backbone (`training.models.vit.build_vit` options)."""

    arch: str = "vit_large"
    """One of `training.models.vit.ARCHS`."""
    patch_size: int = 16
    ffn_layer: FfnLayer = "mlp"
    drop_path_rate: float = 0.3
    drop_path_uniform: bool = True
    """Every block gets drop_path_rate (True), or the rate ramps linearly from 0 over depth."""
    layerscale: float = 1e-5
    num_register_tokens: int = 0
    interpolate_antialias: bool = False
    interpolate_offset: float = 0.1

    def __post_init__(self) -> None:
        check_arch(self.arch)
        require(self.patch_size >= 1, f"patch_size must be >= 1, got {self.patch_size}")
        require(0 <= self.drop_path_rate < 1, f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        require(self.num_register_tokens >= 0, "num_register_tokens must be >= 0")


@dataclass(frozen=True, kw_only=True, slots=True)
class DinoConfig:
    """The DINO (image-level) objective and its head."""

    loss_weight: float = 1.0
    head_n_prototypes: int = 65536
    head_bottleneck_dim: int = 256
    head_hidden_dim: int = 2048
    head_nlayers: int = 3
    koleo_loss_weight: float = 0.1

    def __post_init__(self) -> None:
        require(self.head_n_prototypes >= 1, "head_n_prototypes must be >= 1")
        require(self.head_nlayers >= 1, f"head_nlayers must be >= 1, got {self.head_nlayers}")


@dataclass(frozen=True, kw_only=True, slots=True)
class IbotConfig:
    """The iBOT (masked patch) objective; its head is the DINO head unless `separate_head`."""

    loss_weight: float = 1.0
    separate_head: bool = False
    head_n_prototypes: int = 65536
    head_bottleneck_dim: int = 256
    head_hidden_dim: int = 2048
    head_nlayers: int = 3
    mask_sample_probability: float = 0.5
    mask_ratio_min_max: tuple[float, ...] = (0.1, 0.5)

    def __post_init__(self) -> None:
        require(0 <= self.mask_sample_probability <= 1, "mask_sample_probability must be in [0, 1]")
        low_high = self.mask_ratio_min_max
        require(
            len(low_high) == 2 and 0 <= low_high[0] <= low_high[1] <= 1,
            f"mask_ratio_min_max must be two ratios low <= high in [0, 1], got {low_high}",
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class TeacherConfig:
    momentum_teacher: float = 0.992
    final_momentum_teacher: float = 1.0
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.07
    warmup_teacher_temp_epochs: float = 30

    def __post_init__(self) -> None:
        require(0 <= self.momentum_teacher <= 1, "momentum_teacher must be in [0, 1]")
        require(self.teacher_temp > 0 and self.warmup_teacher_temp > 0, "teacher temperatures must be > 0")


@dataclass(frozen=True, kw_only=True, slots=True)
class OptimConfig:
    epochs: float = 100
    warmup_epochs: float = 10
    base_lr: float = 0.004
    """For a global batch of 1024 images; the peak lr is base_lr * sqrt(global_batch / 1024)."""
    min_lr: float = 1e-6
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    clip_grad: float = 3.0
    """Per student submodule (backbone, dino_head, ibot_head); 0 disables clipping."""
    freeze_last_layer_epochs: float = 1
    patch_embed_lr_mult: float = 0.2
    layerwise_decay: float = 0.9
    adamw_beta1: float = 0.9
    adamw_beta2: float = 0.999

    def __post_init__(self) -> None:
        require(self.epochs > 0, f"epochs must be > 0, got {self.epochs}")
        require(0 <= self.warmup_epochs <= self.epochs, "warmup_epochs must be in [0, epochs]")
        require(self.base_lr > 0, f"base_lr must be > 0, got {self.base_lr}")
        require(0 < self.layerwise_decay <= 1, "layerwise_decay must be in (0, 1]")


@dataclass(frozen=True, kw_only=True, slots=True)
class CropsConfig:
    global_crops_scale: tuple[float, ...] = (0.32, 1.0)
    global_crops_size: int = 224
    local_crops_scale: tuple[float, ...] = (0.05, 0.32)
    local_crops_size: int = 96
    local_crops_number: int = 8
    blur: BlurMode = "official"
    """official: the released code's inverted blur probabilities (global 1 never, global 2 0.9, locals
    0.5), which the released checkpoints were trained with; paper: the intended 1.0 / 0.1 / 0.5."""

    def __post_init__(self) -> None:
        for name in ("global_crops_scale", "local_crops_scale"):
            low_high = getattr(self, name)
            require(
                len(low_high) == 2 and 0 < low_high[0] <= low_high[1] <= 1,
                f"{name} must be two scales 0 < low <= high <= 1, got {low_high}",
            )
        require(self.local_crops_number >= 0, "local_crops_number must be >= 0")


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainConfig:
    batch_size_per_gpu: int = 64
    """Images per process per step (each gives 2 global + local_crops_number local crops)."""
    centering: Centering = "centering"
    official_epoch_length: int = OFFICIAL_EPOCH_LENGTH
    num_workers: int = 10
    """DataLoader worker processes per training process."""
    nproc_per_node: int = 1
    """Training processes the stage starts on this machine (torchrun; one per GPU). Multi-node runs call
    `torchrun ... -m training.launch` on every node instead."""
    seed: int = 0
    precision: TrainPrecision = "bf16"
    """Compute dtype of forward/backward; master weights, optimizer, EMA and loss islands stay fp32.
    fp16 adds dynamic loss scaling. CPU runs fp32 whatever this says (CPU half precision is slow)."""
    device: TrainDevice = "auto"
    checkpoint_period: int = 3750
    """Iterations between resumable checkpoints (the official 3 epochs)."""
    keep_checkpoints: int = 3
    init_from: str = ""
    """A checkpoint folder or hub-format backbone to start from (the high-resolution phase), or empty."""
    max_steps: int = 0
    """Stop after this many iterations (0: epochs * official_epoch_length). Schedules keep their length."""

    def __post_init__(self) -> None:
        require(self.batch_size_per_gpu >= 1, "batch_size_per_gpu must be >= 1")
        require(self.official_epoch_length >= 1, "official_epoch_length must be >= 1")
        require(self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}")
        require(self.nproc_per_node >= 1, f"nproc_per_node must be >= 1, got {self.nproc_per_node}")
        require(self.checkpoint_period >= 1, "checkpoint_period must be >= 1")
        require(self.keep_checkpoints >= 1, "keep_checkpoints must be >= 1")
        require(self.max_steps >= 0, f"max_steps must be >= 0, got {self.max_steps}")


@dataclass(frozen=True, kw_only=True, slots=True)
class PretrainConfig:
    """DINOv2 self-supervised pretraining on the curated manifest (the `pretrain` stage)."""

    student: StudentConfig = field(default_factory=StudentConfig)
    dino: DinoConfig = field(default_factory=DinoConfig)
    ibot: IbotConfig = field(default_factory=IbotConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    crops: CropsConfig = field(default_factory=CropsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        patch = self.student.patch_size
        for name in ("global_crops_size", "local_crops_size"):
            size = getattr(self.crops, name)
            require(size % patch == 0, f"crops.{name} {size} is not a multiple of patch_size {patch}")
        if not self.ibot.separate_head:
            require(
                self.ibot.head_n_prototypes == self.dino.head_n_prototypes,
                "a shared iBOT head needs ibot.head_n_prototypes == dino.head_n_prototypes",
            )

    @property
    def total_steps(self) -> int:
        return round(self.optim.epochs * self.train.official_epoch_length)

    @property
    def steps_to_run(self) -> int:
        return min(self.train.max_steps or self.total_steps, self.total_steps)
