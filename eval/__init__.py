"""Evaluation of frozen backbones at every elastic core width (SPEC §5).

Protocols: ``eval.knn`` (weighted k-NN), ``eval.linear`` (DINOv2 linear probe), ``eval.logreg``
(logistic regression), ``eval.dense`` (segmentation / depth probes); ``eval.report`` writes the
quality-vs-compute report, ``eval.all`` runs a YAML config, ``eval.extract`` writes feature shards.
All share one feature engine, ``veca_ssl.features.extract_features``.
"""
