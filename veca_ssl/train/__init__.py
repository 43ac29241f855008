"""Training: one readable loop (``loop.train``), its optimiser groups, checkpoints and logging."""
