"""The durable run history: worker profiles and runs with their steps and attempts.

``open_store`` is the one place that decides which backend holds it: the JSON log in the state
directory (the default), or PostgreSQL when ``MCP_COLLAB_STORE_URL`` names a database.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import RunFilter, RunStore, StepTexts, cursor_after
from .json_store import STORE_SCHEMA_VERSION, JsonStore

if TYPE_CHECKING:
    from ..config import Settings


def open_store(settings: Settings, *, migrate: bool = True) -> RunStore:
    """The run store the settings name, opened (a PostgreSQL database is migrated on open, unless
    ``migrate`` is False: a reader such as doctor changes nothing)."""
    if settings.store_url is not None:
        from .postgres import PostgresStore  # imported only when used: the default needs no driver

        return PostgresStore(settings.store_url.url, migrate=migrate)
    return JsonStore(settings.store_dir)


def describe_store(settings: Settings) -> str:
    """Which backend the settings select, and where, fit for a report (never a password)."""
    if settings.store_url is not None:
        return f"PostgreSQL at {settings.store_url.shown}"
    return f"JSON log in {settings.store_dir}"


__all__ = [
    "STORE_SCHEMA_VERSION",
    "JsonStore",
    "RunFilter",
    "RunStore",
    "StepTexts",
    "cursor_after",
    "describe_store",
    "open_store",
]
