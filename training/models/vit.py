"""The DINOv2 Vision Transformer backbone, with state-dict keys and outputs of the official hub models.

    image (B, 3, H, W) -> patch_embed -> [mask_token where masked] -> [CLS] + patches + pos_embed
      -> [CLS, registers, patches] -> blocks (pre-norm, LayerScale) -> norm -> forward_features dict

A list of crop groups (the student's global and local crops) gets its tokens prepared per group, runs
the blocks packed (`Block.forward_list`) and is normed per group: one output dict per group.

Official DINOv2 hub weights load with `strict=True` into `build_vit(arch, img_size=518,
layerscale_init=1.0)` (plus `num_register_tokens=4, interpolate_offset=0.0, interpolate_antialias=True`
for the `_reg4` models). Shapes: B batch, N tokens, D width, P patches, R registers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from training.models.attention import Attention, GroupShapes, pack_groups, unpack_groups
from training.models.layers import FfnLayer, LayerScale, check_ffn_layer, make_ffn

LAYER_NORM_EPS = 1e-6
INIT_STD = 0.02  # truncated-normal std of pos_embed and every Linear
TOKEN_INIT_STD = 1e-6  # cls and register tokens


@dataclass(frozen=True, slots=True)
class ArchSpec:
    embed_dim: int
    depth: int
    num_heads: int
    ffn_layer: FfnLayer = "mlp"


ARCHS: dict[str, ArchSpec] = {
    "vit_test": ArchSpec(embed_dim=64, depth=2, num_heads=2),  # tiny: for tests (and the demo's student)
    "vit_demo": ArchSpec(embed_dim=128, depth=4, num_heads=4),  # trains on 2 CPU cores in minutes
    "vit_small": ArchSpec(embed_dim=384, depth=12, num_heads=6),
    "vit_base": ArchSpec(embed_dim=768, depth=12, num_heads=12),
    "vit_large": ArchSpec(embed_dim=1024, depth=24, num_heads=16),
    "vit_huge": ArchSpec(embed_dim=1280, depth=32, num_heads=16),  # the paper's retrieval model family
    "vit_giant2": ArchSpec(embed_dim=1536, depth=40, num_heads=24, ffn_layer="swiglufused"),
}


def check_arch(arch: str) -> None:
    """Raises ValueError unless `arch` is a registered backbone: what configs naming one call."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; known: {', '.join(ARCHS)}")


def kept_sample_count(batch: int, drop_rate: float) -> int:
    """Samples that run a residual branch under efficient stochastic depth: max(floor(b * (1 - d)), 1)."""
    return max(int(batch * (1 - drop_rate)), 1)


def draw_kept_samples(batch: int, drop_rate: float, device: torch.device) -> torch.Tensor:
    """The indices of a uniformly random subset of `kept_sample_count(batch, drop_rate)` samples."""
    return torch.randperm(batch, device=device)[: kept_sample_count(batch, drop_rate)]


def block_drop_path_rates(drop_path_rate: float, depth: int, uniform: bool) -> list[float]:
    """The rate d of every block: the same d everywhere, or a linear ramp from 0 to d over depth."""
    if uniform:
        return [drop_path_rate] * depth
    # Why torch.linspace: the official ramp is built with it, and its float values are reproduced exactly.
    # On the CPU whatever the default device, so that models built on "meta" still get their rates.
    return torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()


class Block(nn.Module):
    """x = x + ls1(attn(norm1(x))); x = x + ls2(mlp(norm2(x))), with efficient stochastic depth in training.

    Stochastic depth (training and `drop_path_rate` d > 0), per branch and per crop group of b samples:
    a random subset of s = `kept_sample_count(b, d)` samples runs the branch, and its result, LayerScale
    included, is added back scaled by b / s; the other samples pass unchanged.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        ffn_layer: FfnLayer,
        layerscale_init: float | None,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        self.drop_path_rate = drop_path_rate
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim, layerscale_init) if layerscale_init else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = make_ffn(ffn_layer, dim)
        self.ls2 = LayerScale(dim, layerscale_init) if layerscale_init else nn.Identity()

    def attention_branch(self, x_TD: torch.Tensor, shapes: GroupShapes) -> torch.Tensor:
        return self.attn.forward_packed(self.norm1(x_TD), shapes)

    def ffn_branch(self, x_TD: torch.Tensor, shapes: GroupShapes) -> torch.Tensor:
        return self.mlp(self.norm2(x_TD))

    def drops_samples(self) -> bool:
        return self.training and self.drop_path_rate > 0

    def forward(self, x: torch.Tensor | list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        """A (B, N, D) tensor, or a list of crop groups (`forward_list`).

        Lists go through `forward` too, so that module hooks (FSDP2's parameter all-gather) see every call.
        """
        if isinstance(x, list):
            return self.forward_list(x)
        if self.drops_samples():
            return self.forward_list([x])[0]
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))

    def forward_list(self, groups: list[torch.Tensor]) -> list[torch.Tensor]:
        """Crop groups [(b_i, n_i, D)] -> the same shapes; token-wise layers run once on all groups packed."""
        if self.drops_samples():
            groups = self._add_subset_residual(groups, self.attention_branch, self.ls1)
            return self._add_subset_residual(groups, self.ffn_branch, self.ls2)
        x_TD, shapes = pack_groups(groups)
        x_TD = x_TD + self.ls1(self.attention_branch(x_TD, shapes))
        x_TD = x_TD + self.ls2(self.ffn_branch(x_TD, shapes))
        return unpack_groups(x_TD, shapes)

    def _add_subset_residual(
        self,
        groups: list[torch.Tensor],
        branch: Callable[[torch.Tensor, GroupShapes], torch.Tensor],
        layer_scale: nn.Module,
    ) -> list[torch.Tensor]:
        kept = [draw_kept_samples(group.shape[0], self.drop_path_rate, group.device) for group in groups]
        subset_TD, subset_shapes = pack_groups(
            [group[index] for group, index in zip(groups, kept, strict=True)]
        )
        residuals = unpack_groups(layer_scale(branch(subset_TD, subset_shapes)), subset_shapes)
        # Why b / s and not 1 / (1 - d): a sample is kept with probability s / b, so its expected residual
        # is exactly the full one.
        return [
            torch.index_add(group, 0, index, residual, alpha=group.shape[0] / index.numel())
            for group, index, residual in zip(groups, kept, residuals, strict=True)
        ]


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        height, width = images_BCHW.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"image {height}x{width} is not a multiple of the patch size {self.patch_size}")
        return self.proj(images_BCHW).flatten(2).transpose(1, 2)  # (B, P, D), patches in row-major order


class DinoVisionTransformer(nn.Module):
    def __init__(
        self,
        arch: ArchSpec,
        *,
        patch_size: int,
        img_size: int,
        num_register_tokens: int,
        ffn_layer: FfnLayer,
        layerscale_init: float | None,
        interpolate_offset: float,
        interpolate_antialias: bool,
        drop_path_rates: Sequence[float],
    ):
        super().__init__()
        dim = arch.embed_dim
        self.embed_dim = dim
        self.patch_size = patch_size
        self.num_register_tokens = num_register_tokens
        self.interpolate_offset = interpolate_offset
        self.interpolate_antialias = interpolate_antialias
        self.grid_size = img_size // patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid_size**2, dim))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, num_register_tokens, dim)) if num_register_tokens else None
        )
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
        self.patch_embed = PatchEmbed(patch_size, dim)
        self.blocks = nn.ModuleList(
            Block(dim, arch.num_heads, ffn_layer, layerscale_init, rate) for rate in drop_path_rates
        )
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.head = nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=INIT_STD)
        nn.init.normal_(self.cls_token, std=TOKEN_INIT_STD)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=TOKEN_INIT_STD)
        # mask_token stays zero; the patch Conv2d keeps PyTorch's default init, as in the official code.
        for module in self.blocks.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=INIT_STD)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def interpolate_pos_encoding(self, height: int, width: int, dtype: torch.dtype) -> torch.Tensor:
        """The position table for a `height` x `width` image (bicubic resize of the patch part)."""
        rows, columns = height // self.patch_size, width // self.patch_size
        if rows == columns == self.grid_size:
            return self.pos_embed.to(dtype)
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        grid = patch_pos.float().reshape(1, self.grid_size, self.grid_size, -1).permute(0, 3, 1, 2)
        if self.interpolate_offset:
            # Why: the official code passes a scale factor, not a size; PyTorch then floors the output
            # size but maps coordinates with the given scale, so the values differ from a size-based resize.
            scale = (
                (rows + self.interpolate_offset) / self.grid_size,
                (columns + self.interpolate_offset) / self.grid_size,
            )
            grid = F.interpolate(
                grid, scale_factor=scale, mode="bicubic", antialias=self.interpolate_antialias
            )
        else:
            grid = F.interpolate(
                grid, size=(rows, columns), mode="bicubic", antialias=self.interpolate_antialias
            )
        assert grid.shape[-2:] == (rows, columns), (
            f"position grid {tuple(grid.shape[-2:])} != {(rows, columns)}"
        )
        patch_pos = grid.permute(0, 2, 3, 1).reshape(1, rows * columns, -1)
        return torch.cat([cls_pos.float(), patch_pos], dim=1).to(dtype)

    def prepare_tokens(self, images_BCHW: torch.Tensor, masks_BP: torch.Tensor | None = None) -> torch.Tensor:
        patches_BPD = self.patch_embed(images_BCHW)
        if masks_BP is not None:
            mask_token = self.mask_token.to(patches_BPD.dtype).unsqueeze(0)
            patches_BPD = torch.where(masks_BP.unsqueeze(-1), mask_token, patches_BPD)
        tokens = torch.cat(
            [self.cls_token.expand(patches_BPD.shape[0], -1, -1).to(patches_BPD.dtype), patches_BPD], 1
        )
        tokens = tokens + self.interpolate_pos_encoding(*images_BCHW.shape[-2:], dtype=tokens.dtype)
        if self.register_tokens is not None:
            registers = self.register_tokens.expand(tokens.shape[0], -1, -1).to(tokens.dtype)
            tokens = torch.cat([tokens[:, :1], registers, tokens[:, 1:]], dim=1)
        return tokens

    def forward_features(
        self,
        images: torch.Tensor | list[torch.Tensor],
        masks: torch.Tensor | list[torch.Tensor | None] | None = None,
    ) -> dict | list[dict]:
        """One output dict for an image tensor; one dict per group for a list of crop groups.

        With a list, `masks` is a list of the same length (entries may be None) or None for no masks.
        """
        if isinstance(images, list):
            return self.forward_features_list(images, masks)
        x_BND = self.prepare_tokens(images, masks)
        for block in self.blocks:
            x_BND = block(x_BND)
        return self._output_dict(x_BND, masks)

    def forward_features_list(
        self, groups: list[torch.Tensor], masks: list[torch.Tensor | None] | None = None
    ) -> list[dict]:
        group_masks = [None] * len(groups) if masks is None else masks
        if len(group_masks) != len(groups):
            raise ValueError(f"{len(groups)} crop groups but {len(group_masks)} masks")
        tokens = [self.prepare_tokens(images, mask) for images, mask in zip(groups, group_masks, strict=True)]
        for block in self.blocks:
            tokens = block(tokens)
        return [self._output_dict(x_BND, mask) for x_BND, mask in zip(tokens, group_masks, strict=True)]

    def _output_dict(self, x_BND: torch.Tensor, masks: torch.Tensor | None) -> dict:
        normed = self.norm(x_BND)
        first_patch = 1 + self.num_register_tokens
        return {
            "x_norm_clstoken": normed[:, 0],
            "x_norm_regtokens": normed[:, 1:first_patch],
            "x_norm_patchtokens": normed[:, first_patch:],
            "x_prenorm": x_BND,
            "masks": masks,
        }

    def get_intermediate_layers(
        self,
        images_BCHW: torch.Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ) -> tuple:
        """Patch tokens (CLS and registers dropped) after the last `n` blocks, or after the blocks indexed by
        `n`, in block order; each (B, P, D), or (B, D, rows, columns) with `reshape`. With
        `return_class_token`, each entry is a (patch_tokens, cls_token (B, D)) pair. `norm` applies the
        final LayerNorm to every output.
        """
        depth = len(self.blocks)
        wanted = set(range(depth - n, depth)) if isinstance(n, int) else set(n)
        if not wanted or min(wanted) < 0 or max(wanted) >= depth:
            raise ValueError(f"block indices {sorted(wanted)} are not within the {depth} blocks")
        x_BND = self.prepare_tokens(images_BCHW)
        outputs = []
        for index, block in enumerate(self.blocks[: max(wanted) + 1]):
            x_BND = block(x_BND)
            if index in wanted:
                outputs.append(self.norm(x_BND) if norm else x_BND)
        class_tokens = [out[:, 0] for out in outputs]
        patches = [out[:, 1 + self.num_register_tokens :] for out in outputs]
        if reshape:
            rows, columns = (side // self.patch_size for side in images_BCHW.shape[-2:])
            patches = [p.unflatten(1, (rows, columns)).permute(0, 3, 1, 2).contiguous() for p in patches]
        if return_class_token:
            return tuple(zip(patches, class_tokens, strict=True))
        return tuple(patches)

    def forward(
        self,
        images: torch.Tensor | list[torch.Tensor],
        masks: torch.Tensor | list[torch.Tensor | None] | None = None,
        is_training: bool = False,
    ) -> torch.Tensor | dict | list[dict]:
        """The normed CLS (B, D); with `is_training`, the `forward_features` output (dict or list of dicts).

        Training goes through `forward`, not `forward_features`, so that FSDP2's hooks on the root run.
        """
        features = self.forward_features(images, masks)
        if is_training:
            return features
        return self.head(features["x_norm_clstoken"])


def build_vit(
    arch: str,
    *,
    patch_size: int = 14,
    img_size: int = 224,
    num_register_tokens: int = 0,
    ffn_layer: FfnLayer | None = None,
    layerscale_init: float | None = 1e-5,
    interpolate_offset: float = 0.1,
    interpolate_antialias: bool = False,
    drop_path_rate: float = 0.0,
    drop_path_uniform: bool = True,
) -> DinoVisionTransformer:
    """A backbone by name (`ARCHS`); options are named as in the official config.

    `drop_path_rate` d is every block's stochastic-depth rate (`drop_path_uniform`) or the end of a linear
    ramp from 0 over depth; it acts in training mode only and adds no parameters.
    """
    check_arch(arch)
    check_ffn_layer(ffn_layer)
    if img_size % patch_size:
        raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
    if not 0 <= drop_path_rate < 1:
        raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
    spec = ARCHS[arch]
    ffn = ffn_layer or spec.ffn_layer
    return DinoVisionTransformer(
        spec,
        patch_size=patch_size,
        img_size=img_size,
        num_register_tokens=num_register_tokens,
        ffn_layer=ffn,
        layerscale_init=layerscale_init,
        interpolate_offset=interpolate_offset,
        interpolate_antialias=interpolate_antialias,
        drop_path_rates=block_drop_path_rates(drop_path_rate, spec.depth, drop_path_uniform),
    )


def build_vit_from_options(options: Mapping[str, Any]) -> DinoVisionTransformer:
    """`build_vit` from one mapping that names the arch too (an export's sidecar, `backbone_options`)."""
    build = dict(options)
    return build_vit(build.pop("arch"), **build)
