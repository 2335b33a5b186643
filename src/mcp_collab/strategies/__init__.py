"""Collaboration strategies: programs that cast workers into roles and ask the engine for steps.

``STRATEGIES`` maps a name to its ``Strategy``; ``builtin`` registers the ones that ship. A new
strategy is a decorated ``async def`` (see ``builtin.py``).
"""

from . import builtin as _builtin  # noqa: F401  (registers the built-in strategies)
from .base import (
    STRATEGIES,
    Role,
    RunContext,
    Space,
    Strategy,
    assign_workers,
    cast_workers,
    dispatchable,
    get_strategy,
    strategy,
)
from .prompts import MAX_QUOTED_DIFF_CHARS, MAX_QUOTED_OUTPUT_CHARS
from .verdicts import PASSING_VERDICTS, parse_verdict

__all__ = [
    "MAX_QUOTED_DIFF_CHARS",
    "MAX_QUOTED_OUTPUT_CHARS",
    "PASSING_VERDICTS",
    "STRATEGIES",
    "Role",
    "RunContext",
    "Space",
    "Strategy",
    "assign_workers",
    "cast_workers",
    "dispatchable",
    "get_strategy",
    "parse_verdict",
    "strategy",
]
