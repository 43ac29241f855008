"""External teacher layouts (DINOv2 / DINOv3 / timm) load exactly: parity with hand-written reference
forwards computed from the raw state dicts in the upstream key names."""

from __future__ import annotations

import math

import pytest
import torch

from veca_ssl.models import load_backbone
from veca_ssl.models.convert import backbone_from_state_dict, detect_layout

DIM, HEADS, DEPTH = 64, 2, 2


# ------------------------------------------------------------------ upstream-layout state dicts
def make_state(layout: str, *, patch: int = 14, grid: int = 4, registers: int = 0, ffn: str = "mlp",
               layerscale: bool = True, no_embed_class: bool = False, seed: int = 0,
               dim: int = DIM, depth: int = DEPTH, heads: int = HEADS) -> dict[str, torch.Tensor]:
    """Random weights under the exact key names and shapes of each upstream implementation."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, scale: float = 0.1, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale + mean

    d = dim
    sd: dict[str, torch.Tensor] = {"patch_embed.proj.weight": rnd(d, 3, patch, patch, scale=0.05),
                                   "patch_embed.proj.bias": rnd(d), "cls_token": rnd(1, 1, d, scale=0.5)}
    if layout == "dinov2":
        sd["pos_embed"] = rnd(1, 1 + grid * grid, d, scale=0.5)
        sd["mask_token"] = rnd(1, d)
        if registers:
            sd["register_tokens"] = rnd(1, registers, d, scale=0.5)
    elif layout == "dinov3":
        sd["mask_token"] = rnd(1, d)
        if registers:
            sd["storage_tokens"] = rnd(1, registers, d, scale=0.5)
        hd = d // heads  # DINOv3 RopePositionEmbedding._init_weights, fp32
        sd["rope_embed.periods"] = 100.0 ** (2 * torch.arange(hd // 4, dtype=torch.float32) / (hd // 2))
    else:
        n_pos = grid * grid + (0 if no_embed_class else 1)
        sd["pos_embed"] = rnd(1, n_pos, d, scale=0.5)
        if registers:
            sd["reg_token"] = rnd(1, registers, d, scale=0.5)
        sd["head.weight"], sd["head.bias"] = rnd(10, d), rnd(10)
    hidden = 4 * d
    swiglu_hidden = (int(hidden * 2 / 3) + 7) // 8 * 8  # DINOv2 SwiGLUFFNFused / DINOv3 align 8
    for i in range(depth):
        p = f"blocks.{i}."
        sd[p + "norm1.weight"], sd[p + "norm1.bias"] = rnd(d, mean=1.0), rnd(d)
        sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"] = rnd(3 * d, d), rnd(3 * d)
        if layout == "dinov3":  # LinearKMaskedBias after init: k third masked out
            sd[p + "attn.qkv.bias_mask"] = torch.cat([torch.ones(d), torch.zeros(d), torch.ones(d)])
        sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"] = rnd(d, d), rnd(d)
        sd[p + "norm2.weight"], sd[p + "norm2.bias"] = rnd(d, mean=1.0), rnd(d)
        if ffn == "mlp":
            sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"] = rnd(hidden, d), rnd(hidden)
            sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"] = rnd(d, hidden), rnd(d)
        elif ffn == "w12":  # DINOv2 giant
            sd[p + "mlp.w12.weight"], sd[p + "mlp.w12.bias"] = rnd(2 * swiglu_hidden, d), rnd(2 * swiglu_hidden)
            sd[p + "mlp.w3.weight"], sd[p + "mlp.w3.bias"] = rnd(d, swiglu_hidden), rnd(d)
        else:  # DINOv3 SwiGLUFFN (S+/H+): separate w1 (gate) and w2
            for name in ("w1", "w2"):
                sd[p + f"mlp.{name}.weight"], sd[p + f"mlp.{name}.bias"] = rnd(swiglu_hidden, d), rnd(swiglu_hidden)
            sd[p + "mlp.w3.weight"], sd[p + "mlp.w3.bias"] = rnd(d, swiglu_hidden), rnd(d)
        if layerscale:
            sd[p + "ls1.gamma"], sd[p + "ls2.gamma"] = rnd(d, scale=0.2, mean=0.5), rnd(d, scale=0.2, mean=0.5)
    sd["norm.weight"], sd["norm.bias"] = rnd(d, mean=1.0), rnd(d)
    return sd


# ------------------------------------------------------------------ hand-written reference forward
def _cubic(x: float, a: float) -> float:
    x = abs(x)
    if x <= 1:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2:
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return 0.0


def bicubic_matrix(n_in: int, n_out: int, scale_factor: float | None = None) -> torch.Tensor:
    """(n_out, n_in) weights of PyTorch's bicubic (a=-0.75, half-pixel, clamped border); with
    ``scale_factor`` the source step is 1/scale_factor (DINOv2's +0.1 form), else n_in/n_out."""
    step = 1 / scale_factor if scale_factor else n_in / n_out
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        src = step * (i + 0.5) - 0.5
        base = math.floor(src)
        t = src - base
        for k, w in zip((-1, 0, 1, 2), (_cubic(t + 1, -0.75), _cubic(t, -0.75), _cubic(1 - t, -0.75),
                                        _cubic(2 - t, -0.75))):
            m[i, min(max(base + k, 0), n_in - 1)] += w
    return m


def antialias_bicubic_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """PIL-style antialiased bicubic (a=-0.5, support widened by the downscale, normalised weights)."""
    scale = n_in / n_out
    support = 2 * scale if scale >= 1 else 2.0
    inv = 1 / scale if scale >= 1 else 1.0
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        centre = scale * (i + 0.5)
        lo, hi = max(int(centre - support + 0.5), 0), min(int(centre + support + 0.5), n_in)
        w = torch.tensor([_cubic((j - centre + 0.5) * inv, -0.5) for j in range(lo, hi)], dtype=torch.float64)
        m[i, lo:hi] = w / w.sum()
    return m


def resize_grid(pos: torch.Tensor, m: int, out: tuple[int, int], mode: str) -> torch.Tensor:
    """(m*m, D) table -> (out_h*out_w, D) by separable weights."""
    if out == (m, m):
        return pos
    if mode == "offset":
        wh, ww = (bicubic_matrix(m, o, (o + 0.1) / m) for o in out)
    else:
        wh, ww = (antialias_bicubic_matrix(m, o) for o in out)
    grid = pos.double().reshape(m, m, -1)
    return torch.einsum("ia,jb,abd->ijd", wh, ww, grid).reshape(out[0] * out[1], -1).float()


def layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = (x - mu).square().mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def rotate(x: torch.Tensor, ang: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * ang.cos() + rot * ang.sin()


def reference_forward(sd: dict, layout: str, images: torch.Tensor, pos_mode: str = "offset",
                      eps: float = 1e-6) -> dict:
    w = sd["patch_embed.proj.weight"]
    d, _, p, _ = w.shape
    b, _, h, wd = images.shape
    hp, wp = h // p, wd // p
    pix = images.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).reshape(b, hp * wp, -1)
    z = pix @ w.reshape(d, -1).T + sd["patch_embed.proj.bias"]
    cls = sd["cls_token"].expand(b, -1, -1)
    reg_key = {"dinov2": "register_tokens", "dinov3": "storage_tokens", "timm": "reg_token"}[layout]
    regs = sd[reg_key].expand(b, -1, -1) if reg_key in sd else z[:, :0]
    if layout == "dinov3":
        x = torch.cat([cls, regs, z], 1)
    else:
        pos = sd["pos_embed"][0]
        n_prefix = 1 if math.isqrt(pos.shape[0] - 1) ** 2 == pos.shape[0] - 1 else 0  # class position?
        m = math.isqrt(pos.shape[0] - n_prefix)
        patch_pos = resize_grid(pos[n_prefix:], m, (hp, wp), pos_mode)
        cls_pos = pos[:1] if n_prefix else torch.zeros_like(pos[:1])
        x = torch.cat([cls + cls_pos, regs, z + patch_pos], 1)
    prefix = 1 + regs.shape[1]
    heads, hd = HEADS, d // HEADS
    t = x.shape[1]
    ang = None
    if layout == "dinov3":  # RopePositionEmbedding(normalize_coords="separate") + rope_apply
        ys = (torch.arange(0.5, hp) / hp) * 2 - 1
        xs = (torch.arange(0.5, wp) / wp) * 2 - 1
        coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), -1).reshape(-1, 2)
        a = 2 * math.pi * coords[:, :, None] / sd["rope_embed.periods"][None, None, :]
        ang = a.flatten(1).tile(2)  # (HW, hd)
    for i in range(max(int(k.split(".")[1]) for k in sd if k.startswith("blocks.")) + 1):
        P = f"blocks.{i}."
        y = layer_norm(x, sd[P + "norm1.weight"], sd[P + "norm1.bias"], eps)
        bias = sd[P + "attn.qkv.bias"] * sd.get(P + "attn.qkv.bias_mask", 1.0)
        qkv = (y @ sd[P + "attn.qkv.weight"].T + bias).reshape(b, t, 3, heads, hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if ang is not None:
            q = torch.cat([q[:, :, :prefix], rotate(q[:, :, prefix:], ang)], 2)
            k = torch.cat([k[:, :, :prefix], rotate(k[:, :, prefix:], ang)], 2)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), -1) @ v
        att = att.transpose(1, 2).reshape(b, t, d) @ sd[P + "attn.proj.weight"].T + sd[P + "attn.proj.bias"]
        x = x + att * sd.get(P + "ls1.gamma", 1.0)
        y = layer_norm(x, sd[P + "norm2.weight"], sd[P + "norm2.bias"], eps)
        if P + "mlp.fc1.weight" in sd:
            u = y @ sd[P + "mlp.fc1.weight"].T + sd[P + "mlp.fc1.bias"]
            u = 0.5 * u * (1 + torch.erf(u / math.sqrt(2)))
            f = u @ sd[P + "mlp.fc2.weight"].T + sd[P + "mlp.fc2.bias"]
        else:
            if P + "mlp.w12.weight" in sd:
                u1, u2 = (y @ sd[P + "mlp.w12.weight"].T + sd[P + "mlp.w12.bias"]).chunk(2, -1)
            else:
                u1 = y @ sd[P + "mlp.w1.weight"].T + sd[P + "mlp.w1.bias"]
                u2 = y @ sd[P + "mlp.w2.weight"].T + sd[P + "mlp.w2.bias"]
            f = (u1 * torch.sigmoid(u1) * u2) @ sd[P + "mlp.w3.weight"].T + sd[P + "mlp.w3.bias"]
        x = x + f * sd.get(P + "ls2.gamma", 1.0)
    x = layer_norm(x, sd["norm.weight"], sd["norm.bias"], eps)
    return {"cls": x[:, 0], "cores": x[:, 1:prefix], "patches": x[:, prefix:]}


# ------------------------------------------------------------------ parity
CASES = {
    # name: (layout, make_state kwargs, pos interpolation of the upstream model, LayerNorm eps)
    "dinov2_s14": ("dinov2", dict(), "offset", 1e-6),
    "dinov2_s14_reg4": ("dinov2", dict(registers=4), "antialias", 1e-6),
    "dinov2_g14_swiglu": ("dinov2", dict(ffn="w12"), "offset", 1e-6),
    "dinov3_s16_storage4": ("dinov3", dict(patch=16, registers=4), None, 1e-5),
    "dinov3_splus16_swiglu": ("dinov3", dict(patch=16, registers=4, ffn="w1w2"), None, 1e-5),
    "timm_vit": ("timm", dict(patch=16, layerscale=False), "antialias", 1e-6),
    "timm_reg4_no_embed_class": ("timm", dict(registers=4, no_embed_class=True), "antialias", 1e-6),
}


@pytest.mark.parametrize("name", list(CASES))
def test_layout_loads_exactly_and_matches_reference(tmp_path, name):
    layout, kw, pos_mode, eps = CASES[name]
    sd = make_state(layout, **kw)
    assert detect_layout(sd) == layout
    path = tmp_path / f"{name}.pth"
    torch.save(sd, path)
    model = load_backbone(path, num_heads=HEADS)
    assert model.depth == DEPTH and model.embed_dim == DIM and model.num_registers == kw.get("registers", 0)
    p = kw.get("patch", 14)
    torch.manual_seed(0)
    # grid (3, 5) around the stored 4x4 table: one axis down-, one upsampled; (4, 4) uses it as stored
    for hp, wp in ((3, 5), (4, 4)):
        images = torch.randn(2, 3, hp * p, wp * p)
        with torch.no_grad():
            out = model.forward_features(images)
            ref = reference_forward(sd, layout, images, pos_mode, eps)
        assert out["grid"] == (hp, wp)
        for key in ("cls", "patches", "cores"):
            assert out[key].shape == ref[key].shape, key
            err = (out[key] - ref[key]).abs().max().item() if ref[key].numel() else 0.0
            assert err < 1e-5, (name, key, (hp, wp), err)


def test_reference_interpolation_is_not_trivially_shared():
    """The two DINOv2 interpolation forms really differ at this grid, so the parity tests tell them apart."""
    pos = torch.randn(16, 8)
    a, b = resize_grid(pos, 4, (3, 5), "offset"), resize_grid(pos, 4, (3, 5), "antialias")
    assert (a - b).abs().max() > 1e-2


def test_config_of_real_checkpoints():
    """Real widths (depth cut to 1): heads, FFN, registers and positions inferred."""
    s = make_state("dinov2", dim=384, depth=1, grid=37, registers=4)
    cfg = backbone_from_state_dict(s).config
    assert (cfg["embed_dim"], cfg["num_heads"], cfg["num_registers"], cfg["pos_embed_grid"]) == (384, 6, 4, 37)
    assert (cfg["ffn_layer"], cfg["ffn_ratio"], cfg["pos_interp_antialias"], cfg["pos_interp_offset"]) == \
        ("mlp", 4.0, True, 0.0)
    assert cfg["layerscale_init"] is not None and cfg["patch_size"] == 14
    g = make_state("dinov2", dim=1536, depth=1, grid=2, ffn="w12")
    assert g["blocks.0.mlp.w3.weight"].shape == (1536, 4096)
    model = backbone_from_state_dict(g)
    assert (model.num_heads, model.ffn_layer, model.ffn_hidden, model.config["ffn_ratio"]) == (24, "swiglu", 4096, 4.0)
    assert model.config["pos_interp_offset"] == 0.1 and not model.config["pos_interp_antialias"]
    v3 = make_state("dinov3", dim=1024, depth=1, patch=16, heads=16, registers=4)  # ViT-L/16: 16 periods
    cfg = backbone_from_state_dict(v3).config
    assert (cfg["num_heads"], cfg["pos_embed"], cfg["rope_base"], cfg["norm_eps"], cfg["num_registers"]) == \
        (16, "rope", 100.0, 1e-5, 4)
    t = make_state("timm", dim=768, depth=1, patch=16, grid=14, layerscale=False)
    cfg = backbone_from_state_dict(t).config
    assert (cfg["num_heads"], cfg["pos_embed_grid"], cfg["layerscale_init"]) == (12, 14, None)


# ------------------------------------------------------------------ containers
def _forward(model, p: int = 14) -> torch.Tensor:
    torch.manual_seed(1)
    with torch.no_grad():
        return model.forward_features(torch.randn(1, 3, 3 * p, 2 * p))["patches"]


def test_wrapped_prefixed_and_chunked_checkpoints(tmp_path):
    sd = make_state("dinov2", registers=4)
    expected = _forward(backbone_from_state_dict(sd, num_heads=HEADS))
    other = make_state("dinov2", registers=4, seed=5)
    chunked = {k.replace("blocks.1.", "blocks.1.1.").replace("blocks.0.", "blocks.0.0."): v for k, v in sd.items()}
    wrapped = {
        "teacher": {**{f"backbone.{k}": v for k, v in sd.items()}, "dino_head.mlp.0.weight": torch.zeros(3, 3)},
        "model": {**{f"student.backbone.{k}": v for k, v in other.items()},
                  **{f"teacher.backbone.{k}": v for k, v in sd.items()}},
        "state_dict": {f"module.{k}": v for k, v in chunked.items()},
    }
    for name, obj in wrapped.items():
        torch.save({name: obj, "iteration": 7}, tmp_path / f"{name}.pth")
        model = load_backbone(tmp_path / f"{name}.pth", num_heads=HEADS)
        assert torch.equal(_forward(model), expected), name


# ------------------------------------------------------------------ errors
def test_truncated_file_is_a_clear_error(tmp_path):
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(make_state("dinov2"), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"dinov2_vits14_pretrain\.pth.*truncated"):
        load_backbone(path, num_heads=HEADS)


def test_unexpected_and_missing_keys_are_named(tmp_path):
    sd = make_state("dinov3", patch=16, registers=4)
    sd["blocks.1.attn.q_norm.weight"] = torch.ones(DIM)
    del sd["blocks.1.norm2.bias"]
    path = tmp_path / "v3.pth"
    torch.save(sd, path)
    with pytest.raises(ValueError, match=r"v3\.pth") as err:
        load_backbone(path)
    assert "blocks.1.attn.q_norm.weight" in str(err.value) and "blocks.1.norm2.bias" in str(err.value)
    # timm classifier heads are ignorable, other strays are not
    t = make_state("timm", patch=16)
    backbone_from_state_dict(t, num_heads=HEADS)
    t["dist_token"] = torch.zeros(1, 1, DIM)
    with pytest.raises(ValueError, match="dist_token"):
        backbone_from_state_dict(t, num_heads=HEADS)


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="not a ViT state dict"):
        backbone_from_state_dict({"conv1.weight": torch.zeros(8, 3, 7, 7)}, source="resnet50.pth")
    with pytest.raises(ValueError, match="expected a state dict"):
        backbone_from_state_dict([torch.zeros(1)], source="list.pth")
    with pytest.raises(ValueError, match="num_heads="):
        backbone_from_state_dict(make_state("dinov2"))  # width 64 is in no family table
    bad = make_state("dinov3", patch=16)
    bad["rope_embed.periods"] = bad["rope_embed.periods"].flip(0)
    with pytest.raises(ValueError, match="periods"):
        backbone_from_state_dict(bad)
    with pytest.raises(ValueError, match="num_heads=4"):
        backbone_from_state_dict(make_state("dinov3", patch=16), num_heads=4)
    with pytest.raises(ValueError, match="img_size"):
        backbone_from_state_dict(make_state("dinov2"), num_heads=HEADS, img_size=518)
    with pytest.raises(ValueError, match="unknown arch"):
        backbone_from_state_dict(make_state("dinov2"), arch="clip", num_heads=HEADS)
    shapes = make_state("dinov2")
    shapes["blocks.1.attn.proj.weight"] = torch.zeros(DIM, DIM + 1)
    with pytest.raises(ValueError, match=r"blocks\.1\.attn\.proj\.weight"):
        backbone_from_state_dict(shapes, num_heads=HEADS)


def test_foreign_safetensors_without_sidecar(tmp_path):
    """timm/HF ``model.safetensors`` has no veca-ssl sidecar: it goes through the converter too."""
    from safetensors.torch import save_file

    sd = make_state("timm", patch=16)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    model = load_backbone(path, num_heads=HEADS)
    assert torch.equal(_forward(model, 16), _forward(backbone_from_state_dict(sd, num_heads=HEADS), 16))
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"model\.safetensors.*truncated"):
        load_backbone(path, num_heads=HEADS)
