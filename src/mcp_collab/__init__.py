"""mcp-collab: an MCP server that puts several AI coding agents to work together.

The public names load on first use (PEP 562): importing any part of the package (``mcp_collab.errors``,
the ``mcp-collab`` command) does not import the whole engine with it, which a server's first answer
to its client would otherwise wait for.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import Settings
    from .errors import CollabError
    from .models import DispatchRequest, Run, Step, Worker, WorkerSpec
    from .orchestrator import WorkerOrchestrator

__all__ = [
    "CollabError",
    "DispatchRequest",
    "Run",
    "Settings",
    "Step",
    "Worker",
    "WorkerOrchestrator",
    "WorkerSpec",
]
__version__ = "0.1.0"

# Where each public name lives.
_HOMES = {
    "CollabError": ".errors",
    "DispatchRequest": ".models",
    "Run": ".models",
    "Settings": ".config",
    "Step": ".models",
    "Worker": ".models",
    "WorkerOrchestrator": ".orchestrator",
    "WorkerSpec": ".models",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}; it offers {', '.join(__all__)}")
    value = getattr(importlib.import_module(home, __name__), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
