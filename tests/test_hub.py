"""DINOv2/timm habits: torch.hub entry points, num_features/embed_dim/patch_size, get_intermediate_layers."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from veca_ssl.models import PRESETS, build_backbone, list_backbones, save_backbone

ROOT = str(Path(__file__).resolve().parent.parent)


def test_hubconf_has_one_entry_point_per_preset():
    spec = importlib.util.spec_from_file_location("hubconf_under_test", Path(ROOT) / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    public = sorted(n for n in dir(hubconf) if callable(getattr(hubconf, n)) and not n.startswith("_"))
    assert public == list_backbones()  # what torch.hub lists: nothing else leaks in
    assert hubconf.dependencies == ["torch", "safetensors"]


@pytest.mark.parametrize("name", list_backbones())
def test_torch_hub_load_every_preset(name):
    kw = {} if name.endswith("tiny") else {"depth": 1}  # full width and heads, one block beyond tiny
    torch.manual_seed(0)
    model = torch.hub.load(ROOT, name, source="local", trust_repo=True, **kw)
    preset = PRESETS[name]
    assert isinstance(model, preset.cls)
    for key in ("embed_dim", "num_heads"):
        assert getattr(model, key) == preset.defaults[key]
    assert model.num_features == model.embed_dim and model.patch_size == 16
    if name.endswith("tiny"):  # a forward where it is cheap
        with torch.no_grad():
            feats = model.eval().forward_features(torch.randn(1, 3, 32, 48))
        assert feats["patches"].shape == (1, 6, 192)


def test_hub_pretrained_loads_local_weights_and_checks_the_architecture(tmp_path):
    torch.manual_seed(0)
    model = build_backbone("veca_tiny").eval()
    path = save_backbone(model, tmp_path / "tiny.safetensors")
    loaded = torch.hub.load(ROOT, "veca_tiny", source="local", trust_repo=True, pretrained=str(path))
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.forward_features(images, num_cores=16)["cls"],
                           model.forward_features(images, num_cores=16)["cls"])
    assert not loaded.training
    with pytest.raises(ValueError, match=r"holds a veca embed_dim=192, depth=12, num_heads=3, not a veca_small"):
        torch.hub.load(ROOT, "veca_small", source="local", trust_repo=True, pretrained=str(path))
    with pytest.raises(ValueError, match=r"not a vit_tiny"):
        torch.hub.load(ROOT, "vit_tiny", source="local", trust_repo=True, pretrained=str(path))


# ---------------------------------------------------------------- get_intermediate_layers (DINOv2)
def _dinov2_style(model, x: torch.Tensor, n, norm: bool = True) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """DINOv2's rule written out on our dense ViT: prepare tokens, run the blocks, keep the chosen ones
    in block order, (optionally) norm, class token at 0, patches after class + registers."""
    b, _, h, w = x.shape
    z, grid = model.patch_embed(x)
    t = torch.cat([model.cls_token.expand(b, -1, -1), z], 1) + model.interpolate_pos_embed(grid)
    t = torch.cat([t[:, :1], model.register_tokens.expand(b, -1, -1), t[:, 1:]], 1)
    take = range(len(model.blocks) - n, len(model.blocks)) if isinstance(n, int) else n
    outs = []
    for i, blk in enumerate(model.blocks):
        t = blk(t, None, None, 1 + model.num_registers)
        if i in take:
            outs.append(model.norm(t) if norm else t)
    return [(o[:, 1 + model.num_registers:], o[:, 0]) for o in outs]


def test_intermediate_layers_follow_dinov2_on_a_dense_vit():
    torch.manual_seed(0)
    vit = build_backbone("vit_tiny", patch_size=8, embed_dim=32, num_heads=2, depth=4, num_registers=2).eval()
    x = torch.randn(2, 3, 24, 40)  # 3x5 patches
    with torch.no_grad():
        for n in (1, 3, [0, 2], [3, 1]):
            expected = _dinov2_style(vit, x, n)
            plain = vit.get_intermediate_layers(x, n)
            assert isinstance(plain, tuple) and len(plain) == len(expected)
            for got, (patches, _) in zip(plain, expected):
                assert got.shape == (2, 15, 32) and torch.allclose(got, patches, atol=1e-6)
            pairs = vit.get_intermediate_layers(x, n, reshape=True, return_class_token=True)
            for (grid_tokens, cls), (patches, cls_ref) in zip(pairs, expected):
                assert grid_tokens.shape == (2, 32, 3, 5)
                assert torch.allclose(grid_tokens, patches.reshape(2, 3, 5, 32).permute(0, 3, 1, 2), atol=1e-6)
                assert cls.shape == (2, 32) and torch.allclose(cls, cls_ref, atol=1e-6)
        raw = vit.get_intermediate_layers(x, 2, norm=False)
        for got, (patches, _) in zip(raw, _dinov2_style(vit, x, 2, norm=False)):
            assert torch.allclose(got, patches, atol=1e-6)
        # [3, 1] is taken in block order, as DINOv2 does
        assert torch.allclose(vit.get_intermediate_layers(x, [3, 1])[0], vit.get_intermediate_layers(x, [1])[0])
    for bad in (0, 5, [4], [-1], [1, 1], []):
        with pytest.raises(ValueError, match="intermediate layers"):
            vit.get_intermediate_layers(x, bad)


def test_veca_intermediate_layers_take_a_width_and_core_zero_as_class_token():
    torch.manual_seed(0)
    veca = build_backbone("veca_tiny", patch_size=8, embed_dim=32, num_heads=2, depth=3, num_cores=16).eval()
    x = torch.randn(1, 3, 16, 32)
    with torch.no_grad():
        ((patches, cls),) = veca.get_intermediate_layers(x, 1, reshape=True, return_class_token=True, num_cores=8)
        final = veca.forward_features(x, num_cores=8)
    assert patches.shape == (1, 32, 2, 4) and torch.allclose(cls, final["cls"], atol=1e-6)
    assert torch.allclose(patches.flatten(2).transpose(1, 2), final["patches"], atol=1e-6)
    dicts = veca.get_intermediate_features(x, n=[0, 2], num_cores=16)
    assert [d["cores"].shape[1] for d in dicts] == [16, 16] and dicts[0]["grid"] == (2, 4)
