"""Test-wide settings: one intra-op thread. The suite's models are tiny, where extra threads buy
nothing, and several tests run 2-process gloo groups or DataLoader workers on a 2-core machine."""

import os

os.environ.setdefault("MPLBACKEND", "Agg")
# inherited by the subprocesses some tests start (e.g. the SIGKILL resume test), so that they run
# the same single-threaded kernels as the in-process reference run
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
