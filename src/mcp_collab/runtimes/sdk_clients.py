"""What every SDK runtime does before its first call: import its package on first use (the server
starts without paying for it), find its key, and keep one client per key and endpoint."""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable
from types import ModuleType
from typing import Any

from ..config import Settings
from ..errors import RuntimeUnavailable


def import_sdk(module: str, package: str) -> ModuleType:
    """The SDK's module; a missing package is ``unavailable`` (a fallback reason)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise RuntimeUnavailable(
            f"the {package} package is not installed; install mcp-collab with its dependencies",
            code="missing_package",
        ) from exc


def api_key(settings: Settings, *names: str) -> str:
    """The first of ``names`` set in the server's environment; none is ``unavailable``."""
    for name in names:
        value = settings.environ.get(name, "").strip()
        if value:
            return value
    said = f"{names[0]} is not set" if len(names) == 1 else f"neither {' nor '.join(names)} is set"
    raise RuntimeUnavailable(said, code="missing_credentials")


class ClientCache:
    """One client per (key, endpoint): connections are reused across steps and closed at the end."""

    def __init__(self, close: Callable[[Any], Awaitable[None]]) -> None:
        self._close = close
        self._clients: dict[tuple[str, str | None], Any] = {}

    def get(self, key: str, base_url: str | None, make: Callable[[], Any]) -> Any:
        client = self._clients.get((key, base_url))
        if client is None:
            client = self._clients[(key, base_url)] = make()
        return client

    async def aclose(self) -> None:
        for client in self._clients.values():
            await self._close(client)
        self._clients.clear()
