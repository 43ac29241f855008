"""Checkpoints of the VECA reference code: exact conversion both ways, config fields, safe loading.

The checkpoints are built here in the reference's layout (read from its model/config/loading code)
and run through an independent forward written with plain tensor ops after the reference's math:
separate q/k/v, RoPE on interleaved pairs with x on the first half of each head's pairs, (x, y)
coordinates, one explicit masked softmax over [cores; patches].
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from veca_ssl.models import build_backbone, build_from_config, load_backbone
from veca_ssl.models.io import read_backbone
from veca_ssl.models.reference import FAMILIES, convert_reference, to_reference
from veca_ssl.models.rope import patch_coords

SHAPES = {  # family: (dim, heads, hidden); "custom" is no reference family
    "small": (384, 6, 1024), "splus": (384, 6, 1536), "base": (768, 12, 2048), "large": (1024, 16, 2730),
    "custom": (256, 4, 682),
}


def reference_state(family: str, depth: int = 2, num_cores: int = 64, chunk: int = 8, patch: int = 16,
                    out_dim: int | None = None, patch_ln: bool = False, seed: int = 0) -> dict:
    """A random state dict in the reference layout, with non-trivial values everywhere."""
    dim, _, hidden = SHAPES[family]
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.05, offset=0.0):
        return torch.randn(*shape, generator=g) * scale + offset

    sd = {"patch_embed.proj.weight": rnd(dim, 3, patch, patch, scale=0.02), "patch_embed.proj.bias": rnd(dim)}
    if patch_ln:
        sd["patch_embed.norm.weight"], sd["patch_embed.norm.bias"] = rnd(dim, scale=0.1, offset=1.0), rnd(dim)
    for i in range(num_cores // chunk):
        sd[f"query_token_chunks.{i}"] = rnd(1, chunk, dim, scale=1.0 / math.sqrt(dim))
        sd[f"qcoord_chunks.{i}"] = torch.atanh(torch.rand(1, chunk, 2, generator=g) * 1.8 - 0.9)
    for i in range(depth - 1):
        sd[f"pos_linears.{i}.weight"], sd[f"pos_linears.{i}.bias"] = rnd(2, dim, scale=0.1), rnd(2, scale=0.1)
    sd["pos_alpha"] = rnd(depth - 1, scale=0.1, offset=0.2)
    for i in range(depth):
        p = f"blocks.{i}."
        for n in ("norm_attn", "norm_ffn"):
            sd[p + n + ".weight"], sd[p + n + ".bias"] = rnd(dim, scale=0.1, offset=1.0), rnd(dim, scale=0.02)
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            sd[p + f"attn.{n}.weight"], sd[p + f"attn.{n}.bias"] = rnd(dim, dim), rnd(dim, scale=0.02)
        sd[p + "fc1.weight"], sd[p + "fc1.bias"] = rnd(2 * hidden, dim), rnd(2 * hidden, scale=0.02)
        sd[p + "fc2.weight"], sd[p + "fc2.bias"] = rnd(dim, hidden), rnd(dim, scale=0.02)
    sd["final_norm.weight"], sd["final_norm.bias"] = rnd(dim, scale=0.1, offset=1.0), rnd(dim, scale=0.02)
    if out_dim is not None:
        sd["output_proj.weight"], sd["output_proj.bias"] = rnd(out_dim, dim), rnd(out_dim, scale=0.02)
    return sd


def reference_forward(sd: dict, family: str, images: torch.Tensor, k: int, chunk: int = 8,
                      p_zero: float = 0.125, zero_from: str = "low") -> tuple[torch.Tensor, torch.Tensor]:
    """The reference network in eval mode: ``(output of core 0, patch outputs)``."""
    dim, heads, _ = SHAPES[family]
    hd = dim // heads
    w = sd["patch_embed.proj.weight"]
    patch = w.shape[-1]
    b, _, h, wd = images.shape
    hp, wp = h // patch, wd // patch
    x = F.conv2d(images, w, sd["patch_embed.proj.bias"], stride=patch).flatten(2).transpose(1, 2)
    if "patch_embed.norm.weight" in sd:
        x = F.layer_norm(x, (dim,), sd["patch_embed.norm.weight"], sd["patch_embed.norm.bias"], 1e-5)
    queries = torch.cat([sd[f"query_token_chunks.{i}"] for i in range(k // chunk)], 1).expand(b, -1, -1)
    q_raw = torch.cat([sd[f"qcoord_chunks.{i}"] for i in range(k // chunk)], 1).expand(b, -1, -1)
    ys = (torch.arange(hp) + 0.5) / hp * 2 - 1
    xs = (torch.arange(wp) + 0.5) / wp * 2 - 1
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    p_img = torch.stack([gx, gy], -1).reshape(1, -1, 2).expand(b, -1, -1)  # (x, y)
    periods = 100.0 ** (2 * torch.arange(hd // 4, dtype=torch.float32) / (hd // 2))
    n_zero = int(round(p_zero * periods.numel()))
    if n_zero:
        if zero_from == "low":
            periods[-n_zero:] = float("inf")
        else:
            periods[:n_zero] = float("inf")
    x = torch.cat([queries, x], 1)
    t = x.shape[1]
    allowed = torch.zeros(t, t, dtype=torch.bool)
    allowed[:k] = True
    allowed[:, :k] = True
    depth = len({key.split(".")[1] for key in sd if key.startswith("blocks.")})

    def rope(v, cos, sin):  # interleaved pairs: (v0, v1) -> (v0 cos - v1 sin, v1 cos + v0 sin)
        rot = torch.stack([-v[..., 1::2], v[..., 0::2]], -1).flatten(-2)
        return v * cos + rot * sin

    def lin(v, name):
        return v @ sd[name + ".weight"].T + sd[name + ".bias"]

    for li in range(depth):
        if li > 0:
            q_raw = q_raw + sd["pos_alpha"][li - 1] * lin(x[:, :k], f"pos_linears.{li - 1}")
        coords = torch.cat([torch.tanh(q_raw), p_img], 1)
        ang_x = (2 * math.pi * coords[..., :1] / periods).repeat_interleave(2, -1)
        ang_y = (2 * math.pi * coords[..., 1:] / periods).repeat_interleave(2, -1)
        ang = torch.cat([ang_x, ang_y], -1)[:, None]  # (B, 1, T, hd)
        cos, sin = ang.cos(), ang.sin()
        p = f"blocks.{li}."
        y = F.layer_norm(x, (dim,), sd[p + "norm_attn.weight"], sd[p + "norm_attn.bias"], 1e-5)
        q, kk, v = (lin(y, p + f"attn.{n}_proj").view(b, t, heads, hd).transpose(1, 2) for n in "qkv")
        q, kk = rope(q, cos, sin), rope(kk, cos, sin)
        scores = (q @ kk.transpose(-1, -2)) / math.sqrt(hd)
        out = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v
        x = x + lin(out.transpose(1, 2).reshape(b, t, dim), p + "attn.out_proj")
        y = F.layer_norm(x, (dim,), sd[p + "norm_ffn.weight"], sd[p + "norm_ffn.bias"], 1e-5)
        u, g = lin(y, p + "fc1").chunk(2, -1)
        x = x + lin(F.silu(u) * g, p + "fc2")
    x = F.layer_norm(x, (dim,), sd["final_norm.weight"], sd["final_norm.bias"], 1e-5)
    if "output_proj.weight" in sd:
        x = lin(x, "output_proj")
    return x[:, 0], x[:, k:]


def checkpoint(sd: dict, family: str, wrap: str, **config) -> object:
    """The file layouts the reference produces (or that its loader accepts)."""
    if wrap == "bare":
        return sd
    prefix = {"plain": "", "module": "module.", "student": "student.", "module.student": "module.student."}[wrap]
    cfg = dict(FAMILIES[family], model_family=family, nested_chunk_size=8, lr=4e-4, base_seed=42,
               nested_budgets=(8, 16, 24, 32, 40, 48, 56, 64), resize_short_by_res={256: 288},
               init_patch_from_dinov3=True)
    cfg.update(config)
    return {"student": {prefix + k: v for k, v in sd.items()}, "config": cfg, "epoch": 3,
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]}}


CASES = [  # family, output projection, wrapping, extra reference fields
    ("small", 768, "module.student", {"distill_output_dim": 768}),
    ("small", None, "bare", {}),
    ("base", None, "student", {}),
    ("large", 768, "module", {"distill_output_dim": 768}),
    ("splus", None, "plain", {}),
]


@pytest.mark.parametrize("family,out_dim,wrap,extra", CASES)
def test_converted_model_equals_the_reference_forward(tmp_path, family, out_dim, wrap, extra):
    sd = reference_state(family, depth=2, out_dim=out_dim, seed=len(family))
    path = tmp_path / "ref.pt"
    torch.save(checkpoint(sd, family, wrap, **extra), path)
    loaded = read_backbone(path)
    model = loaded.model
    assert loaded.fmt == "veca-reference" and model.embed_dim == SHAPES[family][0]
    assert model.num_heads == SHAPES[family][1] and model.ffn_hidden == SHAPES[family][2]
    assert model.teacher_dim == out_dim and model.budgets == tuple(range(8, 65, 8))
    images = torch.randn(2, 3, 48, 80, generator=torch.Generator().manual_seed(1))  # 3x5 patches
    if family == "large":
        # two float32 summation orders of this random 1024-d network differ by up to 3.1e-5 absolute
        # (outputs up to 7.3): within 1e-5 *relative* to the largest output in float32, and in float64
        # the conversion's exactness shows against the absolute 1e-5 below (our RoPE angles stay float32)
        with torch.no_grad():
            for k in (8, 24):
                cls_ref, patches_ref = reference_forward(sd, family, images, k)
                out = model.forward_features(images, num_cores=k, space="teacher" if out_dim else "native")
                for got, ref in ((out["cls"], cls_ref), (out["patches"], patches_ref)):
                    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max(), (family, k)
        sd = {k: v.double() for k, v in sd.items()}
        model, images = model.double(), images.double()
    with torch.no_grad():
        for k in (8, 24):
            cls_ref, patches_ref = reference_forward(sd, family, images, k)
            out = model.forward_features(images, num_cores=k, space="teacher" if out_dim else "native")
            assert (out["cls"] - cls_ref).abs().max() <= 1e-5, (family, k)
            assert (out["patches"] - patches_ref).abs().max() <= 1e-5, (family, k)
            assert out["patches"].shape == (2, 15, out_dim or SHAPES[family][0])
            if out_dim:  # native features are the ones before the projection, at the model's own width
                native = model.forward_features(images, num_cores=k)
                proj = native["patches"] @ sd["output_proj.weight"].T + sd["output_proj.bias"]
                assert torch.allclose(proj, out["patches"], atol=1e-5) and native["cls"].shape == (2, model.embed_dim)


def test_patch_layernorm_high_frequency_zeroing_and_eight_core_chunks_of_sixteen(tmp_path):
    sd = reference_state("small", depth=3, num_cores=32, chunk=16, patch=8, patch_ln=True, seed=5)
    ckpt = checkpoint(sd, "small", "plain", patch_embed_use_ln=True, rope_zero_freqs_from="high",
                      rope_p_zero_freqs=0.25, nested_budgets=(16, 32), patch_size=8)
    ckpt["config"]["nested_chunk_size"] = 16
    conv = convert_reference(ckpt)
    assert conv.config["patch_norm"] and conv.config["rope_zero_from"] == "high" and conv.config["core_chunk"] == 16
    model = build_from_config({"arch": "veca", **conv.config})
    model.load_state_dict(conv.state)
    model.eval()
    images = torch.randn(1, 3, 24, 40)
    with torch.no_grad():
        for k in (16, 32):
            cls_ref, patches_ref = reference_forward(sd, "small", images, k, chunk=16, p_zero=0.25, zero_from="high")
            out = model.forward_features(images, num_cores=k)
            assert (out["cls"] - cls_ref).abs().max() <= 1e-5
            assert (out["patches"] - patches_ref).abs().max() <= 1e-5
    assert any("num_query_tokens: the weights hold 32" in n for n in conv.notes)


def test_training_time_fields_map_to_our_coordinate_augmentation():
    sd = reference_state("small", depth=2, seed=2)
    conv = convert_reference(checkpoint(sd, "small", "plain", rope_shift_coords=0.1, rope_rescale_coords=1.5,
                                        rope_jitter_coords=1.2))
    assert conv.config["coord_shift"] == 0.1 and conv.config["coord_jitter"] == 1.2
    assert conv.config["coord_rescale"] == pytest.approx((1 / 1.5, 1.5))
    off = convert_reference(checkpoint(sd, "small", "plain", rope_shift_coords=None, rope_rescale_coords=None))
    assert off.config["coord_shift"] == 0.0 and off.config["coord_rescale"] == (1.0, 1.0)
    model = build_from_config({"arch": "veca", **conv.config}).train()
    torch.manual_seed(0)
    # one draw per batch (the reference's rule): 1000 batches of one image
    a = torch.cat([model._patch_coords(1, (4, 4), "cpu") for _ in range(1000)])
    b = model._patch_coords(5, (4, 4), "cpu")
    assert b.shape[0] == 1  # a whole batch shares its augmentation
    # shift (|s| <= 0.1), then per-axis jitter in [1/1.2, 1.2], then one rescale in [1/1.5, 1.5]: the
    # extent of the 4x4 cell centres (1.5 on each axis) becomes 1.5 * jitter_axis * scale
    extent = a.amax(1) - a.amin(1)  # (1000, 2)
    lo, hi = 1.5 / 1.2 / 1.5, 1.5 * 1.2 * 1.5
    assert extent.min() >= lo - 1e-5 and extent.max() <= hi + 1e-5
    assert extent.max() > 1.5 * 1.4 and extent.min() < 1.5 / 1.4  # the ranges are used
    aspect = extent[:, 1] / extent[:, 0]  # x over y: only the per-axis jitter changes it
    assert aspect.max() > 1.2 and aspect.min() < 1 / 1.2 and aspect.max() <= 1.44 + 1e-5
    model.eval()
    assert torch.equal(model._patch_coords(3, (4, 4), "cpu"), patch_coords((4, 4))[None])


@pytest.mark.parametrize("field,value,message", [
    ("model_family", "huge", r"model_family='huge' is not a reference family; valid: small, splus, base, large"),
    ("model_family", "base", r"model_family='base' means hidden_dim 768, but the weights are 384-wide"),
    ("model_family", "splus", r"model_family='splus' means mlp_ratio 4.0 \(SwiGLU hidden 1536\)"),
    ("patch_size", 14, r"config patch_size=14 but patch_embed.proj.weight is 16x16"),
    ("in_channels", 1, r"config in_channels=1 but patch_embed.proj.weight takes 3 channels"),
    ("nested_chunk_size", 16, r"config nested_chunk_size=16 but each query_token_chunks.i holds 8"),
    ("matryoshka_chunk_size", 4, r"config nested_chunk_size=4"),
    ("patch_embed_use_ln", True, r"config patch_embed_use_ln=True but the weights lack patch_embed.norm"),
    ("rope_zero_freqs_from", "middle", r"config rope_zero_freqs_from='middle' is not 'low' or 'high'"),
    ("distill_output_dim", 1024, r"config distill_output_dim=1024 but the weights lack output_proj"),
    ("nested_budgets", (8, 12), r"config nested_budgets=\(8, 12\) must be multiples of the chunk size 8"),
    ("rope_rescale_coords", 0.0, r"config rope_rescale_coords=0.0 must be None or > 0"),
])
def test_an_unrepresentable_field_fails_with_its_name(tmp_path, field, value, message):
    ckpt = checkpoint(reference_state("small", depth=1), "small", "plain")
    ckpt["config"][field] = value
    path = tmp_path / "bad.pt"
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match=message):
        load_backbone(path)


def test_unknown_config_fields_are_reported_and_the_wrapper_teacher_is_skipped():
    sd = reference_state("small", depth=1)
    ckpt = checkpoint(sd, "small", "plain", some_future_field=3)
    ckpt["student"].update({"teacher.embeddings.weight": torch.zeros(2)})
    conv = convert_reference(ckpt, "f.pt")
    assert any("some_future_field" in n for n in conv.notes)
    assert any("teacher" in n for n in conv.notes)
    with pytest.raises(ValueError, match=r"unexpected keys for the reference VECA layout: \['blocks.0.attn.extra'\]"):
        convert_reference({**sd, "blocks.0.attn.extra": torch.zeros(1)}, "f.pt")
    custom = reference_state("custom", depth=2, seed=4)
    with pytest.raises(ValueError, match="matches no reference family.*pass num_heads= to load it"):
        convert_reference(custom)
    conv = convert_reference(custom, num_heads=4)
    model = build_from_config({"arch": "veca", **conv.config})
    model.load_state_dict(conv.state)
    images = torch.randn(1, 3, 32, 16)
    with torch.no_grad():
        cls_ref, _ = reference_forward(custom, "custom", images, 16)
        assert (model.eval().forward_features(images, num_cores=16)["cls"] - cls_ref).abs().max() <= 1e-5


# ---------------------------------------------------------------- writing the reference layout
def test_reference_to_ours_to_reference_is_the_identity(tmp_path):
    sd = reference_state("large", depth=2, out_dim=768, seed=3)
    path = tmp_path / "ref.pt"
    torch.save(checkpoint(sd, "large", "module.student", distill_output_dim=768), path)
    model = load_backbone(path)
    ckpt, notes = to_reference(model, strict=False)
    assert set(ckpt["student"]) == set(sd)
    for key, value in sd.items():
        assert torch.equal(ckpt["student"][key], value), key
    assert ckpt["config"]["model_family"] == "large" and ckpt["config"]["distill_output_dim"] == 768
    # and our model -> reference file -> our model gives back every tensor
    out = tmp_path / "again.pt"
    torch.save(ckpt, out)
    again = load_backbone(out)
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    assert again.config == model.config


def test_our_model_with_layerscale_and_no_qkv_bias_exports_to_the_same_function(tmp_path):
    torch.manual_seed(0)
    model = build_backbone("veca_small", depth=2, layerscale_init=0.3, qkv_bias=False, output_dim=768,
                           patch_norm=True).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ckpt, notes = to_reference(model, strict=False)
    assert "layer-scale folded" in " ".join(notes)
    path = tmp_path / "r.pt"
    torch.save(ckpt, path)
    images = torch.randn(2, 3, 32, 64)
    cls_ref, patches_ref = reference_forward(ckpt["student"], "small", images, 16)  # the reference's math
    with torch.no_grad():
        ours = model.forward_features(images, num_cores=16, space="teacher")
        back = load_backbone(path).forward_features(images, num_cores=16, space="teacher")
    assert (ours["cls"] - cls_ref).abs().max() <= 1e-5 and (ours["patches"] - patches_ref).abs().max() <= 1e-5
    assert (ours["patches"] - back["patches"]).abs().max() <= 1e-5


def test_full_size_small_export_is_strict_and_wrong_models_are_refused_by_name():
    torch.manual_seed(0)
    small = build_backbone("veca_small")
    ckpt, _ = to_reference(small)  # strict: the reference's own family preset rebuilds this exactly
    cfg = ckpt["config"]
    assert (cfg["model_family"], cfg["num_layers"], cfg["num_query_tokens"]) == ("small", 12, 64)
    assert len(ckpt["student"]) == 4 + 16 + 11 * 2 + 1 + 12 * 16
    # what the reference's normalize_nested_settings asserts of a config it loads
    budgets, weights = cfg["nested_budgets"], cfg["nested_budget_weights"]
    assert list(budgets) == sorted(set(budgets)) and budgets[-1] == cfg["num_query_tokens"]
    assert all(b % cfg["nested_chunk_size"] == 0 for b in budgets) and len(weights) == len(budgets)
    assert cfg["init_patch_from_dinov3"] is False  # nothing is fetched when the reference loads it
    with pytest.raises(ValueError, match=r"depth=2 \(the reference's 'small' family has 12 blocks"):
        to_reference(build_backbone("veca_small", depth=2))
    with pytest.raises(ValueError, match=r"norm_eps=1e-06"):
        to_reference(build_backbone("veca_small", depth=2, norm_eps=1e-6), strict=False)
    with pytest.raises(ValueError, match=r"embed_dim=192, num_heads=3.*match no reference family"):
        to_reference(build_backbone("veca_tiny", depth=2), strict=False)
    with pytest.raises(ValueError, match=r"ffn_layer='mlp'"):
        to_reference(build_backbone("veca_small", depth=2, ffn_layer="mlp"), strict=False)
    with pytest.raises(ValueError, match=r"coord_rescale=\[0.5, 1.5\]"):
        to_reference(build_backbone("veca_small", depth=2, coord_rescale=(0.5, 1.5)), strict=False)
    with pytest.raises(ValueError, match=r"VECA backbones only"):
        to_reference(build_backbone("vit_small", depth=1))


# ---------------------------------------------------------------- presets, old configs, safe loading
def test_presets_use_reference_numbers_and_old_configs_keep_their_shapes():
    large = build_backbone("veca_large", depth=1)
    assert large.ffn_hidden == 2730 and large.norm.eps == 1e-5 and large.blocks[0].norm1.eps == 1e-5
    assert build_backbone("vit_large", depth=1).ffn_hidden == 2730
    assert [build_backbone(f"veca_{f}", depth=1).ffn_hidden for f in ("tiny", "small", "base")] == [512, 1024, 2048]
    # a config saved before ffn_align existed (norm_eps 1e-6 stored, SwiGLU rounded up to 8)
    old = {k: v for k, v in large.config.items() if k not in ("ffn_align", "ffn_hidden", "output_dim",
                                                                "patch_norm", "coord_jitter", "rope_zero_from")}
    old["norm_eps"] = 1e-6
    rebuilt = build_from_config(old)
    assert rebuilt.ffn_hidden == 2736 and rebuilt.blocks[0].mlp.w3.weight.shape == (1024, 2736)
    assert rebuilt.norm.eps == 1e-6 and rebuilt.config["ffn_align"] == 8
    old_vit = {k: v for k, v in build_backbone("vit_large", depth=1).config.items() if k not in ("ffn_align",
                                                                                                   "ffn_hidden")}
    assert build_from_config(old_vit).ffn_hidden == 2736


class _Opaque:  # an object the weights-only unpickler must refuse
    pass


def test_loading_never_unpickles_objects_and_says_how_to_proceed(tmp_path):
    ckpt = checkpoint(reference_state("small", depth=1), "small", "plain")
    ckpt["config"]["extra_object"] = _Opaque()
    path = tmp_path / "pickled.pt"
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match=r"pickled Python objects \(.*_Opaque\).*never unpickles.*weights_only=False.*tensors and plain values alone"):
        load_backbone(path)


def test_files_that_are_not_checkpoints_are_named_without_advising_to_unpickle(tmp_path):
    import tarfile

    (tmp_path / "a.txt").write_text("hi")
    with tarfile.open(tmp_path / "shard-000000.tar", "w") as tar:  # a WebDataset shard given by mistake
        tar.add(tmp_path / "a.txt", arcname="a.txt")
    (tmp_path / "noise.pt").write_bytes(torch.randint(0, 256, (2000,), generator=torch.Generator().manual_seed(0),
                                                      dtype=torch.uint8).numpy().tobytes())
    for name, why in (("shard-000000.tar", "a tar archive, not a checkpoint"),
                      ("noise.pt", "not a torch checkpoint file")):
        with pytest.raises(ValueError) as err:
            load_backbone(tmp_path / name)
        text = str(err.value)
        assert text.startswith(f"cannot read checkpoint {tmp_path / name}: ") and why in text, text
        assert "weights_only" not in text and "pickled Python objects" not in text, text


def test_eval_knn_in_the_teacher_space_of_a_distilled_reference_model(tmp_path):
    """``veca eval knn --features teacher`` classifies with the output projection's features: its top-1
    equals an independent k-NN on ``forward_features(space="teacher")``, not on the native features."""
    import json

    from eval.cli import main as eval_main
    from eval.common import build_eval_dataset
    from veca_ssl.knn import knn_classify

    sd = reference_state("small", depth=1, out_dim=768, seed=9)
    path = tmp_path / "distilled.pt"
    torch.save(checkpoint(sd, "small", "plain", distill_output_dim=768), path)
    spec = "synthetic:n=40,val_n=40,size=32,classes=4,seed=3"
    model = load_backbone(path).eval()
    data = {s: build_eval_dataset(f"{spec}@{s}", 32) for s in ("train", "val")}
    images = {s: torch.stack([x for x, _ in d]) for s, d in data.items()}
    labels = {s: torch.tensor([int(y) for _, y in d]) for s, d in data.items()}
    expected = {}
    with torch.no_grad():
        for space in ("native", "teacher"):
            f = {s: model.forward_features(images[s], num_cores=16, space=space)["cls"] for s in images}
            expected[space] = knn_classify(f["train"], labels["train"], f["val"], labels["val"], ks=[1])["knn_k1_top1"]
    assert expected["native"] != expected["teacher"]  # the check below can tell the two spaces apart
    for space in ("native", "teacher"):
        assert eval_main(["knn", "--checkpoint", str(path), "--features", space, "--train", f"{spec}@train", "--test",
                          f"{spec}@val", "--resolution", "32", "--widths", "16", "--ks", "1", "--no-speed",
                          "--no-progress", "--bootstrap", "0", "--output-dir", str(tmp_path / space)]) == 0
        row = json.loads((tmp_path / space / "knn" / "report.json").read_text())["rows"][0]
        assert row["knn_k1_top1"] == pytest.approx(expected[space]), space


def test_teacher_space_needs_an_output_projection():
    model = build_backbone("veca_tiny", depth=1)
    with pytest.raises(ValueError, match="has none: use the native features"):
        model.set_feature_space("teacher")
    with pytest.raises(ValueError, match="feature space 'proj'"):
        model.forward_features(torch.randn(1, 3, 16, 16), space="proj")


def test_extract_with_native_or_teacher_features_of_a_distilled_reference_model(tmp_path, capsys):
    from eval.common import build_eval_dataset
    from eval.extract import main, read_features
    from veca_ssl.models import save_backbone

    sd = reference_state("small", depth=1, out_dim=768, seed=9)
    path = tmp_path / "distilled.pt"
    torch.save(checkpoint(sd, "small", "plain", distill_output_dim=768), path)
    common = ["--checkpoint", str(path), "--data", "synthetic:n=6,size=32,classes=2,seed=0", "--resolution", "32",
              "--width", "16", "--batch-size", "3", "--no-progress"]
    dims = {}
    for space in ("native", "teacher"):
        assert main(common + ["--features", space, "--output-dir", str(tmp_path / space)]) == 0
        dims[space] = read_features(tmp_path / space)["image"].shape
    assert dims == {"native": (6, 384), "teacher": (6, 768)}
    model = load_backbone(path)
    images = torch.stack([x for x, _ in build_eval_dataset("synthetic:n=6,size=32,classes=2,seed=0", 32)])
    with torch.no_grad():
        expected = model.forward_features(images, num_cores=16, space="teacher")["cls"]
    got = torch.from_numpy(read_features(tmp_path / "teacher")["image"]).float()
    assert torch.allclose(got, expected, atol=1e-5)
    plain = tmp_path / "plain.safetensors"
    save_backbone(build_backbone("veca_tiny", patch_size=8, embed_dim=32, num_heads=2, depth=1), plain)
    capsys.readouterr()
    assert main(["--checkpoint", str(plain), "--data", "synthetic:n=2,size=16", "--features", "teacher",
                 "--output-dir", str(tmp_path / "x")]) == 2  # a user error: one line, no traceback
    err = capsys.readouterr().err
    assert "--features teacher: teacher-space features need an output projection" in err and "Traceback" not in err
