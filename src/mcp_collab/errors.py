"""Errors of mcp-collab.

One root, a shallow tree. Foreign errors (openai, google-genai, OS) are translated once, at the
edge of the runtime that met them, with ``raise ... from exc``::

    CollabError
    ├── ConfigError             a setting from the environment is malformed
    ├── InvalidRequestError     the caller asked for something we refuse (message says what is accepted)
    │   ├── UnknownWorkerError
    │   ├── NoFittingWorkerError  no registered worker fits a strategy's role
    │   └── UnknownRunError
    ├── StoreError              the run store cannot be used (newer schema, unreadable, unwritable)
    │   ├── LeaseLostError      this process's lease lapsed; whatever it owned may be recovered elsewhere
    │   └── RunTakenOverError   a run was recovered by another server; a save of it was refused
    ├── WorktreeError           a run's git worktree could not be made, read, applied or removed
    └── RuntimeFailure          a step's runtime failed; ``kind`` drives the fallback policy
        ├── RuntimeUnavailable  missing credentials, binary or package: nothing was attempted
        ├── RuntimeTransient    connection, timeout, 429, 5xx: the same call may succeed later
        └── RuntimeFatal        the request itself is wrong, or the step may have had side effects

``RuntimeFailure.kind`` is one of ``unavailable``, ``transient``, ``fatal``. The fallback policy
``on_error`` falls back to the CLI on the first two and never on ``fatal``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

ErrorKind = Literal["unavailable", "transient", "fatal"]


class CollabError(Exception):
    """Root of every error mcp-collab raises on purpose."""


class ConfigError(CollabError):
    """A setting from the environment is malformed."""


class InvalidRequestError(CollabError):
    """A request is refused; the message says what was wrong and what is accepted."""


class UnknownWorkerError(InvalidRequestError):
    pass


class NoFittingWorkerError(InvalidRequestError):
    """No registered worker can take a role; each surface says how to register or name one."""


class UnknownRunError(InvalidRequestError):
    pass


class StoreError(CollabError):
    """The run store cannot be used as it is; nothing was overwritten."""


class LeaseLostError(StoreError):
    """This process's lease lapsed before it was renewed (the process was stopped, or cut off from
    the store, for longer than the lease's TTL). It is never taken back: another server may already
    have recovered what it owned."""


class RunTakenOverError(StoreError):
    """A save of a run was refused because another server recovered the run meanwhile (its owner's
    lease had lapsed); the recovered state stands, nothing was overwritten."""


class EngineStartError(CollabError):
    """A server answering its client could not start its engine (the store refused its lease, say):
    every call that needs the engine is refused with the cause, and the server exits with it."""


class WorktreeError(CollabError):
    """A git worktree operation failed; the message names the repository or path and the cause,
    and says what was left as it was."""


class RuntimeFailure(CollabError):
    """A runtime failed to produce a result for a step.

    ``code`` is a short machine-readable reason (``missing_credentials``, ``timeout``,
    ``http_429`` ...); ``exit_code`` is set when a process ran; ``output`` keeps whatever the
    runtime produced before it failed, so a failed step still shows its partial work.
    """

    kind: ErrorKind = "fatal"

    def __init__(
        self,
        message: str,
        *,
        code: str = "error",
        exit_code: int | None = None,
        output: str = "",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.exit_code = exit_code
        self.output = output


class RuntimeUnavailable(RuntimeFailure):
    kind: ErrorKind = "unavailable"


class RuntimeTransient(RuntimeFailure):
    kind: ErrorKind = "transient"


class RuntimeFatal(RuntimeFailure):
    kind: ErrorKind = "fatal"


# A refusal quotes what the caller sent, but never at length: a 300 KB argument must not come back
# as a 300 KB error (tool results are capped near 20 KB).
QUOTE_CHARS = 80
LIST_ITEMS = 20


def shown(value: object, limit: int = QUOTE_CHARS) -> str:
    """``repr(value)``, cut to ``limit`` characters with the full length said, with anything shaped
    like a key masked: a caller who pastes a key where a name belongs must not get it back in a
    refusal (the MCP edge also redacts the server's own credential values from every error)."""
    from .security import Redactor  # security builds on this module

    text = Redactor()(repr(value))
    if len(text) <= limit:
        return text
    length = f" ({len(value)} characters)" if isinstance(value, str) else ""
    return f"{text[: limit - 1]}…{length}"


def listing(names: Iterable[str], *, empty: str = "none") -> str:
    """A comma list of at most ``LIST_ITEMS`` names, saying how many more there are."""
    items = list(names)
    if not items:
        return empty
    head = ", ".join(shown(n) if len(n) > QUOTE_CHARS else n for n in items[:LIST_ITEMS])
    return head + (f" and {len(items) - LIST_ITEMS} more" if len(items) > LIST_ITEMS else "")


def failure_for_kind(kind: ErrorKind) -> type[RuntimeFailure]:
    return {"unavailable": RuntimeUnavailable, "transient": RuntimeTransient, "fatal": RuntimeFatal}[kind]
