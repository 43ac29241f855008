"""Teacher patch-grid resampling and the distillation loss against direct formulas."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from veca_ssl.loss import DistillationLoss, resample_patch_grid


def _affine_map(grid: tuple[int, int], patch: tuple[float, float], coeffs: torch.Tensor) -> torch.Tensor:
    """(1, H*W, D) map whose channel d is c0*y + c1*x + c2 at each patch's pixel centre (y, x)."""
    h, w = grid
    ys = (torch.arange(h, dtype=torch.float64) + 0.5) * patch[0]
    xs = (torch.arange(w, dtype=torch.float64) + 0.5) * patch[1]
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    values = coeffs[:, 0] * yy[..., None] + coeffs[:, 1] * xx[..., None] + coeffs[:, 2]
    return values.reshape(1, h * w, -1)


def _interior(grid_s, patch_s, grid_t, patch_t) -> torch.Tensor:
    """Mask of student patches whose centre lies between the first and last teacher patch centres."""

    def axis(n_s, p_s, n_t, p_t):
        c = (torch.arange(n_s, dtype=torch.float64) + 0.5) * p_s
        return (c >= 0.5 * p_t) & (c <= (n_t - 0.5) * p_t)

    rows = axis(grid_s[0], patch_s[0], grid_t[0], patch_t[0])
    cols = axis(grid_s[1], patch_s[1], grid_t[1], patch_t[1])
    return (rows[:, None] & cols[None, :]).reshape(-1)


@pytest.mark.parametrize(
    ("grid_t", "patch_t", "grid_s", "patch_s", "with_patch_sizes"),
    [
        ((16, 16), (14, 14), (14, 14), (16, 16), False),  # /14 teacher -> /16 student at 224 px
        ((14, 14), (16, 16), (16, 16), (14, 14), False),  # reverse
        ((28, 20), (8, 8), (14, 10), (16, 16), False),  # /8 -> /16, non-square (224 x 160)
        ((18, 18), (14, 14), (16, 16), (16, 16), True),  # 256 px: teacher covers 252 px only
        ((16, 12), (16, 16), (12, 9), (16, 16), False),  # same patch size, other resolution (grids only)
    ],
)
def test_resample_reproduces_affine_function_of_pixel_position(
    grid_t, patch_t, grid_s, patch_s, with_patch_sizes
) -> None:
    coeffs = torch.tensor([[0.3, -0.2, 1.0], [-1.5, 0.7, 0.1], [0.0, 2.0, -3.0]], dtype=torch.float64)
    if not with_patch_sizes:
        # Grids-only mode: both grids span the same image; put the teacher on the student's pixel frame.
        extent = (grid_s[0] * patch_s[0], grid_s[1] * patch_s[1])
        patch_t = (extent[0] / grid_t[0], extent[1] / grid_t[1])
    teacher = _affine_map(grid_t, patch_t, coeffs)
    kwargs = {"teacher_patch_size": patch_t, "student_patch_size": patch_s} if with_patch_sizes else {}
    out = resample_patch_grid(teacher, grid_t, grid_s, **kwargs)
    expected = _affine_map(grid_s, patch_s, coeffs)
    assert out.shape == expected.shape
    inside = _interior(grid_s, patch_s, grid_t, patch_t)
    assert inside.sum() >= 0.6 * inside.numel()
    torch.testing.assert_close(out[:, inside], expected[:, inside], rtol=0, atol=1e-10)


def test_resample_matches_interpolate_and_two_to_one_is_block_average() -> None:
    torch.manual_seed(0)
    teacher = torch.randn(2, 16 * 16, 5, dtype=torch.float64)  # float64: compare weights, not rounding
    out = resample_patch_grid(teacher, (16, 16), (14, 14))
    as_image = teacher.reshape(2, 16, 16, 5).permute(0, 3, 1, 2)
    ref = F.interpolate(as_image, size=(14, 14), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, ref.permute(0, 2, 3, 1).reshape(2, 196, 5), rtol=0, atol=1e-12)
    # /8 teacher -> /16 student: the student patch (i, j) covers teacher patches 2i..2i+1, 2j..2j+1.
    fine = torch.randn(1, 8 * 8, 3)
    coarse = resample_patch_grid(fine, (8, 8), (4, 4), teacher_patch_size=8, student_patch_size=16)
    blocks = fine.reshape(1, 4, 2, 4, 2, 3).mean(dim=(2, 4)).reshape(1, 16, 3)
    torch.testing.assert_close(coarse, blocks)


def test_resample_identity_is_bit_exact_and_errors() -> None:
    torch.manual_seed(0)
    teacher = torch.randn(2, 6 * 4, 3, dtype=torch.bfloat16)
    assert resample_patch_grid(teacher, (6, 4), (6, 4)) is teacher
    same = resample_patch_grid(teacher, (6, 4), (6, 4), teacher_patch_size=16, student_patch_size=16)
    assert torch.equal(same, teacher)
    assert resample_patch_grid(teacher, (6, 4), (3, 2)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="teacher_grid"):
        resample_patch_grid(teacher, (5, 4), (6, 4))
    with pytest.raises(ValueError, match="both"):
        resample_patch_grid(teacher, (6, 4), (3, 2), teacher_patch_size=14)
    with pytest.raises(ValueError, match="image_size"):
        resample_patch_grid(teacher, (6, 4), (3, 2), 16, 16, image_size=(90, 64))


def test_distillation_loss_matches_direct_formulas() -> None:
    torch.manual_seed(0)
    b, n, d = 3, 5, 8
    s_cls, s_patch = torch.randn(b, d), torch.randn(b, n, d)
    t_cls, t_patch = torch.randn(b, d) * 3, torch.randn(b, n, d) * 2 + 1
    loss_fn = DistillationLoss(cls_weight=0.5, patch_cos_weight=2.0, patch_mse_weight=0.25)
    losses = loss_fn(s_cls, s_patch, t_cls, t_patch)
    assert set(losses) == {"distill_cls_cos", "distill_patch_cos", "distill_patch_mse"}

    def cos(a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return (a * c).sum(-1) / (a.norm(dim=-1) * c.norm(dim=-1))

    torch.testing.assert_close(losses["distill_cls_cos"], 0.5 * (1 - cos(s_cls, t_cls)).mean())
    torch.testing.assert_close(losses["distill_patch_cos"], 2.0 * (1 - cos(s_patch, t_patch)).mean())
    torch.testing.assert_close(losses["distill_patch_mse"], 0.25 * ((s_patch - t_patch) ** 2).mean())
    # Normalised MSE target: per-token standardised teacher features.
    norm_fn = DistillationLoss(normalize_mse_target=True)
    mu, var = t_patch.mean(-1, keepdim=True), t_patch.var(-1, unbiased=False, keepdim=True)
    target = (t_patch - mu) / torch.sqrt(var + 1e-6)
    torch.testing.assert_close(
        norm_fn(s_cls, s_patch, t_cls, t_patch)["distill_patch_mse"], ((s_patch - target) ** 2).mean()
    )
    # Zero weight omits the term; the rest sum to the objective.
    only_cos = DistillationLoss(patch_mse_weight=0.0)(s_cls, s_patch, t_cls, t_patch)
    assert "distill_patch_mse" not in only_cos


def test_distillation_projection_when_widths_differ() -> None:
    torch.manual_seed(0)
    loss_fn = DistillationLoss(student_dim=6, teacher_dim=10)
    s_cls, s_patch = torch.randn(2, 6, requires_grad=True), torch.randn(2, 4, 6)
    t_cls, t_patch = torch.randn(2, 10), torch.randn(2, 4, 10)
    losses = loss_fn(s_cls, s_patch, t_cls, t_patch)
    w, bias = loss_fn.patch_projection.weight, loss_fn.patch_projection.bias
    projected = s_patch @ w.t() + bias
    torch.testing.assert_close(losses["distill_patch_mse"], ((projected - t_patch) ** 2).mean())
    pc = loss_fn.cls_projection(s_cls)
    torch.testing.assert_close(losses["distill_cls_cos"], (1 - F.cosine_similarity(pc, t_cls, dim=-1)).mean())
    assert loss_fn.cls_projection is not loss_fn.patch_projection
    sum(losses.values()).backward()
    assert s_cls.grad is not None and loss_fn.cls_projection.weight.grad is not None
    assert isinstance(DistillationLoss(student_dim=8, teacher_dim=8).cls_projection, torch.nn.Identity)
    with pytest.raises(ValueError, match="projection"):
        DistillationLoss()(torch.randn(2, 6), torch.randn(2, 4, 6), t_cls, t_patch)
    with pytest.raises(ValueError, match="resample_patch_grid"):
        loss_fn(s_cls, s_patch, t_cls, torch.randn(2, 9, 10))
    with pytest.raises(ValueError, match="both student_dim and teacher_dim"):
        DistillationLoss(student_dim=6)
