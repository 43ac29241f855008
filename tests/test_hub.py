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


# ---------------------------------------------------------------- DINOv2/DINOv3 hub idioms, eval mode
def test_dinov2_hub_idioms_as_typed(tmp_path):
    repo_dir = ROOT
    model = torch.hub.load(repo_dir, 'veca_small', source='local', pretrained=False)  # DINOv2's idiom
    assert isinstance(model, PRESETS["veca_small"].cls) and not model.training  # eval mode, as load_backbone
    image = torch.randn(1, 3, 32, 32)
    with torch.no_grad():  # no coordinate augmentation in eval mode: the same image, the same features
        assert torch.equal(model.forward_features(image)["cls"], model.forward_features(image)["cls"])
    with pytest.raises(ValueError, match=r"^veca_small: pretrained=True, but veca-ssl bundles no weights and "
                                         r"downloads nothing; pass weights=<path> .*, or pretrained=False"):
        torch.hub.load(repo_dir, 'veca_small', source='local', pretrained=True)
    with pytest.raises(ValueError, match=r"weights='LVD142M' is not a local file"):  # DINOv2's weights enum name
        torch.hub.load(repo_dir, 'veca_small', source='local', weights='LVD142M')
    with pytest.raises(ValueError, match=r"is a URL; veca-ssl downloads nothing"):
        torch.hub.load(repo_dir, 'veca_small', source='local', weights='https://example.org/veca_s.pth')
    torch.manual_seed(0)
    path = save_backbone(build_backbone("veca_tiny"), tmp_path / "tiny.safetensors")
    loaded = torch.hub.load(repo_dir, 'veca_tiny', source='local', weights=str(path))  # DINOv3's idiom
    assert not loaded.training and loaded.depth == 12
    with pytest.raises(ValueError, match=r"pretrained=False but weights="):
        torch.hub.load(repo_dir, 'veca_tiny', source='local', pretrained=False, weights=str(path))
    # DINOv2's model keywords, on the dense baseline they describe
    vit = torch.hub.load(repo_dir, 'vit_small', source='local', pretrained=False, img_size=518, patch_size=14,
                         init_values=1.0, ffn_layer="mlp", block_chunks=0, num_register_tokens=4,
                         interpolate_antialias=True, interpolate_offset=0.0, drop_path_rate=0.1)
    cfg = vit.config
    assert (cfg["patch_size"], cfg["pos_embed_grid"], cfg["layerscale_init"], cfg["ffn_layer"], cfg["num_registers"],
            cfg["pos_interp_antialias"], cfg["drop_path_rate"]) == (14, 37, 1.0, "mlp", 4, True, 0.1)
    with pytest.raises(ValueError, match="VECA has no register tokens"):
        torch.hub.load(repo_dir, 'veca_tiny', source='local', num_register_tokens=4)


def test_hubconf_docstring_examples_run():
    """What hubconf.py shows runs on this torch, as written (the repository path filled in), and what it
    says of torch.hub.list/help holds."""
    import ast
    import inspect
    import re
    import textwrap

    doc = ast.get_docstring(ast.parse((Path(ROOT) / "hubconf.py").read_text()))
    first = doc.index("::\n")
    block = re.match(r"\n((?:    .*\n|\n)+)", doc[first + 2:] + "\n").group(1)
    code = textwrap.dedent(block).replace('"path/to/veca-ssl"', repr(ROOT))
    assert "torch.hub.load(repo_dir" in code
    scope: dict = {}
    exec(compile(code, "hubconf.py docstring", "exec"), scope)  # noqa: S102 - our own documentation
    assert not scope["model"].training and scope["model"].depth == 4
    # torch.hub.list/help take a GitHub repository and no source=: the docstring must not show them with one
    assert not re.search(r"torch\.hub\.(list|help)\([^)]*source=", doc)
    for fn in (torch.hub.list, torch.hub.help):
        assert "source" not in inspect.signature(fn).parameters


def test_load_backbone_returns_eval_mode_and_the_same_features_twice(tmp_path):
    from veca_ssl.models import load_backbone, read_backbone

    torch.manual_seed(0)
    path = save_backbone(build_backbone("veca_tiny", patch_size=8, num_cores=16), tmp_path / "w.safetensors")
    images = torch.randn(2, 3, 32, 32)
    for model in (load_backbone(path), read_backbone(path).model,
                  torch.hub.load(ROOT, "veca_tiny", source="local", weights=str(path))):
        assert not model.training
        with torch.no_grad():
            first, second = model.forward_features(images), model.forward_features(images)
        assert torch.equal(first["cls"], second["cls"]) and torch.equal(first["patches"], second["patches"])
        model.train()  # training mode is still one call away, with its coordinate augmentation
        with torch.no_grad():
            assert not torch.equal(model.forward_features(images)["patches"], model.forward_features(images)["patches"])
