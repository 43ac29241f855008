"""Exact properties of the VECA backbone and the dense ViT baselines."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from veca_ssl.models import build_backbone, list_backbones, load_backbone, save_backbone


def tiny_veca(depth: int = 2, **kw):
    torch.manual_seed(0)
    kw = dict(dict(embed_dim=64, num_heads=2, depth=depth, num_cores=16, layerscale_init=0.5), **kw)
    return build_backbone("veca_tiny", patch_size=8, **kw)


def randomize_(model: torch.nn.Module) -> None:
    """Non-trivial weights everywhere (init leaves biases/alphas at special values)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


# ---------------------------------------------------------------- isolation and reference parity
def _patch_pixel_grad(model, images, patch_index: int, num_cores: int) -> torch.Tensor:
    images = images.clone().requires_grad_(True)
    out = model.forward_features(images, num_cores=num_cores)["patches"]
    out[0, patch_index].square().sum().backward()
    p = model.patch_size
    b, c, h, w = images.shape
    # per-patch gradient magnitude (Hp*Wp,)
    return images.grad[0].abs().reshape(c, h // p, p, w // p, p).sum(dim=(0, 2, 4)).flatten()


def test_one_block_patches_are_isolated_two_blocks_are_not():
    images = torch.randn(1, 3, 32, 24)
    one = tiny_veca(depth=1).eval()
    randomize_(one)
    g = _patch_pixel_grad(one, images, patch_index=5, num_cores=8)
    assert g[5] > 0
    others = torch.cat([g[:5], g[6:]])
    assert torch.count_nonzero(others) == 0  # exactly zero, not just small

    two = tiny_veca(depth=2).eval()
    randomize_(two)
    g2 = _patch_pixel_grad(two, images, patch_index=5, num_cores=8)
    assert torch.count_nonzero(torch.cat([g2[:5], g2[6:]])) == g2.numel() - 1


def reference_veca(model, images: torch.Tensor, num_cores: int) -> dict:
    """Independent implementation: explicit masked softmax over the whole [R_C; Z] sequence."""
    cfg = model.config
    p, d_model, heads = cfg["patch_size"], cfg["embed_dim"], cfg["num_heads"]
    hd = d_model // heads
    b, _, h, w = images.shape
    hp, wp = h // p, w // p
    pix = images.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).reshape(b, hp * wp, -1)
    z = pix @ model.patch_embed.proj.weight.reshape(d_model, -1).T + model.patch_embed.proj.bias
    c = num_cores
    x = torch.cat([model.cores[:c].expand(b, -1, -1), z], dim=1)
    t = x.shape[1]
    ys = (torch.arange(hp) + 0.5) / hp * 2 - 1
    xs = (torch.arange(wp) + 0.5) / wp * 2 - 1
    patch_yx = torch.stack([ys[:, None].expand(hp, wp), xs[None, :].expand(hp, wp)], -1).reshape(-1, 2)
    nf = hd // 4
    freqs = torch.tensor([2 * math.pi / cfg["rope_base"] ** (k / nf) for k in range(nf)])
    freqs[nf - round(nf * cfg["rope_zero_fraction"]):] = 0
    allowed = torch.zeros(t, t, dtype=torch.bool)
    allowed[:c, :] = True
    allowed[:, :c] = True
    raw = model.core_coords[:c].expand(b, -1, -1)
    for li, blk in enumerate(model.blocks):
        yx = torch.cat([torch.tanh(raw), patch_yx.expand(b, -1, -1)], 1)
        ang = torch.cat([yx[..., :1] * freqs, yx[..., 1:] * freqs], -1)[:, None]  # (B,1,T,hd/2)

        def rot(v, ang=ang):  # channel pairs (2j, 2j+1) rotated by angle j
            v1, v2 = v[..., 0::2], v[..., 1::2]
            return torch.stack([v1 * ang.cos() - v2 * ang.sin(), v2 * ang.cos() + v1 * ang.sin()], -1).flatten(-2)

        y = F.layer_norm(x, (d_model,), blk.norm1.weight, blk.norm1.bias, blk.norm1.eps)
        qkv = (y @ blk.attn.qkv.weight.T + blk.attn.qkv.bias).reshape(b, t, 3, heads, hd).permute(2, 0, 3, 1, 4)
        q, k, v = rot(qkv[0]), rot(qkv[1]), qkv[2]
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        attn = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v
        attn = attn.transpose(1, 2).reshape(b, t, d_model) @ blk.attn.proj.weight.T + blk.attn.proj.bias
        x = x + attn * blk.ls1.gamma
        y = F.layer_norm(x, (d_model,), blk.norm2.weight, blk.norm2.bias, blk.norm2.eps)
        a, g = (y @ blk.mlp.w12.weight.T + blk.mlp.w12.bias).chunk(2, -1)
        x = x + ((F.silu(a) * g) @ blk.mlp.w3.weight.T + blk.mlp.w3.bias) * blk.ls2.gamma
        if li < len(model.blocks) - 1:
            head = model.coord_heads[li]
            raw = raw + model.coord_alpha[li] * (x[:, :c] @ head.weight.T + head.bias)
    x = F.layer_norm(x, (d_model,), model.norm.weight, model.norm.bias, model.norm.eps)
    return {"cls": x[:, 0], "cores": x[:, :c], "patches": x[:, c:]}


@pytest.mark.parametrize("backend", ["sdpa", "sdpa_masked", "math"])
def test_fast_path_matches_explicit_masked_reference(backend):
    model = tiny_veca(depth=3, attn_backend=backend).eval()
    randomize_(model)
    images = torch.randn(2, 3, 40, 24)
    with torch.no_grad():
        for c in (8, 16):
            out, ref = model.forward_features(images, num_cores=c), reference_veca(model, images, c)
            for key in ("cls", "cores", "patches"):
                assert (out[key] - ref[key]).abs().max() < 1e-5, (backend, c, key)


# ---------------------------------------------------------------- nesting
def test_width_outputs_ignore_cores_beyond_the_budget():
    model = tiny_veca(depth=3).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model.forward_features(images, num_cores=8)
        model.cores[8:].normal_()
        model.core_coords[8:].normal_()
        after = model.forward_features(images, num_cores=8)
        full_before = model.forward_features(images, num_cores=16)
        model.cores[8:].normal_()
        full_after = model.forward_features(images, num_cores=16)
    for key in ("cls", "cores", "patches"):
        assert torch.equal(before[key], after[key])
    assert not torch.allclose(full_before["cls"], full_after["cls"])  # the control: C=16 does see them

    model.zero_grad()
    # a random projection: the plain sum of a LayerNorm output is constant and has no gradient
    cls = model.forward_features(images, num_cores=8)["cls"]
    (cls * torch.randn_like(cls)).sum().backward()
    assert torch.count_nonzero(model.cores.grad[8:]) == 0
    assert torch.count_nonzero(model.core_coords.grad[8:]) == 0
    assert torch.count_nonzero(model.cores.grad[:8]) > 0


def test_core_bank_prefixes_are_spread_over_the_image():
    model = tiny_veca(num_cores=64)
    coords = model.core_coordinates()
    assert coords.abs().max() <= 0.95 + 1e-6
    assert torch.allclose(coords[0], torch.zeros(2), atol=1e-6)  # core 0 (the image feature) centred
    for c in (8, 16, 64):
        d = torch.cdist(coords[:c], coords[:c]) + torch.eye(c) * 10
        # a prefix of C farthest points keeps a minimum spacing close to the ideal grid spacing
        assert d.min() > 1.9 / math.sqrt(c) * 0.75, c


def test_core_bank_starts_as_the_reference_draws_it():
    # the reference's chunks are randn(1, 8, D) / sqrt(D): untruncated, std 1/sqrt(D) (timm's 0.02
    # would give 0.39 here)
    torch.manual_seed(0)
    model = build_backbone("veca_small", num_cores=64)
    cores = model.cores.detach() * math.sqrt(model.embed_dim)
    assert abs(float(cores.std()) - 1.0) < 0.03
    assert abs(float(cores.mean())) < 0.03
    assert float(cores.abs().max()) > 3.5  # tails a 2-sigma truncation would cut off


# ---------------------------------------------------------------- resolutions, errors
@pytest.mark.parametrize("patch_size,size", [(8, (32, 32)), (14, (28, 42)), (16, (48, 16)), (16, (64, 96))])
def test_any_multiple_of_the_patch_size(patch_size, size):
    model = build_backbone("veca_tiny", patch_size=patch_size, embed_dim=32, num_heads=2, depth=2,
                           num_cores=16).eval()
    out = model.forward_features(torch.randn(2, 3, *size), num_cores=8)
    hp, wp = size[0] // patch_size, size[1] // patch_size
    assert out["grid"] == (hp, wp)
    assert out["patches"].shape == (2, hp * wp, 32)
    assert out["cores"].shape == (2, 8, 32) and out["cls"].shape == (2, 32)
    assert torch.equal(out["cls"], out["cores"][:, 0])


@pytest.mark.parametrize("bad", [0, 12, 72])
def test_invalid_width_names_value_and_choices(bad):
    model = tiny_veca()
    with pytest.raises(ValueError, match=rf"num_cores={bad}.*\(8, 16\)"):
        model.forward_features(torch.randn(1, 3, 16, 16), num_cores=bad)


def test_invalid_inputs_raise_clear_errors():
    model = tiny_veca()
    with pytest.raises(ValueError, match=r"20x16 is not a multiple of the patch size 8"):
        model.forward_features(torch.randn(1, 3, 20, 16))
    with pytest.raises(ValueError, match=r"1 channels but the backbone expects 3"):
        model.forward_features(torch.randn(1, 1, 16, 16))
    with pytest.raises(ValueError, match=r"unknown backbone preset 'veca_huge'.*veca_small"):
        build_backbone("veca_huge")
    with pytest.raises(ValueError, match=r"num_cores=60 must be a positive multiple of core_chunk=8"):
        build_backbone("veca_tiny", num_cores=60)
    with pytest.raises(ValueError, match=r"invalid option.*valid options:.*embed_dim"):
        build_backbone("veca_tiny", embed_dims=3)
    with pytest.raises(ValueError, match=r"dense ViT"):
        build_backbone("vit_tiny", depth=1).forward_features(torch.randn(1, 3, 16, 16), num_cores=8)


# ---------------------------------------------------------------- API, save/load
def test_intermediate_layers_and_train_mode_augmentation():
    model = tiny_veca(depth=3).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        final = model.forward_features(images, num_cores=16)
        layers = model.get_intermediate_features(images, n=2, num_cores=16)
        assert len(layers) == 2
        assert torch.allclose(layers[-1]["cls"], final["cls"], atol=1e-6)
        assert not torch.allclose(layers[0]["cls"], final["cls"])
        model.train()
        a, b = model(images), model(images)
        assert not torch.allclose(a, b)  # coordinate augmentation draws new shifts/scales
        model.eval()
        assert torch.equal(model(images), model(images))


@pytest.mark.parametrize("name,kw", [("veca_tiny", dict(num_cores=16)),
                                     ("vit_tiny", dict(num_registers=2, pos_embed="rope")),
                                     ("vit_tiny", dict(pos_embed="learned", pos_embed_grid=2))])
def test_save_load_round_trip(tmp_path, name, kw):
    torch.manual_seed(0)
    model = build_backbone(name, patch_size=8, embed_dim=32, num_heads=2, depth=2, **kw).eval()
    randomize_(model)
    path = save_backbone(model, tmp_path / "m.safetensors")
    loaded = load_backbone(path).eval()
    images = torch.randn(2, 3, 24, 32)
    with torch.no_grad():
        a, b = model.forward_features(images), loaded.forward_features(images)
    for key in ("cls", "patches", "cores"):
        assert torch.equal(a[key], b[key])
    assert loaded.config == model.config


def test_missing_and_truncated_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_backbone(tmp_path / "nope.safetensors")
    model = tiny_veca()
    path = save_backbone(model, tmp_path / "m.safetensors")
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="truncated"):
        load_backbone(path)


@pytest.mark.parametrize("name", list_backbones())
def test_every_preset_forward_backward(name):
    """Every preset at its real width/heads (depth cut to 2 beyond tiny to keep CI fast)."""
    torch.manual_seed(0)
    kw = {} if name.endswith("tiny") else {"depth": 2}
    model = build_backbone(name, patch_size=16, **kw).train()
    images = torch.randn(2, 3, 32, 48)
    masks = torch.zeros(2, 6, dtype=torch.bool)
    masks[0, 1] = True
    out = model.forward_features(images, masks=masks)
    loss = out["cls"].square().mean() + out["patches"].square().mean()
    loss.backward()
    assert torch.isfinite(loss)
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or
               not torch.isfinite(p.grad).all() or torch.count_nonzero(p.grad) == 0)]
    assert not missing, f"{name}: parameters without gradient at the full bank: {missing}"
    if model.is_elastic:
        assert model.budgets == tuple(range(8, 65, 8))


def test_grad_checkpointing_gives_identical_gradients():
    images = torch.randn(2, 3, 16, 16)
    grads = []
    for ckpt in (False, True):
        model = tiny_veca(coord_shift=0.0, coord_rescale=(1.0, 1.0)).train()
        model.set_grad_checkpointing(ckpt)
        feats = model(images)
        (feats * torch.linspace(-1, 1, feats.numel()).reshape(feats.shape)).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_pair_rope_is_rotate_half_rope_up_to_a_channel_permutation() -> None:
    from veca_ssl.models.rope import apply_rope, apply_rope_pairs, rope_cos_sin, rope_freqs, rope_inv_periods

    gen = torch.Generator().manual_seed(0)
    d = 16
    x = torch.randn(2, 3, 5, d, generator=gen)
    coords = torch.rand(2, 1, 5, 2, generator=gen) * 2 - 1
    inv = rope_inv_periods(d, 100.0, 0.125)
    half = apply_rope(x, *rope_cos_sin(coords, inv))
    interleave = torch.stack([torch.arange(d // 2), torch.arange(d // 2) + d // 2], -1).flatten()
    pairs = apply_rope_pairs(x[..., interleave], rope_freqs(coords, inv))
    assert (pairs - half[..., interleave]).abs().max() < 1e-6
    # rotations preserve norms and dot products of equally placed tokens
    assert torch.allclose(pairs.norm(dim=-1), x.norm(dim=-1), atol=1e-5)
