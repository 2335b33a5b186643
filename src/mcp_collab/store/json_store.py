"""The JSON store: an append-only log that never loses or corrupts a run, at constant cost per write.

Layout, in the state directory::

    store.lock            flock'ed around every read-modify-write and every catch-up read
    runs.jsonl            the log: a header line, then one JSON object per change
    outputs/RUN/N.txt     the full output of step N of run RUN, written once when the step ends
    store.json            (schema 1, before the log) migrated on first open, then kept as
                          store.json.migrated-v1

Each change (a run's new state, a worker added or removed, a run pruned) is one line appended with
``O_APPEND`` and fsynced before the call returns: what was acknowledged survives ``kill -9``. A
line cut short by a crash (a torn tail) is ignored by readers and cut off by the next writer.
Memory holds a small index (id, time, status, strategy, workers, where the latest record is), not
the runs: reading a run by id is one ``pread`` plus its output files, a page of 50 is 50 preads.

Two processes on one store: both append under the lock and, before every operation, read
whatever the other appended since (or reload, if the other compacted the log), so neither loses an
update and each sees the other's workers and runs.

When superseded records outnumber live ones, the log is compacted: live records are copied to a
temp file that replaces the log atomically (fsync, ``os.replace``, fsync of the directory).

A log from a newer schema is refused untouched. A log whose complete lines do not parse is moved
aside (``runs.jsonl.corrupt-TIMESTAMP``) with a clear message, and a new history starts.
"""

from __future__ import annotations

import base64
import bisect
import contextlib
import fcntl
import json
import logging
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from pydantic import ValidationError

from ..errors import InvalidRequestError, StoreError
from ..models import TERMINAL_RUN_STATUSES, Run, RunPage, Worker
from .base import RunFilter

log = logging.getLogger("mcp_collab.store")

STORE_SCHEMA_VERSION = 2
LOG_NAME = "runs.jsonl"
LOCK_NAME = "store.lock"
OUTPUTS_DIR = "outputs"
V1_NAME = "store.json"
_TMP_MARK = ".tmp-"
# The log record of a step keeps this much of its output; the full text lives in outputs/.
PREVIEW_CHARS = 2_000
# Compact when superseded records exceed live ones by this factor (and this floor): amortized
# O(1) per write, and a log never more than a few times the size of what it holds.
COMPACT_FACTOR = 2
COMPACT_FLOOR = 1_000
_READ_CHUNK = 4 << 20

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


class JsonStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.log_path = directory / LOG_NAME
        self.lock_path = directory / LOCK_NAME
        self.outputs_path = directory / OUTPUTS_DIR
        self._mutex = threading.RLock()
        self._workers: dict[str, Worker] = {}
        self._index: dict[str, _Entry] = {}
        self._order: list[tuple[str, str]] = []  # (created, id), oldest first
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the log we indexed
        self._consumed = 0  # bytes of the log applied to the index
        self._records = 0  # records in the log (live and superseded)
        self.notices: list[str] = []  # what a user should hear about (a log moved aside)
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the store directory {directory}: {exc.strerror}") from exc
        with self._locked():
            self._remove_stray_temps()
            self._migrate_v1()
            self._catch_up()

    # -- workers -----------------------------------------------------------------------------

    def list_workers(self) -> list[Worker]:
        return self._read(lambda: list(self._workers.values()))

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

    def save_runs(self, runs: list[Run]) -> None:
        """Several runs' new states in one append and one fsync."""

        def change() -> None:
            self._append([{"op": "run", "run": _record(r), "outputs": self._write_outputs(r)} for r in runs])

        self._write(change)

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
            runs = [r for r in self._load_runs(picked[:limit], full=False) if r is not None]
            return RunPage(runs=runs, next_cursor=cursor_after(runs[-1]) if more and runs else None)

        return self._read(page)

    def unfinished_runs(self) -> list[Run]:
        def unfinished() -> list[Run]:
            ids = [i for i, e in self._index.items() if e.status not in TERMINAL_RUN_STATUSES]
            return [r for r in self._load_runs(ids, full=False) if r is not None] if ids else []

        return self._read(unfinished)

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
                cutoff = ((now or datetime.now(UTC)).timestamp()) - max_age_days * 86400
                doomed.update(i for i in finished if _timestamp(self._index[i].created) < cutoff)
            ordered = [i for _, i in self._order if i in doomed]
            if ordered:
                self._append([{"op": "unrun", "id": i} for i in ordered])
                for run_id in ordered:
                    shutil.rmtree(self.outputs_path / run_id, ignore_errors=True)
            return ordered

        return self._write(change)

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

    def _load_runs(self, run_ids: list[str], *, full: bool) -> list[Run | None]:
        with open(self.log_path, "rb") as fh:
            return [self._read_run(fh, run_id, full=full) for run_id in run_ids]

    def _read_run(self, fh: Any, run_id: str, *, full: bool) -> Run | None:
        entry = self._index.get(run_id)
        if entry is None:
            return None
        fh.seek(entry.offset)
        run = Run.model_validate(json.loads(fh.read(entry.length))["run"])
        if full:
            for index in entry.outputs:
                path = self.outputs_path / run_id / f"{index}.txt"
                with contextlib.suppress(OSError):
                    run.steps[index].output = path.read_text(encoding="utf-8")
        return run

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

    def _read(self, fn: Callable[[], T]) -> T:
        with self._locked(shared=True):
            self._catch_up()
            return fn()

    def _write(self, fn: Callable[[], T]) -> T:
        with self._locked():
            self._catch_up()
            result = fn()
            if self._records > COMPACT_FLOOR and self._records > COMPACT_FACTOR * (
                len(self._index) + len(self._workers)
            ):
                self._compact()
            return result

    @contextlib.contextmanager
    def _locked(self, *, shared: bool = False) -> Iterator[None]:
        with self._mutex:
            try:
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
            except OSError as exc:
                raise StoreError(f"cannot open the store lock {self.lock_path}: {exc.strerror}") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # closing releases the flock

    def _catch_up(self) -> None:
        """Apply what was appended since we last looked; reload if the log was replaced."""
        try:
            st = os.stat(self.log_path)
        except FileNotFoundError:
            self._reset()
            self._identity = None
            return
        identity = (st.st_dev, st.st_ino)
        if identity != self._identity:
            self._reset()
            self._identity = identity
        if st.st_size == self._consumed:
            return
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(self._consumed)
                position, carry = self._consumed, b""
                while chunk := fh.read(_READ_CHUNK):
                    lines = (carry + chunk).split(b"\n")
                    carry = lines.pop()  # no newline yet: maybe a torn tail, maybe the next chunk's start
                    for raw in lines:
                        self._apply(raw, position)
                        position += len(raw) + 1
                self._consumed = position
        except _MovedAside:
            return

    def _reset(self) -> None:
        self._workers, self._index, self._order = {}, {}, []
        self._consumed = self._records = 0

    def _apply(self, raw: bytes, offset: int) -> None:
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            self._corrupt(f"line at byte {offset} is not JSON")
        if offset == 0:
            self._check_header(record)
            return
        self._apply_record(record, offset, len(raw))

    def _apply_record(self, record: Any, offset: int, length: int) -> None:
        self._records += 1
        op = record.get("op") if isinstance(record, dict) else None
        try:
            if op == "run":
                run = record["run"]
                run_id, created = run["id"], _sort_key(run["createdAt"])
                previous = self._index.get(run_id)
                if previous is None:
                    bisect.insort(self._order, (created, run_id))
                elif previous.created != created:
                    self._order.remove((previous.created, run_id))
                    bisect.insort(self._order, (created, run_id))
                self._index[run_id] = _Entry(
                    created=created,
                    status=run["status"],
                    strategy=run["strategy"],
                    workers=tuple(run.get("workers", ())),
                    offset=offset,
                    length=length,
                    outputs=tuple(record.get("outputs", ())),
                )
            elif op == "unrun":
                entry = self._index.pop(record["id"], None)
                if entry is not None:
                    self._order.remove((entry.created, record["id"]))
            elif op == "worker":
                worker = Worker.model_validate(record["worker"])
                self._workers[worker.name] = worker
            elif op == "unworker":
                self._workers.pop(record["name"], None)
            else:
                self._corrupt(f"line at byte {offset} has an unknown operation {op!r}")
        except (KeyError, TypeError, ValueError) as exc:
            self._corrupt(f"line at byte {offset} is not a valid {op} record ({exc})")

    def _check_header(self, record: Any) -> None:
        version = record.get("schemaVersion") if isinstance(record, dict) else None
        if not isinstance(version, int):
            self._corrupt("the first line is not a store header")
        if version > STORE_SCHEMA_VERSION:
            raise StoreError(
                f"the store {self.log_path} was written by a newer mcp-collab (schema {version}; this version "
                f"reads up to {STORE_SCHEMA_VERSION}); it was left untouched. Upgrade mcp-collab, or point "
                "MCP_COLLAB_STATE_DIR elsewhere."
            )

    def _corrupt(self, problem: str) -> NoReturn:
        """Move the unreadable log aside (never overwrite it) and start a new history."""
        aside = self.log_path.with_name(f"{LOG_NAME}.corrupt-{datetime.now(UTC):%Y%m%dT%H%M%S%fZ}")
        os.replace(self.log_path, aside)
        _fsync_dir(self.directory)
        self._reset()
        self._identity = None
        message = (
            f"the store {self.log_path} could not be read ({problem}); it was moved aside to {aside.name} "
            "untouched and a new history was started. Its runs can be recovered from that file."
        )
        log.error("%s", message)
        self.notices.append(message)
        raise _MovedAside(message)

    def _append(self, records: list[dict[str, Any]]) -> None:
        size = self._prepare_append()
        lines = [json.dumps(r, ensure_ascii=False, separators=(",", ":")).encode("utf-8") for r in records]
        payload = b"".join(line + b"\n" for line in lines)
        fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            _write_all(fd, payload)
            os.fdatasync(fd)
        except OSError as exc:
            raise StoreError(f"cannot write the store {self.log_path}: {exc.strerror}") from exc
        finally:
            os.close(fd)
        position = size
        for record, line in zip(records, lines, strict=True):
            self._apply_record(record, position, len(line))
            position += len(line) + 1
        self._consumed = position

    def _prepare_append(self) -> int:
        """Under the write lock: create the log if needed, cut off a torn tail; return its size."""
        if not self.log_path.exists():
            header = json.dumps({"schemaVersion": STORE_SCHEMA_VERSION, "kind": "mcp-collab-store"}) + "\n"
            _atomic_write(self.log_path, header.encode("utf-8"))
            self._catch_up()
        size = os.path.getsize(self.log_path)
        if size != self._consumed:
            # We hold the write lock and have read every complete line: the rest is the torn tail
            # of a writer that died mid-append.
            with open(self.log_path, "r+b") as fh:
                fh.truncate(self._consumed)
                os.fsync(fh.fileno())
            log.warning("cut a torn tail of %d bytes off %s", size - self._consumed, self.log_path)
            size = self._consumed
        return size

    def _compact(self) -> None:
        tmp = self.log_path.with_name(f"{LOG_NAME}{_TMP_MARK}{os.getpid()}")
        header = json.dumps({"schemaVersion": STORE_SCHEMA_VERSION, "kind": "mcp-collab-store"}) + "\n"
        with open(self.log_path, "rb") as src, open(tmp, "wb") as out:
            out.write(header.encode("utf-8"))
            for worker in self._workers.values():
                line = {"op": "worker", "worker": worker.model_dump(mode="json", by_alias=True)}
                out.write(json.dumps(line, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n")
            for _, run_id in self._order:
                entry = self._index[run_id]
                src.seek(entry.offset)
                out.write(src.read(entry.length) + b"\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.log_path)
        _fsync_dir(self.directory)
        self._identity = None
        self._catch_up()

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
            workers = [Worker.model_validate(w) for w in doc.get("workers", [])]
            runs = [Run.model_validate(r) for r in doc.get("worker_runs", [])]
        except (OSError, ValueError, ValidationError) as exc:
            raise StoreError(
                f"cannot migrate the old store {old}: {exc}; it was left untouched. Move it aside to start "
                "a new history, or point MCP_COLLAB_STATE_DIR elsewhere."
            ) from exc
        for worker in workers:
            self._append([{"op": "worker", "worker": worker.model_dump(mode="json", by_alias=True)}])
        for run in sorted(runs, key=lambda r: r.created_at):
            self._append([{"op": "run", "run": _record(run), "outputs": self._write_outputs(run)}])
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


class _MovedAside(Exception):
    """Unwinds a catch-up whose log was just moved aside; the operation goes on with a new log."""


def _record(run: Run) -> dict[str, Any]:
    record = run.model_dump(mode="json", by_alias=True)
    for step in record["steps"]:
        if len(step["output"]) > PREVIEW_CHARS:
            step["output"] = step["output"][:PREVIEW_CHARS]
    return record


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
        raise StoreError(f"cannot write {path}: {exc.strerror}") from exc


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_KEY_FORMAT = "%Y-%m-%dT%H:%M:%S.%f"


def _sort_key(iso: str) -> str:
    """A creation time as a string that sorts like the time itself (fixed width, UTC)."""
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).astimezone(UTC).strftime(_KEY_FORMAT)


def _timestamp(key: str) -> float:
    return datetime.strptime(key, _KEY_FORMAT).replace(tzinfo=UTC).timestamp()


def cursor_after(run: Run) -> str:
    """The cursor of the page that starts just after ``run``."""
    created = run.created_at.astimezone(UTC).strftime(_KEY_FORMAT)
    return base64.urlsafe_b64encode(f"{created}|{run.id}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[str, str]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        created, run_id = base64.urlsafe_b64decode(padded.encode()).decode().split("|", 1)
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequestError(
            "cursor is not one this server issued; pass the nextCursor of the previous page, or omit it"
        ) from None
    return (created, run_id)
