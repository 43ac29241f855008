"""Test-wide settings: one intra-op thread. The suite's models are tiny, where extra threads buy
nothing, and several tests run 2-process gloo groups or DataLoader workers on a 2-core machine."""

import os

os.environ.setdefault("MPLBACKEND", "Agg")

import torch  # noqa: E402

torch.set_num_threads(1)
