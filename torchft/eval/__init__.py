"""Evaluation with lm-eval: a wrapper around torchft models, task runs and a training-loop hook.

Importing this package is cheap; lm-eval is imported when the names below are first used.
"""
from __future__ import annotations

_EXPORTS = {
    "TorchFTEvalWrapper": "torchft.eval._lm",
    "evaluate": "torchft.eval._evaluate",
    "eval_hook": "torchft.eval._evaluate",
    "flatten_metrics": "torchft.eval._evaluate",
    "check_adapter_is_active": "torchft.eval._evaluate",
    "check_tasks": "torchft.eval._evaluate",
    "task_manager_for": "torchft.eval._evaluate",
    "perplexity": "torchft.eval._perplexity",
    "TaskDataUnavailableError": "torchft.eval._evaluate",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'torchft.eval' has no attribute {name!r}")
