"""End-of-distillation report: per core width, how close the student is to the
frozen teacher (cosine of image and patch features, through the learned projections) and the k-NN
top-1 of student vs teacher on a labelled split."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from veca_ssl.loss.distill import resample_patch_grid


@torch.no_grad()
def feature_cosines(method, images: torch.Tensor, widths: list[int | None], batch_size: int = 64,
                    ema: torch.nn.Module | None = None) -> dict:
    """Mean student–teacher cosine per width: ``{width: {"cls_cos": …, "patch_cos": …}}``. ``ema`` is the
    EMA student (backbone + projections, the weights that are exported): ``method.teacher`` by default,
    its whole-weight copy (``method.full_teacher()``) when training sharded it."""
    ema = method.teacher if ema is None else ema
    student = ema.backbone
    was_training = student.training
    student.eval()
    sums = {w: [0.0, 0.0] for w in widths}
    n = 0
    for part in images.split(batch_size):
        t = method.get_teacher_output(part)
        for w in widths:
            s = student.forward_features(part, num_cores=w)
            t_patches = resample_patch_grid(t["patches"], t["grid"], s["grid"])
            cls = ema.cls_projection(s["cls"]).float()
            patches = ema.patch_projection(s["patches"]).float()
            sums[w][0] += F.cosine_similarity(cls, t["cls"], dim=-1).sum().item()
            sums[w][1] += F.cosine_similarity(patches, t_patches, dim=-1).mean(dim=1).sum().item()
        n += part.shape[0]
    student.train(was_training)
    return {w: {"cls_cos": v[0] / n, "patch_cos": v[1] / n} for w, v in sums.items()}


def _eval_images(dataset, resolution: int, limit: int) -> torch.Tensor:
    from veca_ssl.data import make_eval_transform

    transform = make_eval_transform(resolution)
    return torch.stack([transform(dataset[i][0]) for i in range(min(limit, len(dataset)))])


def distillation_report(method, cfg, device: torch.device, ema: torch.nn.Module | None = None) -> dict:
    """Cosine to the teacher per width and k-NN of student vs teacher (``train.knn_monitor`` data);
    ``ema`` as in :func:`feature_cosines`."""
    ema = method.teacher if ema is None else ema
    from veca_ssl.data import build_dataset
    from veca_ssl.features import extract_features
    from veca_ssl.knn import knn_classify

    m = cfg.train.knn_monitor
    train_set = build_dataset(m.dataset, split=m.train_split)
    val_set = build_dataset(m.dataset, split=m.val_split)
    student = ema.backbone
    widths = list(student.budgets) or [None]
    images = _eval_images(val_set, m.resolution, 512).to(device)
    cosines = feature_cosines(method, images, widths, ema=ema.to(device))

    kw = dict(resolution=m.resolution, batch_size=256, device=device, progress=False)
    student.eval()
    s_train, s_val = extract_features(student, train_set, widths, **kw), extract_features(student, val_set, widths, **kw)
    t_res = method.teacher_resolution
    t_kw = dict(kw, resolution=t_res)
    t_train = extract_features(method.frozen_teacher, train_set, None, **t_kw)[None]
    t_val = extract_features(method.frozen_teacher, val_set, None, **t_kw)[None]
    k = int(m.k)
    teacher_top1 = knn_classify(t_train.image, t_train.labels, t_val.image, t_val.labels, ks=[k])[f"knn_k{k}_top1"]
    rows = []
    for w in widths:
        top1 = knn_classify(s_train[w].image, s_train[w].labels, s_val[w].image, s_val[w].labels,
                            ks=[k])[f"knn_k{k}_top1"]
        rows.append({"width": "dense" if w is None else w, "student_knn_top1": top1, "teacher_knn_top1": teacher_top1,
                     "gap": teacher_top1 - top1, **cosines[w]})
    return {"rows": rows, "k": k}


def report_table(report: dict) -> str:
    lines = ["| core width | student k-NN top-1 | teacher k-NN top-1 | gap | cos(image) | cos(patches) |",
             "|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['width']} | {r['student_knn_top1']:.1f} | {r['teacher_knn_top1']:.1f} | "
                     f"{r['gap']:+.1f} | {r['cls_cos']:.3f} | {r['patch_cos']:.3f} |")
    return "\n".join(lines)
