"""Runtimes: how one step of a run is executed; ``registry.py`` lists them (``cli`` and the SDKs).

Nothing is imported here eagerly: ``models`` derives from ``registry`` while ``base`` imports
``models``, so the package itself must load without either.
"""

from __future__ import annotations

from typing import Any

__all__ = ["RuntimeResult", "StepRequest", "WorkerRuntime"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
