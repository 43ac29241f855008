"""Fixed-width export: only that width's cores in the artefact, parity after reloading, the CLI."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from veca_ssl.models import build_backbone, load_backbone, save_backbone
from veca_ssl.models.export import example_input, export_backbone
from veca_ssl.models.fixed_width import FixedWidthVECA, slice_to_width

ROOT = Path(__file__).resolve().parent.parent
HAS_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxscript", "onnxruntime"))


def tiny_veca(num_cores: int = 24, **kw):
    torch.manual_seed(0)
    model = build_backbone("veca_tiny", patch_size=8, embed_dim=32, num_heads=2, depth=3, num_cores=num_cores,
                           layerscale_init=0.5, **kw).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    return model


@pytest.mark.parametrize("width", [8, 16])
def test_fixed_width_module_holds_only_its_cores_and_matches_the_elastic_model(width):
    model = tiny_veca(output_dim=48)
    images = torch.randn(2, 3, 24, 40)
    for space in ("native", "teacher"):
        fixed = FixedWidthVECA(model, width, space)
        assert fixed.cores.shape == (width, 32) and fixed.core_coords.shape == (width, 2)
        assert (fixed.output_proj is not None) == (space == "teacher")
        with torch.no_grad():
            cls, patches = fixed(images)
            ref = model.forward_features(images, num_cores=width, space=space)
        assert (cls - ref["cls"]).abs().max() <= 1e-5 and (patches - ref["patches"]).abs().max() <= 1e-5
    sliced = slice_to_width(model, width)
    assert sliced.num_cores == width and sliced.budgets == tuple(range(8, width + 1, 8))
    with torch.no_grad():
        assert torch.equal(sliced.forward_features(images)["patches"],
                           model.forward_features(images, num_cores=width)["patches"])


@pytest.mark.parametrize("fmt,width", [(f, w) for f in ("safetensors", "torchscript", "veca-reference-nonstrict")
                                       for w in (8, 16)] + [("onnx", 8), ("onnx", 16)])  # ONNX: ~5 s a call
def test_export_reload_parity_at_two_widths(tmp_path, fmt, width):
    if fmt == "onnx" and not HAS_ONNX:
        pytest.skip("ONNX export needs the [onnx] extra (onnx, onnxscript, onnxruntime), not installed here")
    if fmt == "veca-reference-nonstrict":
        torch.manual_seed(0)  # the reference layout needs a reference family's width: small, cut short
        model = build_backbone("veca_small", depth=2, num_cores=56).eval()
        result = export_backbone(model, tmp_path / "m", "veca-reference", width, (32, 48), strict_reference=False)
    else:
        model = tiny_veca(num_cores=56)  # a bank size no other dimension of the graph has
        result = export_backbone(model, tmp_path / "m", fmt, width, (32, 48))
    assert result.parity.checked and result.parity.ok(1e-5), result.parity
    assert result.path.exists() and oct(result.path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    images = example_input(2, (32, 48))
    with torch.no_grad():
        ref = model.forward_features(images, num_cores=width)
        if fmt == "torchscript":
            traced = torch.jit.load(str(result.path))
            assert dict(traced.named_parameters())["cores"].shape == (width, 32)
            cls, patches = traced(images)
        elif fmt == "onnx":
            import onnxruntime as ort

            cls, patches = (torch.from_numpy(a) for a in ort.InferenceSession(
                str(result.path), providers=["CPUExecutionProvider"]).run(None, {"images": images.numpy()}))
        else:
            reloaded = load_backbone(result.path).eval()
            assert reloaded.num_cores == width  # only that width's cores were written
            out = reloaded.forward_features(images)
            cls, patches = out["cls"], out["patches"]
    assert (cls - ref["cls"]).abs().max() <= 1e-5 and (patches - ref["patches"]).abs().max() <= 1e-5
    if fmt == "onnx":  # the graph holds the cut bank, not the full one (expanded to the batch in the graph)
        import onnx

        sizes = [tuple(t.dims) for t in onnx.load(str(result.path)).graph.initializer]
        assert (width, 32) in sizes and not any(56 in dims for dims in sizes)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_dense_vit_exports_without_a_width_and_refuses_one(tmp_path):
    torch.manual_seed(0)
    vit = build_backbone("vit_tiny", patch_size=8, embed_dim=32, num_heads=2, depth=2, pos_embed="rope").eval()
    result = export_backbone(vit, tmp_path / "vit", "torchscript", None, (24, 32))
    assert result.parity.ok(1e-5) and result.width is None
    with pytest.raises(ValueError, match="dense ViT, which has no core widths"):
        export_backbone(vit, tmp_path / "vit2", "safetensors", 8)
    with pytest.raises(ValueError, match=r"num_cores=12 is not a valid core width"):
        export_backbone(tiny_veca(), tmp_path / "x", "safetensors", 12)
    with pytest.raises(ValueError, match=r"resolution 30x32 is not a multiple of the patch size 8"):
        export_backbone(tiny_veca(), tmp_path / "x", "safetensors", 8, (30, 32))


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "veca_ssl.cli", "export", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_prints_the_parity_check_and_fails_cleanly(tmp_path, capsys):
    path = save_backbone(tiny_veca(), tmp_path / "model.safetensors")
    out = _run("--checkpoint", str(path), "--format", "torchscript", "--width", "16", "--resolution", "16x24",
               "--out", str(tmp_path / "w16"))
    assert out.returncode == 0, out.stderr
    assert f"-> {tmp_path / 'w16.pt'}" in out.stdout
    assert "parity vs the elastic model at width 16, input 2x3x16x24: max |diff| cls" in out.stdout
    assert out.stdout.rstrip().endswith(": OK")
    assert torch.jit.load(str(tmp_path / "w16.pt"))(torch.randn(2, 3, 16, 24))[1].shape == (2, 6, 32)
    from veca_ssl.export import main

    assert main(["--checkpoint", str(path), "--width", "12", "--out", str(tmp_path / "x")]) == 2
    assert "veca export: num_cores=12 is not a valid core width; valid widths: (8, 16, 24)" in capsys.readouterr().err
    assert main(["--checkpoint", str(path), "--format", "veca-reference", "--out", str(tmp_path / "r")]) == 2
    assert "match no reference family" in capsys.readouterr().err
    assert main(["--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "r")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("")  # an output path under a file: named, no traceback
    assert main(["--checkpoint", str(path), "--out", str(tmp_path / "a_file" / "w.safetensors"),
                 "--resolution", "16"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("veca export: cannot write --out ") and "Traceback" not in err and err.count("\n") == 1


@pytest.mark.skipif(not HAS_ONNX, reason="ONNX export needs the [onnx] extra (onnx, onnxscript, onnxruntime)")
def test_onnx_export_takes_any_batch_and_resolution(tmp_path):
    """`veca export --format onnx` as typed; onnxruntime then runs batch 4 and another resolution, with
    parity to PyTorch. A dense ViT with a learned position table keeps its resolution and says why."""
    import onnxruntime as ort

    model = tiny_veca()
    path = save_backbone(model, tmp_path / "model.safetensors")
    out = _run("--checkpoint", str(path), "--format", "onnx", "--width", "16", "--resolution", "32x48",
               "--out", str(tmp_path / "w16.onnx"))
    assert out.returncode == 0, out.stderr
    assert "  input axes of any size: batch, height, width (multiples of 8)" in out.stdout
    assert "input 2x3x32x48 and 4x3x40x64: max |diff|" in out.stdout and out.stdout.rstrip().endswith(": OK")
    session = ort.InferenceSession(str(tmp_path / "w16.onnx"), providers=["CPUExecutionProvider"])
    assert [d if isinstance(d, int) else "sym" for d in session.get_inputs()[0].shape] == ["sym", 3, "sym", "sym"]
    for shape in ((4, 3, 32, 48), (1, 3, 32, 48), (3, 3, 56, 24)):
        images = torch.randn(*shape)
        cls, patches = session.run(["cls", "patches"], {"images": images.numpy()})
        with torch.no_grad():
            ref = model.forward_features(images, num_cores=16)
        assert (torch.from_numpy(cls) - ref["cls"]).abs().max() <= 1e-5
        assert (torch.from_numpy(patches) - ref["patches"]).abs().max() <= 1e-5
    torch.manual_seed(0)
    vit = build_backbone("vit_tiny", patch_size=8, embed_dim=32, num_heads=2, depth=1, pos_embed_grid=4).eval()
    result = export_backbone(vit, tmp_path / "vit.onnx", "onnx", None, (32, 32), batch=1)
    assert result.dynamic_axes == ("batch",) and result.parity.ok(1e-5)
    assert result.checked_shapes == ((1, 3, 32, 32), (3, 3, 32, 32))
    assert result.notes == ["ONNX height and width fixed at 32x32: a learned position table is interpolated to the "
                            "grid with sizes fixed at export (and not at all at the table's own size); height and "
                            "width are those of --resolution"]
