"""The in-training k-NN monitor at every core width (DINOv2 protocol, small labelled split), and the
final table that says whether training helped.

The bank is a fixed, seeded, class-stratified subset of the bank split (``max_train`` items): taking
the first items would hold only the first classes of class-sorted data (every ``imagefolder``).

The final table puts each width's trained features next to two baselines on the same split, with the
same k-NN and the same linear probe: the *untrained* network (the EMA teacher at step 0, whose
features are recorded before the first step) and the *raw pixels* of the monitor images. A
pretraining run is only worth its compute when its features beat both.

Under torch.distributed every rank calls it with the whole EMA backbone: ``veca_ssl.features``
extracts a shard of the data per rank and all-gathers the features.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from veca_ssl import fileio
from veca_ssl.models.base import Backbone

#: Name of the linear probe in result keys.
PROBE_NAME = "logreg"


def stratified_subset(targets: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded, class-stratified subset of ``size`` items.

    Each class gets its share of ``size`` in proportion to its frequency (largest remainders break
    the rounding, ties to the smaller class id), drawn by a seeded permutation within the class; the
    same ``(targets, size, seed)`` always gives the same subset. Unlabelled items (−1) count as one
    more class.
    """
    targets = np.asarray(targets)
    n = len(targets)
    if size >= n:
        return np.arange(n)
    classes, counts = np.unique(targets, return_counts=True)
    exact = counts * size / n
    share = np.floor(exact).astype(int)
    order = np.lexsort((classes, -(exact - share)))  # largest remainder first, then class id
    share[order[: size - share.sum()]] += 1
    rng = np.random.default_rng([seed, 0x4B4E4E])
    picked = [rng.permutation(np.flatnonzero(targets == c))[:k] for c, k in zip(classes, share)]
    return np.sort(np.concatenate(picked))


class PixelFeatures(nn.Module):
    """The raw-pixel baseline as a "backbone": the image feature is the flattened input image (the
    normalised pixels the networks see), so the same feature engine, k-NN and probe apply."""

    budgets: tuple[int, ...] = ()
    patch_size = 1
    depth = 1

    def forward_features(self, images: Tensor, **_: object) -> dict:
        return {"cls": images.flatten(1), "patches": images.new_zeros(images.shape[0], 0, 1)}


def _key(width: int | None) -> str:
    return "dense" if width is None else f"C{width}"


class KnnMonitor:
    """k-NN top-1 at every width during training; :meth:`final` adds the linear probe and the
    untrained-network and raw-pixel baselines."""

    def __init__(self, cfg, device: torch.device, output_dir: Path) -> None:
        from veca_ssl.data import build_dataset

        m = cfg.train.knn_monitor
        self.k, self.resolution, self.device = int(m.k), int(m.resolution), device
        from veca_ssl.config import ConfigError
        from veca_ssl.data.folder import check_same_classes

        empty = bool(cfg.data.get("allow_empty_classes", False))
        try:
            self.train_set = build_dataset(m.dataset, split=m.train_split, allow_empty_classes=empty)
            self.val_set = build_dataset(m.dataset, split=m.val_split, allow_empty_classes=empty)
            check_same_classes({f"split {m.train_split}": getattr(self.train_set, "classes", None),
                                f"split {m.val_split}": getattr(self.val_set, "classes", None)},
                               hint=" (a class folder without images is kept with data.allow_empty_classes=true)")
        except (ValueError, OSError) as exc:
            raise ConfigError(f"train.knn_monitor.dataset={m.dataset}: {exc}") from None
        if m.max_train and len(self.train_set) > m.max_train:
            targets = getattr(self.train_set, "targets", None)
            if targets is None or len(targets) != len(self.train_set):
                raise ValueError(f"train.knn_monitor.max_train={m.max_train} needs the labels of "
                                 f"{m.dataset}@{m.train_split} up front; set max_train=null to use all of it")
            keep = stratified_subset(targets, int(m.max_train), int(cfg.seed))
            self.train_set = torch.utils.data.Subset(self.train_set, keep.tolist())
        self.before_path = Path(output_dir) / "knn_before.json"
        self.cfg = cfg

    def _features(self, backbone: nn.Module) -> tuple[dict, dict]:
        from veca_ssl.features import extract_features

        was_training = backbone.training
        backbone.eval()
        widths = list(getattr(backbone, "budgets", ())) or [None]
        kw = dict(widths=widths, resolution=self.resolution, batch_size=256, device=self.device, progress=False)
        train = extract_features(backbone, self.train_set, **kw)
        val = extract_features(backbone, self.val_set, **kw)
        backbone.train(was_training)
        return train, val

    def _knn(self, train: dict, val: dict, hits: dict | None = None) -> dict:
        from veca_ssl.knn import knn_classify

        out = {}
        for w in train:
            per_query: dict = {}
            res = knn_classify(train[w].image, train[w].labels, val[w].image, val[w].labels, ks=[self.k],
                               hits_out=per_query)
            key = f"knn_{_key(w)}_top1"
            out[key] = res[f"knn_k{self.k}_top1"]
            if hits is not None:
                hits[key] = per_query[f"knn_k{self.k}_top1"]
        return out

    @staticmethod
    def _probe(train: dict, val: dict) -> dict:
        from veca_ssl.logreg import LogRegConfig, logistic_regression

        # a smaller C grid than the eval protocol's: the table is printed at the end of every run
        cfg = LogRegConfig(cs=(1e-2, 1e-1, 1.0), max_iter=300)
        return {f"{PROBE_NAME}_{_key(w)}_top1": logistic_regression(train[w].image, train[w].labels,
                                                                    val[w].image, val[w].labels, cfg)["logreg_top1"]
                for w in train}

    @torch.no_grad()
    def evaluate(self, backbone: Backbone, hits: dict | None = None) -> dict:
        """``{"knn_C{c}_top1": %}`` for every width (``knn_dense_top1`` for a dense ViT); ``hits``, when
        given, receives each width's per-image hits under the same keys."""
        return self._knn(*self._features(backbone), hits)

    def record_before(self, backbone: Backbone, write: bool = True) -> None:
        """k-NN of the untrained network, before the first step; ``write`` it to ``knn_before.json``
        (one rank): under torch.distributed every rank must evaluate, since feature extraction splits
        the data over the ranks."""
        result = self.evaluate(backbone)
        if write:
            with fileio.writing(self.before_path, "the k-NN table of the untrained network"):
                fileio.atomic_write_json(self.before_path, result)

    def untrained_backbone(self) -> Backbone:
        """The network at step 0, rebuilt: training builds it first thing after seeding with
        ``cfg.seed`` (``veca_ssl.train.loop.setup``), so the same calls give the same weights — after a
        resume too — including ``model.init_from``'s weights when training started from them. The
        global RNG is left as it was."""
        from veca_ssl.models.init import initial_backbone

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed)
            return initial_backbone(self.cfg)[0].to(self.device)

    def final(self, backbone: Backbone) -> dict:
        """After training, per width: k-NN top-1 and the probe for the trained network, the untrained
        one (:meth:`untrained_backbone`) and raw pixels, and each width minus the narrowest on the same
        validation images with a 95% paired-bootstrap interval."""
        from veca_ssl.knn import paired_bootstrap

        hits: dict = {}
        train, val = self._features(backbone)
        after = self._knn(train, val, hits)
        probe = self._probe(train, val)
        untrained = self._features(self.untrained_backbone())
        pixels = self._features(PixelFeatures())
        keys = list(after)
        paired = {k: list(paired_bootstrap(hits[keys[0]], hits[k])) for k in keys[1:]}
        return {"after": after, "before": self._knn(*untrained), "vs_narrowest": paired, "probe_after": probe,
                "probe_before": self._probe(*untrained), "pixels": {**self._knn(*pixels), **self._probe(*pixels)},
                "k": self.k, "bank": len(self.train_set), "queries": len(self.val_set),
                "start": "init_from" if self.cfg.model.init_from else "untrained"}

    @staticmethod
    def flat(result: dict) -> dict:
        out = {f"final_{k}": v for k, v in result["after"].items()}
        out.update({f"final_{k}": v for k, v in result.get("probe_after", {}).items()})
        return out

    @staticmethod
    def beats_baselines(result: dict) -> dict[str, bool]:
        """Per width: whether the trained features beat the untrained network *and* raw pixels on both
        k-NN and the probe (a baseline that was not measured does not count against it)."""
        pixels = result.get("pixels", {})
        out = {}
        for key, after in result["after"].items():
            width = key[len("knn_"):-len("_top1")]
            probe_key = f"{PROBE_NAME}_{width}_top1"
            rivals_knn = [result["before"].get(key), pixels.get("knn_dense_top1")]
            rivals_probe = [result.get("probe_before", {}).get(probe_key), pixels.get(f"{PROBE_NAME}_dense_top1")]
            probe = result.get("probe_after", {}).get(probe_key)
            out[width] = (all(after > r for r in rivals_knn if r is not None)
                          and (probe is None or all(probe > r for r in rivals_probe if r is not None)))
        return out

    @staticmethod
    def table(result: dict) -> str:
        def fmt(v: float | None) -> str:
            return "–" if v is None else f"{v:.1f}"

        paired = result.get("vs_narrowest", {})
        pixels = result.get("pixels", {})
        wins = KnnMonitor.beats_baselines(result)
        start = "initial" if result.get("start") == "init_from" else "untrained"
        rows = [f"| core width | k-NN trained | k-NN {start} | k-NN raw pixels | probe trained | probe {start} "
                "| probe raw pixels | beats both | k-NN trained − narrowest (95% CI) |",
                "|---|---|---|---|---|---|---|---|---|"]
        for key, after in result["after"].items():
            width = key[len("knn_"):-len("_top1")]
            probe_key = f"{PROBE_NAME}_{width}_top1"
            diff = paired.get(key)
            delta = "–" if diff is None else f"{diff[0]:+.1f} ({diff[1]:+.1f} … {diff[2]:+.1f})"
            rows.append(f"| {width} | {fmt(after)} | {fmt(result['before'].get(key))} "
                        f"| {fmt(pixels.get('knn_dense_top1'))} | {fmt(result.get('probe_after', {}).get(probe_key))} "
                        f"| {fmt(result.get('probe_before', {}).get(probe_key))} "
                        f"| {fmt(pixels.get(f'{PROBE_NAME}_dense_top1'))} | {'yes' if wins[width] else 'NO'} "
                        f"| {delta} |")
        return "\n".join(rows)

    @staticmethod
    def caption(result: dict) -> str:
        """What the table measures, in one line."""
        k, bank, queries = result.get("k", "?"), result.get("bank", "?"), result.get("queries", "?")
        start = ("the initial network (model.init_from's weights)" if result.get("start") == "init_from"
                 else "the untrained network")
        return (f"top-1 (%) on {queries} validation images: weighted k-NN (k={k}, T=0.07, bank of {bank}) and "
                f"a logistic-regression probe (C chosen on held-out train), for the EMA teacher after training, "
                f"{start} and raw pixels")
