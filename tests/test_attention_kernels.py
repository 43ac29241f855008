"""Every attention call of every preset hands SDPA inputs its fused kernels take, and the kernel that
ran is read from the profiler.

The conditions (``veca_ssl.models.sdpa.kernel_blockers``) are PyTorch's own for the CUDA flash and
memory-efficient kernels, checked here on the tensors that actually reach
``F.scaled_dot_product_attention`` (captured by a spy) on the CPU, in fp32 and under bf16 autocast. The
checker is itself checked: against deliberately broken inputs and models, and against the kernel the
CPU really runs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from veca_ssl.models import build_backbone, list_backbones
from veca_ssl.models.fixed_width import fixed_width
from veca_ssl.models.kernels import attention_kernels, classify_events, kernel_family, probe_attention
from veca_ssl.models.sdpa import SDPACall, capture_sdpa, kernel_blockers

CAPABILITIES = [(8, 0), (8, 6), (9, 0)]  # A100, consumer Ampere (its flash-backward rule), H100/H200
SIZE = (48, 80)  # non-square: 3 x 5 patches of 16 px
WIDTHS = (8, 32, 64)
DTYPE_RULE = "check_dtypes_flash_attention"


def _variants(name: str) -> list[tuple[str, dict]]:
    """The preset as built, plus for dense ViTs the DINOv3 layout (RoPE, registers left unrotated)."""
    out = [(name, {})]
    if name.startswith("vit_"):
        out.append((f"{name}+rope+registers", {"pos_embed": "rope", "num_registers": 4}))
    return out


def _calls(model, bf16: bool, width: int | None) -> list[SDPACall]:
    """The SDPA calls of one training-mode forward (grad on) at ``width``, fp32 or bf16 autocast."""
    images = torch.randn(2, 3, *SIZE)
    kwargs = {} if width is None else {"num_cores": width}
    with capture_sdpa() as calls, torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        model.train().forward_features(images, **kwargs)
    return calls


def assert_eligible(calls: list[SDPACall], bf16: bool, expected_calls: int) -> None:
    """Under bf16 no flash/efficient condition fails on any GPU of ``CAPABILITIES``; in fp32 only
    flash's dtype rule does (fp32 is the efficient kernel's, never flash's)."""
    assert len(calls) == expected_calls, f"{len(calls)} SDPA calls, expected {expected_calls}: a path bypassed SDPA"
    for call in calls:
        assert not call.has_mask, call.describe()
        assert kernel_blockers(call, "flash_cpu") == [], call.describe()
        for cap in CAPABILITIES:
            assert kernel_blockers(call, "efficient", cap) == [], (cap, call.describe())
            flash = kernel_blockers(call, "flash", cap)
            if bf16:
                assert flash == [], (cap, call.describe(), flash)
            else:
                assert [r.split(":")[0] for r in flash] == [DTYPE_RULE], (cap, call.describe(), flash)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("preset", list_backbones())
def test_every_preset_hands_sdpa_inputs_the_fused_kernels_take(preset, bf16):
    torch.manual_seed(0)
    for _, overrides in _variants(preset):
        model = build_backbone(preset, depth=1, **overrides)
        if model.is_elastic:
            for width in WIDTHS:
                assert_eligible(_calls(model, bf16, width), bf16, expected_calls=2)  # cores, then patches
            # the deployment form at one width (real-arithmetic RoPE for ONNX) too
            deployed = fixed_width(model.eval(), 16)
            with capture_sdpa() as calls, torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16,
                                                                           enabled=bf16):
                deployed(torch.randn(1, 3, *SIZE))
            assert_eligible(calls, bf16, expected_calls=2)
        else:
            assert_eligible(_calls(model, bf16, None), bf16, expected_calls=1)


# ------------------------------------------------------------------ the check cannot pass vacuously
def _tiny(**overrides):
    return build_backbone("veca_tiny", depth=1, embed_dim=64, num_heads=2, num_cores=16, **overrides)


def test_the_preset_check_fails_when_rope_hands_sdpa_fp32_queries(monkeypatch):
    """The bug class to guard against: a RoPE rotation that returns fp32 q/k next to a bf16 v (autocast
    would copy them back to bf16 inside SDPA; no fused kernel takes mixed dtypes)."""
    import veca_ssl.models.attention as attention

    rotate = attention.apply_rope_pairs
    model = _tiny()
    assert_eligible(_calls(model, True, 16), True, 2)  # as shipped
    monkeypatch.setattr(attention, "apply_rope_pairs", lambda x, f: rotate(x, f).float())
    calls = _calls(model, True, 16)
    assert {(c.q_dtype, c.k_dtype, c.v_dtype) for c in calls} == {(torch.float32, torch.float32, torch.bfloat16)}
    with pytest.raises(AssertionError):
        assert_eligible(calls, True, 2)


def test_the_preset_check_fails_on_a_mask_and_on_a_strided_head_dim(monkeypatch):
    with pytest.raises(AssertionError):  # one masked call over the full sequence: a materialised bias
        assert_eligible(_calls(_tiny(attn_backend="sdpa_masked"), True, 16), True, 1)
    import veca_ssl.models.attention as attention

    sdpa = attention._sdpa

    def strided(q, k, v, backend, mask=None):  # same values, head dim no longer contiguous
        return sdpa(q.transpose(-1, -2).contiguous().transpose(-1, -2), k, v, backend, mask)

    monkeypatch.setattr(attention, "_sdpa", strided)
    calls = _calls(_tiny(), True, 16)
    assert all(c.q_stride[-1] != 1 for c in calls)
    with pytest.raises(AssertionError):
        assert_eligible(calls, True, 2)


def _call(q, k, v, **options) -> SDPACall:
    with capture_sdpa() as calls:
        F.scaled_dot_product_attention(q, k, v, **options)
    assert len(calls) == 1
    return calls[0]


def _rules(call: SDPACall, kernel: str, cap=(9, 0)) -> set[str]:
    return {r.split(":")[0] for r in kernel_blockers(call, kernel, cap)}


def test_each_condition_names_the_pytorch_check_it_mirrors():
    bf = dict(dtype=torch.bfloat16)
    q, kv = torch.randn(1, 2, 5, 64, **bf), torch.randn(1, 2, 7, 64, **bf)
    good = _call(q, kv, kv)
    assert _rules(good, "flash") == _rules(good, "efficient") == _rules(good, "flash_cpu") == set()
    strided = _call(q.transpose(-1, -2).contiguous().transpose(-1, -2), kv, kv)
    assert _rules(strided, "flash") == {"check_last_dim_stride_equals_1_dense"} == _rules(strided, "efficient")
    masked = _call(q, kv, kv, attn_mask=torch.ones(5, 7, dtype=torch.bool))
    assert _rules(masked, "flash") == {"check_for_attn_mask"}
    assert any("materialised bias" in r for r in kernel_blockers(masked, "efficient"))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast lets SDPA take the mix (with a copy)
        mixed = _call(q.float(), kv.float(), kv)
    assert _rules(mixed, "flash") == {DTYPE_RULE}
    assert _rules(mixed, "efficient") == {"can_use_mem_efficient_attention dtypes"}
    odd = _call(torch.randn(1, 2, 5, 36, **bf), torch.randn(1, 2, 7, 36, **bf), torch.randn(1, 2, 7, 36, **bf))
    assert _rules(odd, "flash") == {"pad_last_dim<8>"}
    assert _rules(odd, "efficient") == {"check_head_dim_size_mem_efficient"}  # bf16 needs multiples of 8
    big = [torch.randn(1, 1, 3, 320, **bf) for _ in range(3)]
    assert _rules(_call(*big), "flash") == {"check_head_dim_size_flash"}
    heads = _call(q, torch.randn(1, 1, 7, 64, **bf), torch.randn(1, 1, 7, 64, **bf), enable_gqa=False)
    assert _rules(heads, "flash") == {"check_batch_size_and_num_heads_dense"}
    assert _rules(_call(q, torch.randn(1, 1, 7, 64, **bf), torch.randn(1, 1, 7, 64, **bf), enable_gqa=True),
                  "flash") == set()
    flat = torch.randn(3 + 2 * 5 * 64, **bf)
    shifted = flat[3:].view(1, 2, 5, 64)  # storage offset 3: not 16-byte aligned for bf16
    assert _rules(_call(shifted, q, q), "efficient") == {"check_data_ptr_alignment_mem_efficient"}
    assert _rules(_call(shifted, q, q), "efficient", (7, 5)) == {"can_use_mem_efficient_attention dtypes"}
    assert _rules(good, "flash", (7, 5)) == {"check_flash_attention_hardware_support", DTYPE_RULE}
    dropped = _call(q, kv, kv, dropout_p=0.5)
    assert _rules(dropped, "flash_cpu") == {"check_for_dropout"} and _rules(dropped, "flash") == set()
    with pytest.raises(ValueError, match="unknown SDPA kernel"):
        kernel_blockers(good, "cutlass")


@pytest.mark.parametrize("case", ["fp32", "bf16", "strided", "dropout", "mask", "bad-mask", "gqa", "3d"])
def test_the_cpu_verdict_matches_the_kernel_the_cpu_runs(case, monkeypatch):
    """Ground truth on this machine: the CPU's fused kernel runs exactly when ``flash_cpu`` has no
    blocker (the shared rules — shapes, strides, head dims, dtypes — are the ones the CUDA kernels use)."""
    from torch.autograd.profiler import profile

    monkeypatch.setenv("KINETO_LOG_LEVEL", "6")  # no profiler_start/stop lines on stderr
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 6, 32), torch.randn(2, 4, 9, 32), torch.randn(2, 4, 9, 32)
    options: dict = {}
    if case == "bf16":
        q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    elif case == "strided":
        k = k.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif case == "dropout":
        options["dropout_p"] = 0.3
    elif case == "mask":
        options["attn_mask"] = torch.rand(6, 9) > 0.3
    elif case == "bad-mask":
        options["attn_mask"] = torch.zeros(1, 6, 9)  # 3-D: broadcastable, but not a shape the kernel takes
    elif case == "gqa":
        k, v, options["enable_gqa"] = k[:, :2], v[:, :2], True
    elif case == "3d":
        q, k, v = q[0], k[0], v[0]
    with capture_sdpa() as calls, profile() as prof:
        F.scaled_dot_product_attention(q, k, v, **options)
    ran = set(classify_events((e.name, False) for e in prof.function_events))
    eligible = kernel_blockers(calls[0], "flash_cpu") == []
    assert ran == ({"flash"} if eligible else {"math"}), (case, ran, kernel_blockers(calls[0], "flash_cpu"))
    assert case in ("fp32", "bf16", "mask", "gqa") or not eligible  # the broken cases really are broken


# ------------------------------------------------------------------------------ what ran, logged
def test_attention_kernels_reads_the_kernel_that_ran():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = _tiny()
    assert attention_kernels(model, "cpu", torch.bfloat16) == {"flash"}
    assert attention_kernels(build_backbone("vit_tiny", depth=1), "cpu") == {"flash"}
    with sdpa_kernel(SDPBackend.MATH):
        assert attention_kernels(model, "cpu", torch.bfloat16) == {"math"}
    assert attention_kernels(_tiny(attn_backend="math"), "cpu") == set()  # explicit matmuls: no SDPA kernel
    report = probe_attention(model, "cpu", torch.bfloat16, image_size=(32, 48))
    assert report.image_size == (32, 48) and len(report.calls) == 2 and report.blockers == {}
    assert report.describe() == ("attention: attn_backend=auto -> sdpa, ran flash "
                                 "(aten::_scaled_dot_product_flash_attention_for_cpu) on cpu, bfloat16 autocast, "
                                 "32x48 px")


def test_the_probe_leaves_the_callers_random_streams_alone():
    model = _tiny()
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    probe_attention(model, "cpu", torch.bfloat16)
    assert torch.equal(torch.rand(4), expected)


@pytest.mark.parametrize("name, device_kernel, family", [
    ("aten::_scaled_dot_product_flash_attention", False, "flash"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", False, "flash"),
    ("aten::_scaled_dot_product_efficient_attention", False, "efficient"),
    ("aten::_scaled_dot_product_cudnn_attention", False, "cudnn"),
    ("aten::_scaled_dot_product_attention_math", False, "math"),
    ("aten::scaled_dot_product_attention", False, None),  # the dispatcher, not a kernel
    ("xformers::efficient_attention_forward_cutlass", False, "xformers"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4, false, false, "
     "cutlass::bfloat16_t, Flash_kernel_traits<64, 128, 128, 4, cutlass::bfloat16_t> >, false, false, false, "
     "false, true, true, false, false>(pytorch_flash::Flash_fwd_params)", True, "flash"),
    ("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<...>(pytorch_flash::Flash_bwd_params)",
     True, "flash"),
    ("fmha_cutlassF_bf16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel<cutlass::bfloat16_t, "
     "cutlass::arch::Sm80, true, 64, 64, 64, true, true>::Params)", True, "efficient"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64_4x1x1_kernel0_0", True,
     "cudnn"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_"
     "kernel__5x_cublas", True, None),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>, at::detail::Array<char*, "
     "1> >(int, at::native::FillFunctor<float>, at::detail::Array<char*, 1>)", True, None),
    ("flash_fwd_kernel", False, None),  # a CPU-side name is only trusted when it is an ATen op
])
def test_profiler_names_map_to_kernel_families(name, device_kernel, family):
    assert kernel_family(name, device_kernel) == family


def test_training_logs_the_kernel_that_ran_once(tmp_path, capsys):
    from test_train import tiny_cfg  # tests/ is on sys.path

    from veca_ssl.train.loop import train

    train(tiny_cfg(tmp_path, "train.max_steps=2", "train.knn_monitor.enabled=false"))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("attention:")]
    assert lines == ["attention: attn_backend=auto -> sdpa, ran flash "
                     "(aten::_scaled_dot_product_flash_attention_for_cpu) on cpu, float32, 32x32 px"]
