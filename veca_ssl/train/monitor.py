"""A cheap in-training k-NN monitor at every core width (DINOv2 protocol, small labelled split).

Under torch.distributed every rank calls it with the whole EMA backbone: ``veca_ssl.features``
extracts a shard of the data per rank and all-gathers the features.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from veca_ssl.models.base import Backbone


class KnnMonitor:
    def __init__(self, cfg, device: torch.device, output_dir: Path) -> None:
        from veca_ssl.data import build_dataset

        m = cfg.train.knn_monitor
        self.k, self.resolution, self.device = int(m.k), int(m.resolution), device
        self.train_set = build_dataset(m.dataset, split=m.train_split)
        self.val_set = build_dataset(m.dataset, split=m.val_split)
        if m.max_train and len(self.train_set) > m.max_train:
            self.train_set = torch.utils.data.Subset(self.train_set, range(int(m.max_train)))
        self.before_path = Path(output_dir) / "knn_before.json"

    @torch.no_grad()
    def evaluate(self, backbone: Backbone, hits: dict | None = None) -> dict:
        """``{"knn_C{c}_top1": %}`` for every width (``knn_dense_top1`` for a dense ViT); ``hits``, when
        given, receives each width's per-image hits under the same keys."""
        from veca_ssl.features import extract_features
        from veca_ssl.knn import knn_classify

        was_training = backbone.training
        backbone.eval()
        widths = list(backbone.budgets) or [None]
        kw = dict(widths=widths, resolution=self.resolution, batch_size=256, device=self.device, progress=False)
        train = extract_features(backbone, self.train_set, **kw)
        val = extract_features(backbone, self.val_set, **kw)
        backbone.train(was_training)
        out = {}
        for w in widths:
            per_query: dict = {}
            res = knn_classify(train[w].image, train[w].labels, val[w].image, val[w].labels, ks=[self.k],
                               hits_out=per_query)
            key = f"knn_{'dense' if w is None else f'C{w}'}_top1"
            out[key] = res[f"knn_k{self.k}_top1"]
            if hits is not None:
                hits[key] = per_query[f"knn_k{self.k}_top1"]
        return out

    def record_before(self, backbone: Backbone, write: bool = True) -> None:
        """Evaluate the untrained network; ``write`` the result (one rank): under torch.distributed every
        rank must evaluate, since feature extraction splits the data over the ranks."""
        result = self.evaluate(backbone)
        if write:
            self.before_path.parent.mkdir(parents=True, exist_ok=True)
            self.before_path.write_text(json.dumps(result, indent=2))

    def final(self, backbone: Backbone) -> dict:
        """Top-1 per width after training, before training, and each width minus the narrowest on the
        same validation images with a 95% paired-bootstrap interval (is "wider worse" beyond noise?)."""
        from veca_ssl.knn import paired_bootstrap

        hits: dict = {}
        after = self.evaluate(backbone, hits)
        before = json.loads(self.before_path.read_text()) if self.before_path.exists() else {}
        keys = list(after)
        paired = {k: list(paired_bootstrap(hits[keys[0]], hits[k])) for k in keys[1:]}
        return {"after": after, "before": before, "vs_narrowest": paired}

    @staticmethod
    def flat(result: dict) -> dict:
        return {f"final_{k}": v for k, v in result["after"].items()}

    @staticmethod
    def table(result: dict) -> str:
        paired = result.get("vs_narrowest", {})
        rows = ["| core width | k-NN top-1 before training | after training | after − narrowest (95% CI) |",
                "|---|---|---|---|"]
        for key, after in result["after"].items():
            width = key[len("knn_"):-len("_top1")]
            before = result["before"].get(key)
            diff = paired.get(key)
            delta = "–" if diff is None else f"{diff[0]:+.1f} ({diff[1]:+.1f} … {diff[2]:+.1f})"
            rows.append(f"| {width} | {'–' if before is None else f'{before:.1f}'} | {after:.1f} | {delta} |")
        return "\n".join(rows)
