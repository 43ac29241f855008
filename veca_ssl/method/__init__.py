"""Training methods: modules whose forward returns a dict of losses (the loop does the rest)."""

from .budgets import BudgetPolicy, resolve_budgets
from .ssl import ElasticDINO, StudentTeacherNet

__all__ = ["BudgetPolicy", "resolve_budgets", "ElasticDINO", "StudentTeacherNet"]
