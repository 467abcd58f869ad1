"""Data parallelism on Ray actors behind els.core's `Executor` protocol (Ray is an optional extra)."""

from els.parallel.ray_executor import ModelSpec, RayExecutor, RayMissing, make_executor

__all__ = ["ModelSpec", "RayExecutor", "RayMissing", "make_executor"]
