"""Evaluation: the harness, the methods it compares (ELS and the baselines), the completion cache, the
report, tuning and the judge agreement check."""

from els.eval.harness import EvalConfig, evaluate
from els.eval.methods import Method, MethodContext, resolve_methods

__all__ = ["EvalConfig", "Method", "MethodContext", "evaluate", "resolve_methods"]
