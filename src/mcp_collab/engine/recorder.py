"""Persistence of run states: durable when a caller must be able to rely on it, written behind
(batched across runs, without an fsync of their own) when it is only an intermediate state."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from collections.abc import Callable

import anyio
import anyio.to_thread

from ..errors import StoreError
from ..models import Run, clone
from ..security import Redactor
from ..store import RunStore
from .locks import held

log = logging.getLogger("mcp_collab.engine")

# Told when a run's admission is durable (None), or why it could not be made so.
Settled = Callable[[StoreError | None], None]

# An intermediate state waits this long before it is written, so the states a run passes through
# quickly (a step that answers at once: started, spawned, ended) cost one durable write, not three.
# Nothing depends on an intermediate state landing sooner: a waiting client flushes it, and recovery
# finds a spawn whose record is missing by the server's marker tag.
WRITE_BEHIND_DELAY_S = 0.05
# A durable save of the one run in flight is written and fsynced on the event loop while the store's
# durable writes have lately taken no longer than this; beyond, they go to a thread until one is
# quick again. On a quick disk the trip to a thread and back costs more than the fsync itself
# (bench/dispatch_overhead.py), and with no other run in flight nothing else waits on the loop.
INLINE_SYNC_MAX_S = 0.002


class RunRecorder:
    def __init__(self, store: RunStore, redact: Redactor) -> None:
        self.store = store
        self.redact = redact
        # Store writes go one at a time, so a write-behind batch never lands after a newer state.
        self._write_lock = anyio.Lock()
        self._pending: dict[str, Run] = {}
        self._pending_ready = anyio.Event()
        self._behind = False  # a write-behind task is running
        self._last_error: str | None = None
        # Group commit of admissions written without an fsync (``accept``): how many were written,
        # how many of them are known durable, the fsync under way (one serves every waiter), and
        # who is told when theirs is durable (or could not be made so), by admission number.
        self._written = 0
        self._synced = 0
        self._syncing: anyio.Event | None = None
        self._owed: list[tuple[int, Settled]] = []
        # How long the last durable write took (``INLINE_SYNC_MAX_S``), measured where it was made;
        # unknown until the first, which is made off the loop.
        self._sync_took = math.inf

    async def accept(self, run: Run, settled: Settled) -> bool:
        """Store a run just admitted, before anything of it starts. Written at once on the event loop
        when the store allows it: the record then survives the server's death, which is what
        recovery needs to find the run and kill whatever it started, but not yet a power cut (which
        kills those processes too). Returns True then: nobody may hear of the run before it is
        durable, which the first of these makes it: a ``sync`` (a caller's, or the write-behind
        task's within ``WRITE_BEHIND_DELAY_S``) or any durable save (say, the run's own end);
        ``settled`` is called then, with the error if that fsync failed. Else (False) the run is
        saved durably off the loop, as any durable save, and nothing is owed."""
        self.redact.scrub(run)
        if self.store.save_runs_now([run]):
            self._written += 1
            self._owed.append((self._written, settled))
            self._pending_ready.set()  # the write-behind task makes it durable if nothing else does
            return True
        await self.save(run)
        return False

    @property
    def owed(self) -> bool:
        """Is an admission written but not yet durable?"""
        return self._synced < self._written

    async def sync(self) -> None:
        """Until every run ``accept`` wrote is durable: one fsync, off the loop, serves every caller
        waiting at once (group commit); a durable save made since counts too."""
        target = self._written
        while self._synced < target:
            if self._syncing is not None:
                await self._syncing.wait()  # begun before our write, maybe: then go round again
                continue
            self._syncing = done = anyio.Event()
            covered = self._written
            try:
                await anyio.to_thread.run_sync(self.store.sync)
            except StoreError as exc:
                self._settle(covered, exc)
                raise
            else:
                self._settle(covered, None)
            finally:
                self._syncing = None
                done.set()

    def _settle(self, covered: int, error: StoreError | None) -> None:
        """Writes up to admission ``covered`` are durable, or could not be made so: say so to theirs.
        Either way they are settled: a failed fsync is not tried again for them (their runs are
        stopped with the cause), so readers of the store go on being answered."""
        self._synced = max(self._synced, covered)
        due = [settled for number, settled in self._owed if number <= covered]
        self._owed = [(number, settled) for number, settled in self._owed if number > covered]
        for settled in due:
            settled(error)

    async def save(self, run: Run, *, durable: bool = True, alone: bool = False) -> None:
        """Persist a run's state. Durable saves are on disk when this returns (a run handed to a
        client, a run's end). Intermediate states (a step started, its process spawned) are written
        behind, after ``WRITE_BEHIND_DELAY_S``, batched with other runs' and without an fsync (they
        survive the server's death; the next durable save's fsync carries them to disk), so they
        cost the step nothing; with no write-behind task (a Temporal worker's recorder), at once
        without an fsync.

        ``alone``: ``run`` is the only run the caller has in flight. A durable save is then made on
        the event loop, when the store can make it at once and its durable writes have been quick
        (``INLINE_SYNC_MAX_S``); else, and for every other save, off the loop.

        Every string of the run passes the redactor on its way to the store, the one door to it and,
        through the run kept in memory, to every caller (who see a run's memory only once it ended,
        after its last save)."""
        if not durable and self._behind:
            # The live run is kept, not a copy: several saves of one run before the next batch cost
            # one copy (and one pass of the redactor), taken when the batch is written.
            self._pending[run.id] = run
            self._pending_ready.set()
            return
        self.redact.scrub(run)
        async with held(self._write_lock):
            self._pending.pop(run.id, None)
            covered = self._written  # its fsync makes every earlier write durable
            if (
                durable
                and alone
                and self._sync_took <= INLINE_SYNC_MAX_S
                and self._timed(self.store.save_runs_now, run)
            ):
                pass  # written and fsynced on the loop
            elif durable:
                await anyio.to_thread.run_sync(self._timed, self.store.save_runs, run)
            else:
                # Intermediate with no write-behind task (a worker's): written now, without an fsync.
                await anyio.to_thread.run_sync(functools.partial(self.store.save_runs, [run], durable=False))
            if durable and covered > self._synced:
                self._settle(covered, None)

    def _timed(self, write: Callable[..., bool | None], run: Run) -> bool:
        """A durable write of ``run`` (``save_runs``, or ``save_runs_now``, which may decline: False),
        timed where it is made, for ``INLINE_SYNC_MAX_S``."""
        began = time.perf_counter()
        if write([run], durable=True) is False:
            return False
        self._sync_took = time.perf_counter() - began
        return True

    async def flush(self, run_id: str) -> None:
        """Make a run's state written behind durable now (before a caller is told about it)."""
        run = self._pending.get(run_id)
        if run is not None:
            await self.save(run)

    async def catch_up(self) -> None:
        """Write the states still waiting behind now (without a sync), so a reader of the store (a
        list of runs) sees every run as it stands, not as it stood 50 ms ago."""
        async with held(self._write_lock):  # also waits for a batch being written right now
            batch = self._take_pending()
            if batch:
                await self._write_batch(batch)

    async def write_behind(self) -> None:
        """The task that writes intermediate states; runs until cancelled."""
        self._behind = True
        try:
            while True:
                await self._pending_ready.wait()
                await anyio.sleep(WRITE_BEHIND_DELAY_S)  # a state superseded meanwhile is never written
                self._pending_ready = anyio.Event()
                async with held(self._write_lock):
                    batch = self._take_pending()
                    if batch:
                        await self._write_batch(batch)
                if self.owed:
                    # Admissions nothing made durable meanwhile (runs still going): now, in one fsync.
                    with contextlib.suppress(StoreError):  # their runs are stopped with the cause
                        await self.sync()
        finally:
            self._behind = False

    def _take_pending(self) -> list[Run]:
        """The states waiting behind, redacted and copied here, on the event loop, so the store's
        thread never sees a run change under it."""
        batch = []
        for run in self._pending.values():
            self.redact.scrub(run)
            batch.append(clone(run))
        self._pending.clear()
        return batch

    async def _write_batch(self, batch: list[Run]) -> None:
        try:
            await anyio.to_thread.run_sync(functools.partial(self.store.save_runs, batch, durable=False))
        except StoreError as exc:
            # Intermediate states only: each run's next durable save carries its whole state (or
            # fails that run). Said once per distinct cause, not per batch.
            if str(exc) != self._last_error:
                log.error("intermediate run states were not stored: %s", exc)
            self._last_error = str(exc)
        else:
            self._last_error = None
