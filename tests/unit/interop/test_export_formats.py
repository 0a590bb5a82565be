"""`lvd export`: a backbone written as transformers, timm and ONNX files loads in each library and gives
lvd's own tokens; and the way back, transformers directories and timm checkpoints load into lvd."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime
import pyarrow.parquet as pq
import pytest
import timm
import torch
import transformers
from PIL import Image

from curation.embedders import EmbedderConfig, build_embedder
from distillation.config import DistillConfig
from distillation.teacher import is_checkpoint, load_hub_teacher
from flows.cli import EXPORT_FORMATS, main
from pipelines.config import build_config
from pipelines.store import local_file_sha256
from tests.training_helpers import tiny_distill_section
from training.exports import EXPORTS, export_row, save_backbone
from training.interop.export import FORMATS, MANIFEST_FILE, export_formats
from training.interop.load import read_backbone_state
from training.models.vit import build_vit_from_options

TOLERANCE = 1e-4  # the bound on fp32 tokens; measured: 0 (transformers, timm), about 2e-6 (ONNX)
IMAGE_SIZE = 28
PATCH = 7
BATCH = 3


def backbone_options(registers: int = 0, ffn_layer: str = "mlp") -> dict:
    # LayerScale 1 so that every block changes the tokens (at 1e-5 a wrong block would go unseen).
    return {
        "arch": "vit_test",
        "patch_size": PATCH,
        "img_size": IMAGE_SIZE,
        "num_register_tokens": registers,
        "ffn_layer": ffn_layer,
        "layerscale_init": 1.0,
    }


def saved_backbone(tmp_path: Path, options: dict, seed: int = 0) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(seed)
    backbone = build_vit_from_options(options).eval()
    save_backbone(backbone, options, tmp_path / "backbone.pth")
    return backbone, export_row("teacher", tmp_path / "backbone.pth")


def lvd_tokens(backbone: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        features = backbone.forward_features(images)
    return features["x_norm_clstoken"], features["x_norm_patchtokens"]


def images() -> torch.Tensor:
    return torch.randn(BATCH, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(7))


def assert_tokens_match(cls, patches, expected) -> None:
    torch.testing.assert_close(torch.as_tensor(cls), expected[0], atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(torch.as_tensor(patches), expected[1], atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize(
    ("registers", "ffn_layer", "model_class"),
    [(0, "mlp", "Dinov2Model"), (4, "mlp", "Dinov2WithRegistersModel"), (0, "swiglufused", "Dinov2Model")],
)
def test_transformers_directory_loads_with_from_pretrained_and_gives_lvd_tokens(
    tmp_path, registers, ffn_layer, model_class
):
    backbone, row = saved_backbone(tmp_path, backbone_options(registers, ffn_layer))
    export_formats([row], ["transformers"], tmp_path / "out")
    folder = tmp_path / "out" / "teacher" / "transformers"
    model = getattr(transformers, model_class).from_pretrained(folder).eval()
    with torch.no_grad():
        hidden = model(pixel_values=images()).last_hidden_state
    assert_tokens_match(hidden[:, 0], hidden[:, 1 + registers :], lvd_tokens(backbone, images()))
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    assert processor["crop_size"] == {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    assert processor["size"] == {"shortest_edge": 32}  # 28 * 256 / 224, DINOv2's evaluation resize
    assert processor["image_mean"] == pytest.approx([0.485, 0.456, 0.406])


@pytest.mark.parametrize("registers", [0, 4])
def test_timm_checkpoint_loads_through_timms_own_filter_and_gives_lvd_tokens(tmp_path, registers):
    backbone, row = saved_backbone(tmp_path, backbone_options(registers))
    export_formats([row], ["timm"], tmp_path / "out")
    folder = tmp_path / "out" / "teacher" / "timm"
    call = json.loads((folder / "timm.json").read_text())
    assert call["model_name"] == f"vit_small_patch14{'_reg4' if registers else ''}_dinov2"
    model = timm.create_model(
        call["model_name"],
        pretrained=True,
        pretrained_cfg_overlay={"file": str(folder / call["file"])},
        **call["kwargs"],
    ).eval()
    with torch.no_grad():
        tokens = model.forward_features(images())
    assert_tokens_match(tokens[:, 0], tokens[:, 1 + registers :], lvd_tokens(backbone, images()))


def test_onnx_file_runs_in_onnxruntime_at_any_batch_size(tmp_path):
    backbone, row = saved_backbone(tmp_path, backbone_options(registers=4))
    export_formats([row], ["onnx"], tmp_path / "out")
    session = onnxruntime.InferenceSession(str(tmp_path / "out" / "teacher" / "onnx" / "backbone.onnx"))
    for batch in (1, BATCH):
        pixels = images()[:batch]
        cls, patches = session.run(None, {"pixel_values": pixels.numpy()})
        assert_tokens_match(cls, patches, lvd_tokens(backbone, pixels))


def test_the_manifest_has_one_row_per_file_with_its_sha256(tmp_path):
    _, row = saved_backbone(tmp_path, backbone_options())
    table = export_formats([row], list(FORMATS), tmp_path / "out")
    assert pq.read_table(tmp_path / "out" / MANIFEST_FILE).to_pylist() == table.to_pylist()
    files = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert sorted(table.column("path").to_pylist()) == [name for name in files if name != MANIFEST_FILE]
    for record in table.to_pylist():
        assert record["sha256"] == local_file_sha256(tmp_path / "out" / record["path"])
        assert record["source_sha256"] == row["sha256"]
    assert sorted(set(table.column("format").to_pylist())) == sorted(FORMATS)


def test_the_cli_exports_an_exports_manifest_and_refuses_unknown_formats(tmp_path, capsys):
    assert EXPORT_FORMATS == FORMATS  # the CLI's help lists them without importing the exporters
    _, row = saved_backbone(tmp_path, backbone_options())
    manifest = tmp_path / "exports.parquet"
    pq.write_table(EXPORTS.table_from_rows([row]), manifest)
    assert main(["export", str(manifest), "--formats", "timm", "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "teacher" / "timm" / "model.safetensors").is_file()
    assert main(["export", str(manifest), "--formats", "tflite", "--out", str(tmp_path / "x")]) == 2
    assert main(["export", str(manifest), "--model", "student", "--out", str(tmp_path / "x")]) == 2
    errors = capsys.readouterr().err
    assert "export formats must be among transformers, timm, onnx; got tflite" in errors
    assert "no exported backbone named student" in errors


def test_a_transformers_directory_and_a_timm_checkpoint_load_back_strictly(tmp_path):
    options = backbone_options(registers=4)
    backbone, row = saved_backbone(tmp_path, options)
    export_formats([row], ["transformers"], tmp_path / "out")
    shape = {"img_size": IMAGE_SIZE, "patch_size": PATCH, "embed_dim": 64, "depth": 2, "num_heads": 2}
    timm_model = timm.create_model("vit_small_patch14_reg4_dinov2", **shape)
    # timm's own layout (no mask token, class position folded into the class token), as timm saves it.
    timm_model.load_state_dict(
        timm.models.vision_transformer.checkpoint_filter_fn(backbone.state_dict(), timm_model)
    )
    torch.save(timm_model.state_dict(), tmp_path / "timm_own.pth")
    assert "mask_token" not in timm_model.state_dict() and "reg_token" in timm_model.state_dict()
    for source in (tmp_path / "out" / "teacher" / "transformers", tmp_path / "timm_own.pth"):
        back = build_vit_from_options(options)
        back.load_state_dict(read_backbone_state(source), strict=True)
        expected = lvd_tokens(backbone, images())
        assert_tokens_match(*lvd_tokens(back.eval(), images()), expected)


def test_a_transformers_directory_is_an_embedder_and_a_distillation_teacher(tmp_path):
    options = backbone_options()
    backbone, row = saved_backbone(tmp_path, options)
    export_formats([row], ["transformers"], tmp_path / "out")
    folder = tmp_path / "out" / "teacher" / "transformers"
    embedder_options = {"kind": "vit", "arch": "vit_test", "patch_size": PATCH, "image_size": IMAGE_SIZE}
    from_folder = build_embedder(EmbedderConfig(**embedder_options, path=str(folder)))
    from_file = build_embedder(EmbedderConfig(**embedder_options, path=str(tmp_path / "backbone.pth")))
    pixels = np.random.default_rng(0).integers(0, 255, (BATCH, 40, 40, 3), dtype=np.uint8)
    pictures = [Image.fromarray(array) for array in pixels]
    np.testing.assert_allclose(
        from_folder.embed_images(pictures), from_file.embed_images(pictures), atol=TOLERANCE
    )
    assert not is_checkpoint(folder)  # a folder, but a backbone in another layout, not an lvd run
    section = {**tiny_distill_section(1), "teacher_source": str(folder)}
    section["teacher_arch"] = {"arch": "vit_test", "patch_size": PATCH, "drop_path_rate": 0.0}
    teacher = load_hub_teacher(folder, build_config(DistillConfig, section, "distill"), with_heads=False)
    for name, tensor in backbone.state_dict().items():
        assert torch.equal(teacher.modules["backbone"].state_dict()[name], tensor), name
