"""Getting the work back: apply a finished run's branch to the user's working tree, or discard it;
and retention of the worktrees of runs the store no longer keeps."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import anyio.to_thread

from .. import worktrees
from ..config import Settings
from ..errors import InvalidRequestError
from ..models import TERMINAL_RUN_STATUSES, Run, RunWorktree
from ..store import RunStore

_RUN_ID = re.compile(r"run-\d{8}-\d{6}-[0-9a-f]{8}")


@dataclass(frozen=True)
class Delivered:
    run: Run
    branches: tuple[str, ...]
    applied: bool
    files: tuple[str, ...]
    message: str


def rebuild(run: Run, record: RunWorktree) -> worktrees.Worktree:
    """The worktree of a stored run, from its record."""
    assert run.repository is not None
    return worktrees.Worktree(
        run_id=run.id,
        label=record.label,
        repo_top=Path(run.repository),
        common_dir=Path(record.git_dir),
        path=Path(record.path),
        entry=record.entry,
        branch=record.branch,
        head_commit=record.head_commit,
        base_commit=record.base_commit,
        carried_changes=record.carried_changes,
    )


def pick(run: Run, label: str | None) -> RunWorktree:
    """The worktree a caller means: the one named, else the judge's choice, else the only one."""
    if run.status not in TERMINAL_RUN_STATUSES:
        raise InvalidRequestError(f"run {run.id} is {run.status}; wait for it to end (wait_worker_run), then apply it")
    if not run.worktrees:
        where = f" in {run.repository}" if run.repository else ""
        raise InvalidRequestError(
            f"run {run.id} has no worktree: its writers worked in place{where}, so its changes are already there"
        )
    labels = [w.label or "(none)" for w in run.worktrees]
    if label is not None:
        found = [w for w in run.worktrees if w.label == label]
        if not found:
            raise InvalidRequestError(
                f"run {run.id} has no branch labelled {label!r}; its branches: {', '.join(labels)}"
            )
        return found[0]
    if run.chosen is not None:
        return next(w for w in run.worktrees if w.label == run.chosen)
    if len(run.worktrees) == 1:
        return run.worktrees[0]
    raise InvalidRequestError(
        f"run {run.id} has {len(run.worktrees)} branches and no chosen one; name one with branch: {', '.join(labels)}"
    )


async def apply(settings: Settings, run: Run, label: str | None) -> Delivered:
    record = pick(run, label)
    if record.state == "discarded":
        raise InvalidRequestError(f"the work of run {run.id} ({record.branch}) was discarded; nothing to apply")
    assert run.repository is not None
    outcome = await worktrees.apply(Path(run.repository), record, roots=settings.workspace_roots)
    if outcome.applied and outcome.files:
        record.state = "applied"
    return Delivered(run, (record.branch,), outcome.applied, outcome.files, outcome.message)


async def discard(run: Run) -> Delivered:
    if run.status not in TERMINAL_RUN_STATUSES:
        raise InvalidRequestError(f"run {run.id} is {run.status}; cancel it first (cancel_worker_run)")
    if not run.worktrees:
        raise InvalidRequestError(f"run {run.id} has no worktree to discard: its writers worked in place")
    removed = []
    for record in run.worktrees:
        if record.state != "discarded":
            await worktrees.remove(rebuild(run, record))
            record.state = "discarded"
            removed.append(record.branch)
    message = f"discarded {', '.join(removed)}: worktrees and branches removed" if removed else "already discarded"
    return Delivered(run, tuple(removed), False, (), message)


async def prune_worktrees(settings: Settings, store: RunStore) -> list[str]:
    """Remove the worktrees of runs the store no longer holds (retention pruned them)."""
    base = settings.worktrees_dir
    if not base.is_dir():
        return []

    def alive() -> set[str]:
        ids = {m.group(0) for p in base.iterdir() if (m := _RUN_ID.match(p.name))}
        return {i for i in ids if store.get_run(i) is not None}

    kept = await anyio.to_thread.run_sync(alive)
    return await worktrees.prune(base, keep=lambda run_id: run_id in kept)
