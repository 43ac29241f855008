"""Cluster submission for veca-ssl: ``veca submit train|eval`` (``launchers.submit``) builds submitit
jobs (``launchers.slurm.TrainJob`` / ``EvalJob``) for SLURM, local subprocesses or in-process debugging."""
