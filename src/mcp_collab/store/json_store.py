"""The JSON store: an append-only log that never loses or corrupts a run, at constant cost per write.

Layout, in the state directory::

    store.lock            flock'ed around every read-modify-write and every catch-up read
    runs.jsonl            the log: a header line, then one JSON object per change
    leases.json           the live leases (which server processes are alive), replaced atomically
                          under the lock at each renewal
    outputs/RUN/N.txt     the full output of step N of run RUN, written once when the step ends
    outputs/RUN/stash-N.json
                          step N's whole output and diff, stashed by a Temporal worker (too long
                          to travel) until the run's next save takes them; pruned with the run
    store.json            (schema 1, before the log) migrated on first open, then kept as
                          store.json.migrated-v1

Each change (a run's new state, a worker added or removed, a run pruned) is one line appended with
``O_APPEND`` and fsynced before the call returns: what was acknowledged survives ``kill -9`` and a
power cut. A run's intermediate states (``save_runs(..., durable=False)``) are appended without the
fsync: they survive the server's death (the kernel holds them), and the next durable write's fsync
carries them to disk with it. A line cut short by a crash (a torn tail) is ignored by readers and
cut off by the next writer.
Memory holds a small index (id, time, status, strategy, workers, where the latest record is), not
the runs: reading a run by id is one ``pread`` plus its output files, a page of 50 is 50 preads.

Two processes on one store: both append under the lock and, before every operation, read
whatever the other appended since (or reload, if the other compacted the log), so neither loses an
update and each sees the other's workers and runs.

When superseded records outnumber live ones, the log is compacted: live records are copied to a
temp file that replaces the log atomically (fsync, ``os.replace``, fsync of the directory).

A log from a newer schema is refused untouched. Damage is found before it can spread: every
operation checks that the log is not shorter than what was committed and that the last record it
knows still sits where it was written (bytes inserted, cut or overwritten before it move or change
it), and every line read must parse. Damage costs the damaged lines, never the history: the damaged
file is kept aside untouched (``runs.jsonl.damaged-TIMESTAMP``), every intact record before and
after the bad lines is carried into a new log that replaces the old one atomically, and the operator
is told (the server log, ``doctor``, ``check_runtimes``). A log is never grown back, padded or
rewritten in place.

Every failure of the file system (a full disk, a read-only or unwritable directory) fails the one
operation with a ``StoreError`` naming the path and the cause; nothing half-written stays behind.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import errno
import fcntl
import functools
import json
import logging
import os
import shutil
import stat
import threading
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError
from pydantic.alias_generators import to_camel

from ..errors import InvalidRequestError, LeaseLostError, RunTakenOverError, StoreError
from ..models import STORED, TERMINAL_RUN_STATUSES, CostTotals, Lease, LeaseKind, Run, RunPage, Usage, Worker
from .base import KEY_FORMAT as _KEY_FORMAT
from .base import RunFilter, StepTexts
from .base import decode_cursor as _decode_cursor
from .base import encode_cursor as _cursor

log = logging.getLogger("mcp_collab.store")

STORE_SCHEMA_VERSION = 2
LOG_NAME = "runs.jsonl"
LOCK_NAME = "store.lock"
LEASES_NAME = "leases.json"
LEASES_SCHEMA_VERSION = 1
OUTPUTS_DIR = "outputs"
V1_NAME = "store.json"
DAMAGED_MARK = ".damaged-"
# Earlier versions moved an unreadable log aside under this name; doctor still reports them.
CORRUPT_MARK = ".corrupt-"
_TMP_MARK = ".tmp-"
# The log record of a step keeps this much of its output; the full text lives in outputs/.
PREVIEW_CHARS = 2_000
# Compact when superseded records exceed live ones by this factor (and this floor): amortized
# O(1) per write, and a log never more than a few times the size of what it holds.
COMPACT_FACTOR = 2
COMPACT_FLOOR = 1_000
_READ_CHUNK = 4 << 20
# The start-up write check writes this much: a disk with less room than one page cannot hold a run.
PROBE_BYTES = 4096
_HEADER = {"schemaVersion": STORE_SCHEMA_VERSION, "kind": "mcp-collab-store"}

T = TypeVar("T")


@dataclass(frozen=True)
class _Entry:
    """What the index keeps of a run: enough to filter and order without reading it."""

    created: str
    status: str
    strategy: str
    workers: tuple[str, ...]
    offset: int
    length: int
    outputs: tuple[int, ...]
    diffs: tuple[int, ...] = ()
    step_diffs: tuple[int, ...] = ()
    # Per step: its worker, its dollars (None: unknown) and its tokens as stored, for the totals.
    accounts: tuple[tuple[str, float | None, dict[str, Any] | None], ...] = ()
    lease: str | None = None  # the lease of the run's owner (None: no owner, or one from before leases)
    queue: str | None = None  # a run on Temporal: the step queue of its workers


@dataclass(frozen=True)
class _Line:
    """Where the last line we applied sits, and a checksum of it: if it moved or changed, the log
    was altered under us."""

    offset: int
    length: int
    crc: int


class _Damaged(Exception):
    """The log is not what was committed; ``problem`` says how. Repaired under the write lock."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem


def _os_problem(action: str, path: object, exc: OSError) -> StoreError:
    """One line that names the path and the cause (a full disk, a read-only file system ...)."""
    where = exc.filename if exc.filename else path
    cause = exc.strerror or str(exc)
    code = errno.errorcode.get(exc.errno or 0)
    return StoreError(f"cannot {action} the run store at {where}: {cause}" + (f" ({code})" if code else ""))


class JsonStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.log_path = directory / LOG_NAME
        self.lock_path = directory / LOCK_NAME
        self.leases_path = directory / LEASES_NAME
        self.outputs_path = directory / OUTPUTS_DIR
        self._mutex = threading.RLock()
        self._workers: dict[str, Worker] = {}
        self._index: dict[str, _Entry] = {}
        self._order: list[tuple[str, str]] = []  # (created, id), oldest first
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the log we indexed
        self._consumed = 0  # bytes of the log applied to the index
        self._last: _Line | None = None  # the last complete line applied
        self._records = 0  # records in the log (live and superseded)
        self._sums = _Sums()  # cost and token totals, kept as runs come and go
        self._open_runs: collections.Counter[str] = collections.Counter()  # open runs on Temporal, by queue
        self.notices: list[str] = []  # what a user should hear about (damage repaired)
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _os_problem("create", directory, exc) from exc
        if not directory.is_dir():
            raise StoreError(
                f"the run store directory {directory} is not a directory; point MCP_COLLAB_STATE_DIR at one"
            )
        self._guarded(self._open)

    def _open(self) -> None:
        with self._locked():
            self._remove_stray_temps()
            self._migrate_v1()
            self._catch_up(repair=True)

    def check_writable(self) -> None:
        """Fail now, with the cause, if a run could not be stored here (a full disk, a read-only or
        unwritable directory): better a clear refusal to start than a server that cannot keep runs."""

        def probe() -> None:
            with self._locked():
                path = self.directory / f"store.probe{_TMP_MARK}{os.getpid()}"
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                    try:
                        _write_all(fd, b"\0" * PROBE_BYTES)
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                finally:
                    with contextlib.suppress(OSError):
                        path.unlink()
                if self.log_path.exists() and not os.access(self.log_path, os.W_OK):
                    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self.log_path))

        self._guarded(probe, action="write")

    def damage_reports(self) -> list[Path]:
        """Damaged logs kept aside for inspection, oldest first."""
        found = [*self.directory.glob(f"{LOG_NAME}{DAMAGED_MARK}*"), *self.directory.glob(f"{LOG_NAME}{CORRUPT_MARK}*")]
        return sorted(p for p in found if _TMP_MARK not in p.name)

    # -- workers -----------------------------------------------------------------------------

    def list_workers(self) -> list[Worker]:
        return self._read(lambda: list(self._workers.values()))

    def workers_if_current(self) -> list[Worker] | None:
        """The workers from memory, without blocking, when the log is the one we indexed and holds
        nothing we have not read (one ``stat``, cheap enough for an event loop); None when another
        process may have changed it or a thread is using the store: ask ``list_workers`` then.

        What this answers is what was committed; damage to the log is found by the next operation
        that reads or writes it (a dispatch's own save, at once)."""
        if not self._mutex.acquire(blocking=False):
            return None
        try:
            try:
                st = os.stat(self.log_path)
            except OSError:
                return None
            if (st.st_dev, st.st_ino) != self._identity or st.st_size != self._consumed:
                return None
            return list(self._workers.values())
        finally:
            self._mutex.release()

    def get_worker(self, name: str) -> Worker | None:
        return self._read(lambda: self._workers.get(name))

    def add_worker(self, worker: Worker) -> None:
        def change() -> None:
            if worker.name in self._workers:
                raise InvalidRequestError(
                    f"a worker named {worker.name!r} already exists; remove it first or choose another name"
                )
            self._append([{"op": "worker", "worker": worker.model_dump(mode="json", by_alias=True)}])

        self._write(change)

    def remove_worker(self, name: str) -> Worker | None:
        def change() -> Worker | None:
            worker = self._workers.get(name)
            if worker is not None:
                self._append([{"op": "unworker", "name": name}])
            return worker

        return self._write(change)

    # -- runs --------------------------------------------------------------------------------

    def save_run(self, run: Run) -> None:
        self.save_runs([run])

    def save_runs(self, runs: list[Run], *, durable: bool = True) -> None:
        """Several runs' new states in one append and one fsync; ``durable=False`` (intermediate
        states) skips the fsync, which the next durable write makes for both."""

        def change() -> None:
            taken = [r for r in runs if (e := self._index.get(r.id)) is not None and e.lease != _lease_of(r)]
            refused = {r.id for r in taken}
            kept = [r for r in runs if r.id not in refused]
            if kept:
                self._append([self._run_record(r) for r in kept], sync=durable)
            if taken:
                raise _taken_over(taken[0], self._index[taken[0].id].lease)

        self._write(change)

    def take_over_run(self, run: Run, previous_lease: str | None) -> bool:
        def change() -> bool:
            entry = self._index.get(run.id)
            if entry is None or entry.status in TERMINAL_RUN_STATUSES or entry.lease != previous_lease:
                return False
            self._append([self._run_record(run)])
            return True

        return self._write(change)

    def save_runs_now(self, runs: list[Run], *, durable: bool = False) -> bool:
        """``save_runs(runs, durable=durable)`` at once, when it is one append and nothing else: no
        other thread or process in the store (neither lock waited for), the log exactly as we last
        read it (one ``stat`` and the check of its last line), no long text to put in a file of its
        own, no compaction due. A few hundred microseconds (plus the fsync, ``durable``), cheap
        enough for an event loop; False (nothing written) otherwise, and ``save_runs`` does the
        rest off the loop."""
        if any(_has_long_texts(run) for run in runs) or not self._mutex.acquire(blocking=False):
            return False
        try:
            if self._compaction_due(len(runs)):
                return False  # compacted by the next write off the loop
            if any((e := self._index.get(r.id)) is not None and e.lease != _lease_of(r) for r in runs):
                return False  # taken over by another server: save_runs refuses it, with the cause
            return self._guarded(
                lambda: self._append_now([self._run_record(r) for r in runs], durable=durable), action="write"
            )
        finally:
            self._mutex.release()

    def _append_now(self, records: list[dict[str, Any]], *, durable: bool) -> bool:
        fd = self._open_lock()
        if fd is None:
            return False
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # another process is writing or reading: wait for it off the loop
            try:
                log_fd = os.open(self.log_path, os.O_RDWR | os.O_APPEND)
            except FileNotFoundError:
                return False  # the first write creates the log, with an fsync of its own
            try:
                st = os.fstat(log_fd)
                if (st.st_dev, st.st_ino) != self._identity or st.st_size != self._consumed:
                    return False  # another process appended or compacted: catching up reads the log
                if not self._last_line_intact(log_fd):
                    return False  # damage: found and repaired under the write lock, off the loop
                self._append(records, sync=durable, fd=log_fd)
                return True
            finally:
                os.close(log_fd)
        finally:
            os.close(fd)  # closing releases the flock

    def _last_line_intact(self, fd: int) -> bool:
        """The check ``_scan`` makes of a log no longer than what we read: the last line we applied
        still sits where it was written, unchanged."""
        last = self._last
        if last is None:
            return True
        line = os.pread(fd, last.length + 1, last.offset)
        return len(line) == last.length + 1 and line[-1:] == b"\n" and zlib.crc32(line[:-1]) == last.crc

    def sync(self) -> None:
        """fdatasync the log: every append made so far is on disk, those made without an fsync too
        (a log compacted since was fsynced whole by the compaction; syncing it again is cheap)."""

        def flush() -> None:
            fd = os.open(self.log_path, os.O_RDONLY)
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)

        self._guarded(flush, action="write")

    def get_run(self, run_id: str) -> Run | None:
        return self._read(lambda: self._load_run(run_id, full=True))

    def list_runs(self, filter: RunFilter, limit: int, cursor: str | None) -> RunPage:
        after = _decode_cursor(cursor) if cursor else None

        def page() -> RunPage:
            end = bisect.bisect_left(self._order, after) if after is not None else len(self._order)
            picked: list[str] = []
            for i in range(end - 1, -1, -1):
                run_id = self._order[i][1]
                if self._matches(self._index[run_id], filter):
                    picked.append(run_id)
                    if len(picked) > limit:
                        break
            more = len(picked) > limit
            loaded = self._load_runs(picked[:limit], full=False, skip_unreadable=True)
            runs = [r for r in loaded if r is not None]
            last = picked[min(limit, len(picked)) - 1] if picked else None
            next_cursor = _cursor(self._index[last].created, last) if more and last is not None else None
            totals = self._sums.totals(filter)
            return RunPage(runs=runs, next_cursor=next_cursor, totals=totals)

        return self._read(page)

    def unfinished_runs(self) -> list[Run]:
        def unfinished() -> list[Run]:
            ids = [i for i, e in self._index.items() if e.status not in TERMINAL_RUN_STATUSES]
            if not ids:
                return []
            return [r for r in self._load_runs(ids, full=False, skip_unreadable=True) if r is not None]

        return self._read(unfinished)

    def open_runs_by_queue(self) -> dict[str, int]:
        return self._read(lambda: {queue: n for queue, n in self._open_runs.items() if n > 0})

    def all_runs(self) -> list[Run]:
        """Every run, oldest first, with full outputs (for tests and tools; it reads everything)."""

        def everything() -> list[Run]:
            if not self._order:
                return []
            return [r for r in self._load_runs([i for _, i in self._order], full=True) if r is not None]

        return self._read(everything)

    def prune(self, *, max_runs: int | None, max_age_days: float | None, now: datetime | None = None) -> list[str]:
        """Forget finished runs beyond the newest ``max_runs`` or older than ``max_age_days``, with
        their outputs. Runs still queued or running are never pruned. Returns the pruned ids."""

        def change() -> list[str]:
            finished = [i for _, i in self._order if self._index[i].status in TERMINAL_RUN_STATUSES]
            doomed: set[str] = set()
            if max_runs is not None and len(finished) > max_runs:
                doomed.update(finished[: len(finished) - max_runs])
            if max_age_days is not None:
                # Compared as keys, which sort like the times they spell: parsing every run's time
                # made a prune of 100,000 runs take seconds under the write lock.
                cutoff = (now or datetime.now(UTC)) - timedelta(days=max_age_days)
                cutoff_key = cutoff.astimezone(UTC).strftime(_KEY_FORMAT)
                doomed.update(i for i in finished if self._index[i].created < cutoff_key)
            ordered = [i for _, i in self._order if i in doomed]
            if ordered:
                self._append([{"op": "unrun", "id": i} for i in ordered])
                for run_id in ordered:
                    shutil.rmtree(self.outputs_path / run_id, ignore_errors=True)
            return ordered

        return self._write(change)

    # -- stashes -----------------------------------------------------------------------------

    def stash_texts(self, run_id: str, texts: StepTexts) -> bool:
        """Written atomically under the write lock (every temp file is: see ``_remove_stray_temps``),
        beside the run's outputs, so a prune removes it with them."""

        def change() -> bool:
            if run_id not in self._index:
                return False
            path = self._stash_path(run_id, texts.step)
            path.parent.mkdir(parents=True, exist_ok=True)
            doc = {"output": texts.output, "diff": texts.diff, "outputTruncated": texts.output_truncated}
            _atomic_write(path, _line(doc))
            return True

        return self._write(change)

    def stashed_texts(self, run_id: str, steps: list[int]) -> list[StepTexts]:
        def read() -> list[StepTexts]:
            found = []
            for step in sorted(set(steps)):
                path = self._stash_path(run_id, step)
                try:
                    raw = path.read_bytes()
                except FileNotFoundError:
                    continue
                try:  # replaced atomically: whole, unless altered behind our back
                    doc = json.loads(raw)
                    found.append(StepTexts(step, doc["output"], doc["diff"], doc["outputTruncated"]))
                except (ValueError, KeyError, TypeError) as exc:
                    raise StoreError(
                        f"the stashed output {path} cannot be read ({exc!r}); remove it, and step {step} of run "
                        f"{run_id} keeps the cut output that reached the run"
                    ) from None
            return found

        return self._guarded(read, action="read")

    def drop_stashes(self, run_id: str, steps: list[int]) -> None:
        """No fsync: a stash a power cut brings back holds what its run's record took already (a
        save that finds it takes the same texts again), and goes with the run's prune."""

        def drop() -> None:
            for step in steps:
                with contextlib.suppress(FileNotFoundError):
                    self._stash_path(run_id, step).unlink()

        self._guarded(drop, action="write")

    def _stash_path(self, run_id: str, step: int) -> Path:
        return self.outputs_path / run_id / f"stash-{step}.json"

    # -- leases ------------------------------------------------------------------------------

    def renew_lease(self, lease: Lease, ttl_s: float) -> Lease:
        """Under the lock: read the lease file, take or extend ``lease``, forget lapsed ones, and
        replace the file atomically. Time is this host's clock: a JSON store has one host."""

        def change() -> Lease:
            with self._locked():
                now = datetime.now(UTC)
                leases = {k: v for k, v in self._read_leases().items() if _live(v, now)}
                held = leases.get(lease.id)
                if held is None and lease.expires_at is not None:
                    raise LeaseLostError(_lapsed(lease, self.leases_path))
                renewed = lease.model_copy(
                    update={
                        "started_at": held.started_at if held is not None else now,
                        "expires_at": now + timedelta(seconds=ttl_s),
                    }
                )
                leases[lease.id] = renewed
                self._write_leases(leases)
                return renewed

        return self._guarded(change, action="write")

    def live_leases(self, kind: LeaseKind | None = None) -> list[Lease]:
        now = datetime.now(UTC)
        leases = self._guarded(self._read_leases, action="read").values()
        live = [v for v in leases if _live(v, now) and (kind is None or v.kind == kind)]
        return sorted(live, key=lambda v: (v.started_at or now, v.id))

    def lease_alive(self, lease_id: str) -> bool:
        lease = self._guarded(self._read_leases, action="read").get(lease_id)
        return lease is not None and _live(lease, datetime.now(UTC))

    def drop_lease(self, lease_id: str) -> None:
        def change() -> None:
            with self._locked():
                leases = self._read_leases()
                if leases.pop(lease_id, None) is not None:
                    self._write_leases(leases)

        self._guarded(change, action="write")

    def _read_leases(self) -> dict[str, Lease]:
        """The lease file as last replaced (a complete file always: it is replaced atomically)."""
        try:
            raw = self.leases_path.read_bytes()
        except FileNotFoundError:
            return {}
        try:
            doc = json.loads(raw)
            if not isinstance(doc, dict) or doc.get("kind") != "mcp-collab-leases":
                raise ValueError("not a lease file")
            if not isinstance(doc.get("schemaVersion"), int) or doc["schemaVersion"] > LEASES_SCHEMA_VERSION:
                raise ValueError(f"schemaVersion {doc.get('schemaVersion')!r}")
            leases = [Lease.model_validate(v, context=STORED) for v in doc.get("leases", [])]
        except (ValueError, ValidationError) as exc:
            raise StoreError(
                f"the lease file {self.leases_path} cannot be read ({str(exc).splitlines()[0]}); move it aside: "
                "every live server takes its lease anew and interrupts the runs it held"
            ) from None
        return {v.id: v for v in leases}

    def _write_leases(self, leases: dict[str, Lease]) -> None:
        doc = {
            "schemaVersion": LEASES_SCHEMA_VERSION,
            "kind": "mcp-collab-leases",
            "leases": [v.model_dump(mode="json", by_alias=True) for v in leases.values()],
        }
        _atomic_write(self.leases_path, _line(doc))

    # -- reading records ---------------------------------------------------------------------

    @staticmethod
    def _matches(entry: _Entry, filter: RunFilter) -> bool:
        return (
            (filter.status is None or entry.status == filter.status)
            and (filter.strategy is None or entry.strategy == filter.strategy)
            and (filter.worker is None or filter.worker in entry.workers)
        )

    def _load_run(self, run_id: str, *, full: bool) -> Run | None:
        [run] = self._load_runs([run_id], full=full)
        return run

    def _load_runs(self, run_ids: list[str], *, full: bool, skip_unreadable: bool = False) -> list[Run | None]:
        runs: list[Run | None] = []
        if not any(run_id in self._index for run_id in run_ids):
            return [None] * len(run_ids)  # nothing to read (and maybe no log yet)
        with open(self.log_path, "rb") as fh:
            for run_id in run_ids:
                try:
                    runs.append(self._read_run(fh, run_id, full=full))
                except StoreError as exc:
                    if not skip_unreadable:
                        raise
                    log.warning("%s; left out of the list", exc)
        return runs

    def _read_run(self, fh: Any, run_id: str, *, full: bool) -> Run | None:
        entry = self._index.get(run_id)
        if entry is None:
            return None
        fh.seek(entry.offset)
        raw = fh.read(entry.length)
        try:
            record = json.loads(raw)
            data = record["run"]
            if data["id"] != run_id:
                raise ValueError(f"it holds run {data['id']!r}")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise _Damaged(
                f"the record of run {run_id} at byte {entry.offset} changed under the server ({exc})"
            ) from None
        try:
            run = Run.model_validate(data, context=STORED)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:3])
            raise StoreError(
                f"run {run_id} in the store {self.log_path} cannot be read by this version of mcp-collab "
                f"({problems}); it may have been written by a newer version. It was left untouched."
            ) from None
        if full:
            for index in entry.outputs:
                path = self.outputs_path / run_id / f"{index}.txt"
                if index < len(run.steps):
                    with contextlib.suppress(OSError):
                        run.steps[index].output = path.read_text(encoding="utf-8")
            for index in entry.diffs:
                path = self.outputs_path / run_id / f"diff-{index}.patch"
                if index < len(run.worktrees):
                    with contextlib.suppress(OSError):
                        run.worktrees[index].diff = path.read_text(encoding="utf-8")
            for index in entry.step_diffs:
                path = self.outputs_path / run_id / f"step-{index}.patch"
                if index < len(run.steps):
                    with contextlib.suppress(OSError):
                        run.steps[index].diff = path.read_text(encoding="utf-8")
        return run

    def _run_record(self, run: Run) -> dict[str, Any]:
        record: dict[str, Any] = {"op": "run", "run": _record(run), "outputs": self._write_outputs(run)}
        diffs = self._write_diffs(run)
        if diffs:
            record["diffs"] = diffs
        step_diffs = self._write_step_diffs(run)
        if step_diffs:
            record["stepDiffs"] = step_diffs
        return record

    def _write_step_diffs(self, run: Run) -> list[int]:
        """A step's own diff, like a long output, lives in its own file, written once when the step ended."""
        stored = []
        previous = self._index.get(run.id)
        for step in run.steps:
            if len(step.diff) <= PREVIEW_CHARS:
                continue
            stored.append(step.index)
            path = self.outputs_path / run.id / f"step-{step.index}.patch"
            if previous is not None and step.index in previous.step_diffs and path.exists():
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            _atomic_write(path, step.diff.encode("utf-8"))
        return stored

    def _write_diffs(self, run: Run) -> list[int]:
        """A worktree's diff, like a long output, lives in its own file, written once it is final."""
        stored = []
        previous = self._index.get(run.id)
        for i, worktree in enumerate(run.worktrees):
            if len(worktree.diff) <= PREVIEW_CHARS:
                continue
            stored.append(i)
            path = self.outputs_path / run.id / f"diff-{i}.patch"
            if previous is not None and i in previous.diffs and path.exists():
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            _atomic_write(path, worktree.diff.encode("utf-8"))
        return stored

    def _write_outputs(self, run: Run) -> list[int]:
        """Full outputs of finished steps go to their own files, once; the log keeps a preview."""
        stored = []
        for step in run.steps:
            if len(step.output) <= PREVIEW_CHARS:
                continue
            stored.append(step.index)
            path = self.outputs_path / run.id / f"{step.index}.txt"
            previous = self._index.get(run.id)
            if previous is not None and step.index in previous.outputs and path.exists():
                continue  # written when the step ended; a run's later saves do not touch it
            path.parent.mkdir(parents=True, exist_ok=True)
            _atomic_write(path, step.output.encode("utf-8"))
        return stored

    # -- the log -----------------------------------------------------------------------------

    def _guarded(self, fn: Callable[[], T], *, action: str = "use") -> T:
        """Every file-system failure becomes one StoreError naming the path and the cause."""
        try:
            return fn()
        except OSError as exc:
            raise _os_problem(action, self.directory, exc) from exc

    def _read(self, fn: Callable[[], T]) -> T:
        def shared() -> T:
            with self._locked(shared=True):
                self._catch_up()
                return fn()

        def exclusive() -> T:
            # Damage was found under the shared lock: repair it under the write lock, then read.
            with self._locked():
                self._catch_up(repair=True)
                return self._repairing(fn)

        try:
            return self._guarded(shared, action="read")
        except _Damaged:
            pass
        try:
            return self._guarded(exclusive, action="read")
        except _Damaged as damage:
            raise StoreError(
                f"the store {self.log_path} is damaged and could not be repaired: {damage.problem}"
            ) from None

    def _compaction_due(self, coming: int = 0) -> bool:
        records = self._records + coming
        return records > COMPACT_FLOOR and records > COMPACT_FACTOR * (len(self._index) + len(self._workers))

    def _write(self, fn: Callable[[], T]) -> T:
        def change() -> T:
            with self._locked():
                self._catch_up(repair=True)
                result = self._repairing(fn)
                if self._compaction_due():
                    self._compact()
                return result

        try:
            return self._guarded(change, action="write")
        except _Damaged as damage:
            raise StoreError(
                f"the store {self.log_path} is damaged and could not be repaired: {damage.problem}"
            ) from None

    def _repairing(self, fn: Callable[[], T]) -> T:
        """Under the write lock: a record found damaged while ``fn`` read it is repaired, then ``fn``
        runs again on the repaired log."""
        try:
            return fn()
        except _Damaged as damage:
            self._salvage(damage.problem)
            return fn()

    @contextlib.contextmanager
    def _locked(self, *, shared: bool = False) -> Iterator[None]:
        with self._mutex:
            fd = self._open_lock()
            try:
                if fd is not None:
                    fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
                yield
            finally:
                if fd is not None:
                    os.close(fd)  # closing releases the flock

    def _open_lock(self) -> int | None:
        try:
            return os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            if exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise
            # A read-only store can still be read: a lock held read-only works the same, and
            # without a lock file nobody can be writing a store no one can write.
            try:
                return os.open(self.lock_path, os.O_RDONLY)
            except FileNotFoundError:
                return None

    def _catch_up(self, *, repair: bool = False) -> None:
        """Apply what was appended since we last looked; reload if the log was replaced; find
        damage (and, under the write lock, repair it)."""
        try:
            self._scan()
        except _Damaged as damage:
            if not repair:
                raise
            self._salvage(damage.problem)

    def _scan(self) -> None:
        try:
            st = os.stat(self.log_path)
        except FileNotFoundError:
            self._reset()
            self._identity = None
            return
        if not stat.S_ISREG(st.st_mode):
            raise StoreError(
                f"the run store log {self.log_path} is not a regular file; move it away, or point "
                "MCP_COLLAB_STATE_DIR elsewhere"
            )
        identity = (st.st_dev, st.st_ino)
        if identity != self._identity:
            self._reset()
            self._identity = identity
        with open(self.log_path, "rb") as fh:
            if st.st_size < self._consumed:
                raise _Damaged(
                    f"it is {st.st_size} bytes long, shorter than the {self._consumed} bytes already committed "
                    "(it was cut while in use)"
                )
            last = self._last
            if last is not None:
                fh.seek(last.offset)
                line = fh.read(last.length + 1)
                if len(line) != last.length + 1 or line[-1:] != b"\n" or zlib.crc32(line[:-1]) != last.crc:
                    raise _Damaged(
                        f"the record at byte {last.offset} moved or changed (bytes were inserted, removed or "
                        "overwritten before it)"
                    )
            if st.st_size == self._consumed:
                return
            fh.seek(self._consumed)
            position, carry = self._consumed, b""
            while chunk := fh.read(_READ_CHUNK):
                lines = (carry + chunk).split(b"\n")
                carry = lines.pop()  # no newline yet: maybe a torn tail, maybe the next chunk's start
                for raw in lines:
                    self._apply(raw, position)
                    position += len(raw) + 1
                    self._consumed = position

    def _reset(self) -> None:
        self._workers, self._index, self._order = {}, {}, []
        self._sums = _Sums()
        self._open_runs.clear()
        self._consumed = self._records = 0
        self._last = None

    def _apply(self, raw: bytes, offset: int) -> None:
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise _Damaged(f"the line at byte {offset} is not JSON") from None
        if offset == 0:
            if _header_version(record) is None:
                raise _Damaged("the first line is not a store header")
            self._check_header(record)
        else:
            self._apply_record(record, offset, len(raw))
        self._last = _Line(offset, len(raw), zlib.crc32(raw))

    def _apply_record(self, record: Any, offset: int, length: int) -> None:
        op, value = _parse_record(record, offset, length)
        self._records += 1
        if op == "run":
            assert isinstance(value, _Entry)
            run_id = record["run"]["id"]
            entry = value
            previous = self._index.get(run_id)
            if previous is None:
                bisect.insort(self._order, (entry.created, run_id))
            else:
                self._sums.add(previous, -1)
                self._count_open(previous, -1)
                if previous.created != entry.created:
                    self._order.remove((previous.created, run_id))
                    bisect.insort(self._order, (entry.created, run_id))
            self._index[run_id] = entry
            self._sums.add(entry, +1)
            self._count_open(entry, +1)
        elif op == "unrun":
            assert isinstance(value, str)
            gone = self._index.pop(value, None)
            if gone is not None:
                self._order.remove((gone.created, value))
                self._sums.add(gone, -1)
                self._count_open(gone, -1)
        elif op == "worker":
            assert isinstance(value, Worker)
            self._workers[value.name] = value
        else:
            assert isinstance(value, str)
            self._workers.pop(value, None)

    def _count_open(self, entry: _Entry, sign: int) -> None:
        if entry.queue is not None and entry.status not in TERMINAL_RUN_STATUSES:
            self._open_runs[entry.queue] += sign

    def _check_header(self, record: Any) -> None:
        version = _header_version(record)
        if version is not None and version > STORE_SCHEMA_VERSION:
            raise StoreError(
                f"the store {self.log_path} was written by a newer mcp-collab (schema {version}; this version "
                f"reads up to {STORE_SCHEMA_VERSION}); it was left untouched. Upgrade mcp-collab, or point "
                "MCP_COLLAB_STATE_DIR elsewhere."
            )

    def _salvage(self, problem: str) -> None:
        """Under the write lock: keep the damaged log aside untouched and carry every intact record
        into a new log that replaces it atomically. The log is never rewritten in place."""
        stamp = f"{datetime.now(UTC):%Y%m%dT%H%M%S%fZ}"
        aside = self.log_path.with_name(f"{LOG_NAME}{DAMAGED_MARK}{stamp}")
        tmp = self.log_path.with_name(f"{LOG_NAME}{_TMP_MARK}{os.getpid()}")
        kept = dropped = 0
        first_bad: list[int] = []
        try:
            with open(self.log_path, "rb") as src, open(tmp, "wb") as out:
                out.write(_line(_HEADER))
                position, carry = 0, b""
                while True:
                    chunk = src.read(_READ_CHUNK)
                    lines = (carry + chunk).split(b"\n")
                    carry = lines.pop() if chunk else b""
                    for raw in lines:
                        verdict = self._salvageable(raw, position)
                        if verdict is True:
                            out.write(raw + b"\n")
                            kept += 1
                        elif verdict is False:
                            dropped += 1
                            if len(first_bad) < 5:
                                first_bad.append(position)
                        position += len(raw) + 1
                    if not chunk:
                        break
                out.flush()
                os.fsync(out.fileno())
            try:
                os.link(self.log_path, aside)  # the original, byte for byte, for inspection
            except OSError:
                shutil.copyfile(self.log_path, aside)
            os.replace(tmp, self.log_path)
            _fsync_dir(self.directory)
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
        self._reset()
        self._identity = None
        where = f" (the first at byte {', '.join(map(str, first_bad))})" if first_bad else ""
        message = (
            f"the store {self.log_path} was damaged: {problem}. {dropped} unreadable line(s) were dropped{where} "
            f"and {kept} intact record(s) kept; the damaged file is kept untouched as {aside.name} for inspection"
        )
        log.error("%s", message)
        self.notices.append(message)
        self._scan()

    def _salvageable(self, raw: bytes, offset: int) -> bool | None:
        """True: an intact record to keep; False: a damaged line; None: nothing to carry (the
        header, or an empty line)."""
        if not raw.strip():
            return None
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return False
        if _header_version(record) is not None:
            self._check_header(record)
            return None
        try:
            _parse_record(record, offset)
        except _Damaged:
            return False
        return True

    def _append(self, records: list[dict[str, Any]], *, sync: bool = True, fd: int | None = None) -> None:
        """Append ``records`` under the write lock; ``fd``: the log, already open for appending and
        checked to be exactly what we read (``_append_now``)."""
        size = self._prepare_append() if fd is None else self._consumed
        lines = [_line(r)[:-1] for r in records]
        payload = b"".join(line + b"\n" for line in lines)
        own = fd is None
        if fd is None:
            try:
                fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND)
            except OSError as exc:
                raise _os_problem("write", self.log_path, exc) from exc
        try:
            _write_all(fd, payload)
            if sync:
                # The whole file's dirty data, so earlier appends made without a sync land with it.
                os.fdatasync(fd)
        except OSError as exc:
            # Nothing half-written stays: a failed append is cut back to the last committed byte.
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            raise _os_problem("write", self.log_path, exc) from exc
        finally:
            if own:
                os.close(fd)
        position = size
        for record, line in zip(records, lines, strict=True):
            self._apply_record(record, position, len(line))
            self._last = _Line(position, len(line), zlib.crc32(line))
            position += len(line) + 1
        self._consumed = position

    def _prepare_append(self) -> int:
        """Under the write lock: create the log if needed, cut off a torn tail; return its size."""
        if not self.log_path.exists():
            _atomic_write(self.log_path, _line(_HEADER))
            self._scan()
        size = os.path.getsize(self.log_path)
        if size > self._consumed:
            # We hold the write lock and have read every complete line: the rest is the torn tail
            # of a writer that died mid-append, never acknowledged. (A log shorter than what we
            # read is damage, found by the catch-up before we get here: never grown back.)
            with open(self.log_path, "r+b") as fh:
                fh.truncate(self._consumed)
                os.fsync(fh.fileno())
            log.warning("cut a torn tail of %d bytes off %s", size - self._consumed, self.log_path)
            size = self._consumed
        return size

    def _compact(self) -> None:
        tmp = self.log_path.with_name(f"{LOG_NAME}{_TMP_MARK}{os.getpid()}")
        with open(self.log_path, "rb") as src, open(tmp, "wb") as out:
            out.write(_line(_HEADER))
            for worker in self._workers.values():
                out.write(_line({"op": "worker", "worker": worker.model_dump(mode="json", by_alias=True)}))
            for _, run_id in self._order:
                entry = self._index[run_id]
                src.seek(entry.offset)
                out.write(src.read(entry.length) + b"\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.log_path)
        _fsync_dir(self.directory)
        self._identity = None
        self._scan()

    def _migrate_v1(self) -> None:
        """A schema-1 store (one JSON document) becomes the log, once; the old file is kept."""
        old = self.directory / V1_NAME
        if not old.exists() or self.log_path.exists():
            return
        try:
            doc = json.loads(old.read_text(encoding="utf-8"))
            version = doc.get("schemaVersion") if isinstance(doc, dict) else None
            if version != 1:
                raise ValueError(f"schemaVersion {version!r}")
            workers = [Worker.model_validate(w, context=STORED) for w in doc.get("workers", [])]
            runs = [Run.model_validate(r, context=STORED) for r in doc.get("worker_runs", [])]
        except (OSError, ValueError, ValidationError) as exc:
            raise StoreError(
                f"cannot migrate the old store {old}: {exc}; it was left untouched. Move it aside to start "
                "a new history, or point MCP_COLLAB_STATE_DIR elsewhere."
            ) from exc
        for worker in workers:
            self._append([{"op": "worker", "worker": worker.model_dump(mode="json", by_alias=True)}])
        for run in sorted(runs, key=lambda r: r.created_at):
            self._append([self._run_record(run)])
        os.replace(old, old.with_name(f"{V1_NAME}.migrated-v1"))
        _fsync_dir(self.directory)
        log.info("migrated %d workers and %d runs from %s to the schema-%d log", len(workers), len(runs), old, 2)

    def _remove_stray_temps(self) -> None:
        """Every temp file is written under the exclusive lock we hold now: any left is a dead writer's."""
        candidates = list(self.directory.glob(f"*{_TMP_MARK}*"))
        if self.outputs_path.is_dir():
            candidates += list(self.outputs_path.glob(f"*/*{_TMP_MARK}*"))
        for tmp in candidates:
            with contextlib.suppress(OSError):
                tmp.unlink()


def _header_version(record: Any) -> int | None:
    if isinstance(record, dict) and record.get("kind") == "mcp-collab-store":
        version = record.get("schemaVersion")
        return version if isinstance(version, int) else None
    if isinstance(record, dict) and "op" not in record and isinstance(record.get("schemaVersion"), int):
        return int(record["schemaVersion"])
    return None


def _parse_record(record: Any, offset: int, length: int = 0) -> tuple[str, _Entry | Worker | str]:
    """What a log line (``length`` bytes at ``offset``) says, checked for shape; ``_Damaged`` when it
    cannot be a record."""
    op = record.get("op") if isinstance(record, dict) else None
    try:
        if op == "run":
            run = record["run"]
            if not isinstance(run["id"], str) or not isinstance(run["status"], str):
                raise TypeError("id and status must be strings")
            workers = run.get("workers", ())
            outputs, diffs = record.get("outputs", ()), record.get("diffs", ())
            step_diffs = record.get("stepDiffs", ())
            indexes = (*outputs, *diffs, *step_diffs)
            if not all(isinstance(w, str) for w in workers) or not all(isinstance(i, int) for i in indexes):
                raise TypeError("workers, outputs and diffs must be lists of names and indexes")
            return op, _Entry(
                created=_sort_key(run["createdAt"]),
                status=run["status"],
                strategy=str(run["strategy"]),
                workers=tuple(workers),
                offset=offset,
                length=length,
                outputs=tuple(outputs),
                diffs=tuple(diffs),
                step_diffs=tuple(step_diffs),
                accounts=_accounts(run.get("steps")),
                lease=_stored_owner(run.get("owner"), "lease"),
                queue=_stored_owner(run.get("owner"), "queue"),
            )
        if op == "unrun" and isinstance(record["id"], str):
            return op, record["id"]
        if op == "worker":
            return op, Worker.model_validate(record["worker"], context=STORED)
        if op == "unworker" and isinstance(record["name"], str):
            return op, record["name"]
    except (KeyError, TypeError, ValueError) as exc:
        raise _Damaged(f"the line at byte {offset} is not a valid {op} record ({type(exc).__name__})") from None
    raise _Damaged(f"the line at byte {offset} is not a record this version knows (op {str(op)[:40]!r})")


def _stored_owner(owner: Any, name: str) -> str | None:
    """A text field of a stored run's owner (its lease, its queue), if it has one."""
    value = owner.get(name) if isinstance(owner, dict) else None
    return value if isinstance(value, str) else None


def _live(lease: Lease, now: datetime) -> bool:
    return lease.expires_at is not None and lease.expires_at > now


def _lapsed(lease: Lease, where: object) -> str:
    return (
        f"the lease {lease.id} of this {lease.kind} (pid {lease.pid} on {lease.host}) in {where} lapsed before it "
        "was renewed (the process was stopped or cut off from the store for longer than its TTL); whatever it "
        "owned may have been recovered by another server"
    )


def _lease_of(run: Run) -> str | None:
    return run.owner.lease if run.owner is not None else None


def _taken_over(run: Run, holder: str | None) -> RunTakenOverError:
    return RunTakenOverError(
        f"run {run.id} was recovered by another server (it is now owned under lease {holder}, not "
        f"{_lease_of(run)}); this save of it was refused and the recovered state stands"
    )


def _accounts(steps: Any) -> tuple[tuple[str, float | None, dict[str, Any] | None], ...]:
    """What the totals need of a stored run's steps; a run of an older shape has none of it."""
    accounts = []
    for step in steps if isinstance(steps, list) else ():
        if not isinstance(step, dict):
            continue
        cost, usage = step.get("costUsd"), step.get("usage")
        accounts.append(
            (
                str(step.get("workerName", "")),
                float(cost) if isinstance(cost, (int, float)) and not isinstance(cost, bool) else None,
                usage if isinstance(usage, dict) else None,
            )
        )
    return tuple(accounts)


_USAGE_FIELDS = tuple(Usage.model_fields)
_USAGE_NAMES = tuple((name, to_camel(name)) for name in _USAGE_FIELDS)  # (field, its name on disk)


class _Sums:
    """Cost and token totals of the indexed runs, kept up to date as runs are stored, replaced and
    pruned, by (status, strategy, worker) -- worker None for whole runs, a name for that worker's
    steps only -- so a list's totals over every matching run cost a few additions, not a pass over
    the history. A vector is [runs, dollars, uncosted steps, then per token field: sum, reports]."""

    def __init__(self) -> None:
        self.by_key: dict[tuple[str, str, str | None], list[float]] = {}

    def add(self, entry: _Entry, sign: int) -> None:
        for worker, vector in _contributions(entry).items():
            key = (entry.status, entry.strategy, worker)
            into = self.by_key.setdefault(key, [0.0] * len(vector))
            for i, value in enumerate(vector):
                into[i] += sign * value
            if not into[0]:
                del self.by_key[key]

    def totals(self, filter: RunFilter) -> CostTotals:
        total = [0.0] * (3 + 2 * len(_USAGE_FIELDS))
        for (status, strategy, worker), vector in self.by_key.items():
            if worker != filter.worker or (filter.status or status) != status:
                continue
            if (filter.strategy or strategy) != strategy:
                continue
            for i, value in enumerate(vector):
                total[i] += value
        tokens = {name: int(total[3 + 2 * i]) if total[4 + 2 * i] else None for i, name in enumerate(_USAGE_FIELDS)}
        return CostTotals(
            runs=int(total[0]), usage=Usage(**tokens), cost_usd=round(total[1], 9), uncosted_steps=int(total[2])
        )


def _contributions(entry: _Entry) -> dict[str | None, list[float]]:
    """What one run adds to the totals: as a whole (key None), and per worker that took a step."""
    vectors: dict[str | None, list[float]] = {}
    for name, cost, usage in entry.accounts:
        for key in (None, name):
            vector = vectors.setdefault(key, [1.0] + [0.0] * (2 + 2 * len(_USAGE_FIELDS)))
            if cost is not None:
                vector[1] += cost
            elif usage is not None:
                vector[2] += 1
            for i, (field_name, stored_name) in enumerate(_USAGE_NAMES):
                value = _token(usage, field_name, stored_name)
                if value is not None:
                    vector[3 + 2 * i] += value
                    vector[4 + 2 * i] += 1
    vectors.setdefault(None, [1.0] + [0.0] * (2 + 2 * len(_USAGE_FIELDS)))  # a run with no step counts too
    return vectors


def _token(usage: dict[str, Any] | None, name: str, stored_name: str) -> int | None:
    """A token count as stored (camelCase on disk); anything else is not a count."""
    if usage is None:
        return None
    value = usage.get(stored_name, usage.get(name))
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _has_long_texts(run: Run) -> bool:
    """Would storing ``run`` write a file of its own (an output or a diff past the preview)?"""
    return any(len(s.output) > PREVIEW_CHARS or len(s.diff) > PREVIEW_CHARS for s in run.steps) or any(
        len(w.diff) > PREVIEW_CHARS for w in run.worktrees
    )


def _record(run: Run) -> dict[str, Any]:
    record = run.model_dump(mode="json", by_alias=True)
    for item, key in [
        *((s, "output") for s in record["steps"]),
        *((s, "diff") for s in record["steps"]),
        *((w, "diff") for w in record["worktrees"]),
    ]:
        if len(item[key]) > PREVIEW_CHARS:
            item[key] = item[key][:PREVIEW_CHARS]
    return record


def _line(record: dict[str, Any]) -> bytes:
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}{_TMP_MARK}{os.getpid()}-{threading.get_ident()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise _os_problem("write", path, exc) from exc


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@functools.lru_cache(maxsize=4096)  # a run's every record repeats its creation time
def _sort_key(iso: str) -> str:
    """A creation time as a string that sorts like the time itself (fixed width, UTC)."""
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).astimezone(UTC).strftime(_KEY_FORMAT)
