"""Training methods: modules whose forward returns a dict of losses (the loop does the rest)."""

from .ssl import ElasticDINO, StudentTeacherNet
from .widths import WidthPolicy, training_widths

__all__ = ["WidthPolicy", "training_widths", "ElasticDINO", "StudentTeacherNet"]
