"""mcp-collab: an MCP server that puts several AI coding agents to work together."""

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
