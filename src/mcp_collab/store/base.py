"""The store seam: what the orchestrator needs from a run history, whatever holds it."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from ..errors import InvalidRequestError
from ..models import Lease, LeaseKind, Run, RunPage, RunStatus, Worker

# A run's place in the history, as cursors spell it: its creation time (UTC, fixed width, so the
# text sorts like the time) and its id. Every backend issues and reads the same cursors.
KEY_FORMAT = "%Y-%m-%dT%H:%M:%S.%f"


@dataclass(frozen=True)
class RunFilter:
    status: RunStatus | None = None
    strategy: str | None = None
    worker: str | None = None

    def matches(self, run: Run) -> bool:
        return (
            (self.status is None or run.status == self.status)
            and (self.strategy is None or run.strategy == self.strategy)
            and (self.worker is None or self.worker in run.workers)
        )


@dataclass(frozen=True)
class StepTexts:
    """A step's whole output and diff, stashed by the worker that ran it when they were too long to
    travel through Temporal, until a save of its run takes them (``RunStore.stash_texts``). ``step``
    is the step's index, or -1 - i for the diff of the run's worktree i."""

    step: int
    output: str
    diff: str
    output_truncated: bool


class RunStore(Protocol):
    """Blocking calls: the orchestrator runs them off the event loop."""

    def check_writable(self) -> None:
        """Raise StoreError (naming the path and the cause) if nothing could be stored now."""

    def list_workers(self) -> list[Worker]: ...

    def workers_if_current(self) -> list[Worker] | None:
        """The workers, answered at once without blocking (the one call safe on an event loop),
        or None when that cannot be done now: then call ``list_workers`` off the loop."""

    def get_worker(self, name: str) -> Worker | None: ...

    def add_worker(self, worker: Worker) -> None:
        """Add a worker; raises InvalidRequestError if the name is taken."""

    def remove_worker(self, name: str) -> Worker | None: ...

    def save_run(self, run: Run) -> None:
        """Insert or replace a run, atomically and durably."""

    def save_runs(self, runs: list[Run], *, durable: bool = True) -> None:
        """Several runs' new states, atomically and durably, in one write. ``durable=False``: they
        are intermediate states, and must survive the server's death but not a power cut (the
        next durable write may carry them to disk).

        A run whose stored owner holds another lease than the saved one's (another server
        recovered it, see ``take_over_run``) is not written: the others are, then
        RunTakenOverError names it."""

    def take_over_run(self, run: Run, previous_lease: str | None) -> bool:
        """Store ``run`` (a recovered state, with its recoverer as owner) only if the stored run is
        still queued or running under ``previous_lease`` (None: an owner from before leases): a
        compare-and-set, so of servers recovering one run at once exactly one does. True if stored."""

    def save_runs_now(self, runs: list[Run], *, durable: bool = False) -> bool:
        """``save_runs(runs, durable=durable)`` done at once, when it takes no more than an append to
        a store nobody else is using (and, ``durable``, one fsync): without ``durable`` it never
        blocks, the one write safe on an event loop at any time; False when that cannot be done now
        (nothing was written): call ``save_runs`` off the loop then. Raises StoreError as
        ``save_runs`` does when the write itself fails."""

    def sync(self) -> None:
        """Make every state saved so far durable, those saved with ``durable=False`` included."""

    def get_run(self, run_id: str) -> Run | None: ...

    def unfinished_runs(self) -> list[Run]:
        """Runs still queued or running (by this process or another)."""

    def open_runs_by_queue(self) -> dict[str, int]:
        """How many runs on Temporal are still queued or running, by the step queue of their workers
        (``RunOwner.queue``; every server's runs). Cheap: only what the store indexes, or the open
        runs, is looked at."""

    def prune(self, *, max_runs: int | None, max_age_days: float | None) -> list[str]:
        """Forget finished runs past the limits, with their outputs; returns their ids."""

    def list_runs(self, filter: RunFilter, limit: int, cursor: str | None) -> RunPage:
        """Runs newest first; ``cursor`` is the ``nextCursor`` of the previous page."""

    # -- stashes: a step's whole texts, kept apart until its run's record takes them -----------

    def stash_texts(self, run_id: str, texts: StepTexts) -> bool:
        """Keep ``texts`` durably (replacing an earlier stash of the same step) until
        ``drop_stashes``, or until the run is pruned; False, keeping nothing, when the store holds
        no run ``run_id``."""

    def stashed_texts(self, run_id: str, steps: list[int]) -> list[StepTexts]:
        """The stashes there are of those steps of the run, in step order."""

    def drop_stashes(self, run_id: str, steps: list[int]) -> None:
        """Forget the stashes of those steps of the run; nothing happens for one that is gone."""

    # -- leases: which processes are alive, by the store's clock --------------------------------

    def renew_lease(self, lease: Lease, ttl_s: float) -> Lease:
        """Take a new lease (``expires_at`` None) or extend a held one to ``ttl_s`` seconds from now;
        returns it with its start and new expiry. A lease that lapsed (or was dropped) is never
        taken back: LeaseLostError."""

    def live_leases(self, kind: LeaseKind | None = None) -> list[Lease]:
        """The leases not expired now (of one kind, or all), oldest first."""

    def lease_alive(self, lease_id: str) -> bool: ...

    def drop_lease(self, lease_id: str) -> None:
        """Give a lease up (a clean exit); nothing happens if it is gone already."""


def cursor_after(run: Run) -> str:
    """The cursor of the page that starts just after ``run``."""
    return encode_cursor(run.created_at.astimezone(UTC).strftime(KEY_FORMAT), run.id)


def encode_cursor(created: str, run_id: str) -> str:
    return base64.urlsafe_b64encode(f"{created}|{run_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[str, str]:
    """(creation key, run id) of a cursor this server issued; InvalidRequestError for anything else."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        created, run_id = base64.urlsafe_b64decode(padded.encode()).decode().split("|", 1)
        datetime.strptime(created, KEY_FORMAT)
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequestError(
            "cursor is not one this server issued; pass the nextCursor of the previous page, or omit it"
        ) from None
    return (created, run_id)


def key_time(created: str) -> datetime:
    """The time of a cursor's creation key (see KEY_FORMAT)."""
    return datetime.strptime(created, KEY_FORMAT).replace(tzinfo=UTC)
