"""The durable run history: worker profiles and runs with their steps and attempts."""

from .base import RunFilter, RunStore
from .json_store import STORE_SCHEMA_VERSION, JsonStore, cursor_after

__all__ = ["STORE_SCHEMA_VERSION", "JsonStore", "RunFilter", "RunStore", "cursor_after"]
