"""Runtimes: how one step of a run is executed (``cli``, ``openai_sdk``, ``google_sdk``)."""

from .base import RuntimeResult, StepRequest, WorkerRuntime

__all__ = ["RuntimeResult", "StepRequest", "WorkerRuntime"]
