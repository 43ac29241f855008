"""Feature distillation from a frozen teacher (VECA paper arXiv:2605.12491).

The student (a VECA backbone at some core width) regresses the frozen teacher's image feature
(cosine) and patch features (cosine + MSE). When the two networks use different patch sizes or input
resolutions, the teacher's patch map is first resampled onto the student's patch grid with
:func:`resample_patch_grid` so that each student patch is compared with the teacher feature of the
same pixels.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

GridSize = tuple[int, int]


def _as_pair(name: str, value: int | tuple[int, int] | list[int]) -> GridSize:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or any(int(v) != v or v < 1 for v in pair):
        raise ValueError(f"{name} must be a positive int or a pair (height, width) of them, got {value!r}")
    return int(pair[0]), int(pair[1])


def _bilinear_matrix(positions: torch.Tensor, n_in: int) -> torch.Tensor:
    """``(n_out, n_in)`` 1-D linear-interpolation weights sampling a length-``n_in`` signal at continuous
    indices ``positions`` (index k = centre of cell k), clamped to the border like
    ``F.interpolate(mode="bilinear", align_corners=False)``."""
    pos = positions.clamp(0.0, n_in - 1.0)
    low = pos.floor().long().clamp(max=n_in - 1)
    high = (low + 1).clamp(max=n_in - 1)
    frac = pos - low.to(pos.dtype)
    weights = torch.zeros(positions.shape[0], n_in, dtype=pos.dtype)
    rows = torch.arange(positions.shape[0])
    weights.index_put_((rows, low), 1.0 - frac, accumulate=True)
    weights.index_put_((rows, high), frac, accumulate=True)
    return weights


@functools.lru_cache(maxsize=32)
def _resampling_matrices(s_h: int, s_w: int, t_h: int, t_w: int, step_h: float, step_w: float,
                         device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The row and column interpolation matrices of :func:`resample_patch_grid`, built in float64 (exact to
    the output dtype's precision) and kept on ``device``: a training step resamples every batch, and a
    fresh host-to-device copy each time would make the host wait for the accelerator."""
    with torch.inference_mode(False):  # cached: ordinary tensors even when first built under inference mode
        rows = _bilinear_matrix((torch.arange(s_h, dtype=torch.float64) + 0.5) * step_h - 0.5, t_h)
        cols = _bilinear_matrix((torch.arange(s_w, dtype=torch.float64) + 0.5) * step_w - 0.5, t_w)
        return rows.to(device=device, dtype=dtype), cols.to(device=device, dtype=dtype)


def resample_patch_grid(
    teacher_patches: torch.Tensor,
    teacher_grid: GridSize,
    student_grid: GridSize,
    teacher_patch_size: int | GridSize | None = None,
    student_patch_size: int | GridSize | None = None,
    image_size: int | GridSize | None = None,
) -> torch.Tensor:
    """Bilinearly resample a teacher patch map onto the student's patch grid, pixel-aligned.

    Each student patch ``(i, j)`` receives the teacher map evaluated (bilinear interpolation between
    teacher patch centres, border values replicated outside them) at the student patch's centre.

    Two geometries:

    * Grids only (patch sizes ``None``): both grids span the same image extent (e.g. teacher /14 and
      student /16 both at 224 px: 16x16 and 14x14 grids covering all 224 px, or each network fed its
      own resize of the image). Student centre ``i`` maps to teacher index
      ``(i + 0.5) * Ht / Hs - 0.5``: exactly ``F.interpolate(..., mode="bilinear", align_corners=False)``.
    * Patch sizes given: both grids are laid on the same pixel frame from the top-left corner, patch k
      covering pixels ``[k*p, (k+1)*p)`` (inputs *cropped* to a multiple of their patch size, e.g. 256 px:
      teacher /14 covers 252 px with 18 patches, student /16 all 256 px with 16). Student centre ``i``
      maps to teacher index ``(i + 0.5) * p_s / p_t - 0.5``. ``image_size`` (optional) checks that
      neither grid extends beyond the image.

    Equal geometry (same grid, and same or unspecified patch sizes) returns ``teacher_patches`` itself.

    Args:
        teacher_patches: ``(B, Ht*Wt, D)`` teacher patch features, row-major.
        teacher_grid: ``(Ht, Wt)``.
        student_grid: ``(Hs, Ws)``.
        teacher_patch_size, student_patch_size: pixels per patch (int or (h, w)); both or neither.
        image_size: image ``(H, W)`` in pixels (int for square), only with patch sizes.

    Returns:
        ``(B, Hs*Ws, D)`` in ``teacher_patches``' dtype.
    """
    t_h, t_w = _as_pair("teacher_grid", teacher_grid)
    s_h, s_w = _as_pair("student_grid", student_grid)
    if teacher_patches.ndim != 3 or teacher_patches.shape[1] != t_h * t_w:
        raise ValueError(
            f"teacher_patches must be (B, {t_h}*{t_w}={t_h * t_w}, D) for teacher_grid {(t_h, t_w)}, "
            f"got shape {tuple(teacher_patches.shape)}"
        )
    if (teacher_patch_size is None) != (student_patch_size is None):
        raise ValueError("give both teacher_patch_size and student_patch_size, or neither")
    if teacher_patch_size is None:
        if image_size is not None:
            raise ValueError("image_size is only meaningful with teacher_patch_size and student_patch_size")
        if (t_h, t_w) == (s_h, s_w):
            return teacher_patches
        step_h, step_w = t_h / s_h, t_w / s_w
    else:
        pt_h, pt_w = _as_pair("teacher_patch_size", teacher_patch_size)
        ps_h, ps_w = _as_pair("student_patch_size", student_patch_size)  # type: ignore[arg-type]
        if image_size is not None:
            img_h, img_w = _as_pair("image_size", image_size)
            for who, (g_h, g_w), (p_h, p_w) in (
                ("teacher", (t_h, t_w), (pt_h, pt_w)),
                ("student", (s_h, s_w), (ps_h, ps_w)),
            ):
                if g_h * p_h > img_h or g_w * p_w > img_w:
                    raise ValueError(
                        f"{who} grid {(g_h, g_w)} x patch {(p_h, p_w)} covers {(g_h * p_h, g_w * p_w)} px, "
                        f"more than image_size {(img_h, img_w)}"
                    )
        if (t_h, t_w) == (s_h, s_w) and (pt_h, pt_w) == (ps_h, ps_w):
            return teacher_patches
        step_h, step_w = ps_h / pt_h, ps_w / pt_w
    rows, cols = _resampling_matrices(s_h, s_w, t_h, t_w, step_h, step_w, teacher_patches.device,
                                      teacher_patches.dtype)
    batch, _, dim = teacher_patches.shape
    grid = teacher_patches.reshape(batch, t_h, t_w * dim)
    # Separable bilinear: contract teacher rows, then teacher columns.
    grid = torch.matmul(rows, grid).reshape(batch, s_h, t_w, dim)
    grid = torch.matmul(cols, grid)  # (s_w, t_w) @ (B, s_h, t_w, D) -> (B, s_h, s_w, D)
    return grid.reshape(batch, s_h * s_w, dim)


class DistillationLoss(nn.Module):
    """Image-feature cosine + patch-feature cosine + patch MSE, with optional width projections.

    With ``p(.)`` the optional learnable projections (student width -> teacher width; separate linears
    for the image feature and the patches, created only when ``student_dim != teacher_dim``), the
    terms returned by :meth:`forward` are, all computed in float32:

    * ``distill_cls_cos   = cls_weight       * mean_b   (1 - cos(p_cls(s_cls[b]), t_cls[b]))``
    * ``distill_patch_cos = patch_cos_weight * mean_b,n (1 - cos(p_patch(s[b, n]), t[b, n]))``
    * ``distill_patch_mse = patch_mse_weight * mean_b,n,d (p_patch(s[b, n, d]) - y[b, n, d])^2``

    MSE target ``y``: the *raw* teacher patch features as the teacher returns them, i.e. after its
    final LayerNorm (the VECA reference recipe regresses those), or — with
    ``normalize_mse_target=True`` — those features re-standardised per token (LayerNorm without
    affine, as MAE's normalised-pixel target), which keeps a few large-magnitude teacher channels (as in
    DINOv2/v3 features) from dominating the MSE. The cosine terms are scale-invariant either way.

    The terms are returned already weighted, so ``sum(losses.values())`` is the objective; a term whose
    weight is 0 is omitted. Teacher inputs are treated as constants (detached).

    Args:
        cls_weight, patch_cos_weight, patch_mse_weight: non-negative term weights.
        student_dim, teacher_dim: feature widths; give both to enable projections when they differ.
        normalize_mse_target: standardise the MSE target per token (see above).
    """

    def __init__(
        self,
        cls_weight: float = 1.0,
        patch_cos_weight: float = 1.0,
        patch_mse_weight: float = 1.0,
        student_dim: int | None = None,
        teacher_dim: int | None = None,
        normalize_mse_target: bool = False,
        center_features: bool = False,
    ) -> None:
        super().__init__()
        self.center_features = center_features
        for name, weight in (
            ("cls_weight", cls_weight),
            ("patch_cos_weight", patch_cos_weight),
            ("patch_mse_weight", patch_mse_weight),
        ):
            if not (weight >= 0 and math.isfinite(weight)):
                raise ValueError(f"DistillationLoss: {name} must be a finite number >= 0, got {weight}")
        if (student_dim is None) != (teacher_dim is None):
            raise ValueError(
                f"DistillationLoss: give both student_dim and teacher_dim (got {student_dim}, {teacher_dim})"
            )
        self.cls_weight = cls_weight
        self.patch_cos_weight = patch_cos_weight
        self.patch_mse_weight = patch_mse_weight
        self.normalize_mse_target = normalize_mse_target
        self.student_dim = student_dim
        self.teacher_dim = teacher_dim
        self.cls_projection: nn.Module = nn.Identity()
        self.patch_projection: nn.Module = nn.Identity()
        if student_dim is not None and teacher_dim is not None and student_dim != teacher_dim:
            self.cls_projection = nn.Linear(student_dim, teacher_dim)
            self.patch_projection = nn.Linear(student_dim, teacher_dim)

    def _check(self, name: str, student: torch.Tensor, teacher: torch.Tensor, ndim: int) -> None:
        if student.ndim != ndim or teacher.ndim != ndim or student.shape[:-1] != teacher.shape[:-1]:
            hint = " (resample the teacher map with resample_patch_grid first)" if ndim == 3 else ""
            raise ValueError(
                f"DistillationLoss: student {name} {tuple(student.shape)} and teacher {name} "
                f"{tuple(teacher.shape)} must be {ndim}-D with equal leading dims{hint}"
            )
        if self.student_dim is not None and student.shape[-1] != self.student_dim:
            raise ValueError(
                f"DistillationLoss: student {name} width {student.shape[-1]} != student_dim {self.student_dim}"
            )
        if self.teacher_dim is not None and teacher.shape[-1] != self.teacher_dim:
            raise ValueError(
                f"DistillationLoss: teacher {name} width {teacher.shape[-1]} != teacher_dim {self.teacher_dim}"
            )
        if self.student_dim is None and student.shape[-1] != teacher.shape[-1]:
            raise ValueError(
                f"DistillationLoss: student {name} width {student.shape[-1]} != teacher width "
                f"{teacher.shape[-1]}; pass student_dim and teacher_dim to learn a projection"
            )

    def forward(
        self,
        student_cls: torch.Tensor,
        student_patches: torch.Tensor,
        teacher_cls: torch.Tensor,
        teacher_patches: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Weighted loss terms (see class docstring) for ``(B, Ds)``/``(B, N, Ds)`` student and
        ``(B, Dt)``/``(B, N, Dt)`` teacher features on the same patch grid."""
        self._check("cls", student_cls, teacher_cls, 2)
        self._check("patches", student_patches, teacher_patches, 3)
        losses: dict[str, torch.Tensor] = {}
        teacher_cls = teacher_cls.detach().float()
        teacher_patches = teacher_patches.detach().float()
        # center_features: cosines between features minus the teacher's batch mean. Small or young
        # teachers put most of their norm in one direction shared by every image and token; raw
        # cosines then saturate near 1 and stop carrying what distinguishes images. (MSE is
        # unchanged by a shared shift, so it always uses the raw features.)
        cls_mean = teacher_cls.mean(0) if self.center_features else 0.0
        patch_mean = teacher_patches.mean((0, 1)) if self.center_features else 0.0
        if self.cls_weight > 0:
            projected_cls = self.cls_projection(student_cls).float()
            cos = F.cosine_similarity(projected_cls - cls_mean, teacher_cls - cls_mean, dim=-1)
            losses["distill_cls_cos"] = self.cls_weight * (1.0 - cos).mean()
        if self.patch_cos_weight > 0 or self.patch_mse_weight > 0:
            projected = self.patch_projection(student_patches).float()
            if self.patch_cos_weight > 0:
                cos = F.cosine_similarity(projected - patch_mean, teacher_patches - patch_mean, dim=-1)
                losses["distill_patch_cos"] = self.patch_cos_weight * (1.0 - cos).mean()
            if self.patch_mse_weight > 0:
                target = teacher_patches
                if self.normalize_mse_target:
                    target = F.layer_norm(target, target.shape[-1:], eps=1e-6)
                losses["distill_patch_mse"] = self.patch_mse_weight * F.mse_loss(projected, target)
        return losses
