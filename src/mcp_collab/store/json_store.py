"""A JSON file store that never loses or corrupts a run.

Layout: one document ``store.json`` = ``{"schemaVersion", "workers": [...], "worker_runs": [...]}``
beside a lock file ``store.lock``.

- Every commit is atomic: the whole document goes to a temp file in the same directory, which is
  flushed, fsynced, ``os.replace``d over the old one, and the directory fsynced. A crash leaves the
  old document or the new one, never a mix.
- Every read-modify-write holds an exclusive ``flock`` on the lock file, and first reloads the
  document if another process replaced it (inode, size or mtime changed), so two servers on one
  store never lose each other's updates and each sees the other's runs.
- A document of a newer schema, or one that does not parse, is refused with a clear message and
  never overwritten.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import json
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError

from ..errors import InvalidRequestError, StoreError
from ..models import Run, RunPage, Worker
from .base import RunFilter

STORE_SCHEMA_VERSION = 1
_TMP_PREFIX = ".store.json.tmp-"

T = TypeVar("T")


class JsonStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock_path = path.with_name("store.lock")
        self._mutex = threading.Lock()
        self._workers: dict[str, Worker] = {}
        self._runs: dict[str, Run] = {}
        self._seen: tuple[int, int, int] | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the store directory {path.parent}: {exc.strerror}") from exc
        with self._locked():
            self._remove_stray_temps()

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
            self._workers[worker.name] = worker

        self._write(change)

    def remove_worker(self, name: str) -> Worker | None:
        return self._write(lambda: self._workers.pop(name, None))

    # -- runs --------------------------------------------------------------------------------

    def save_run(self, run: Run) -> None:
        def change() -> None:
            self._runs[run.id] = run.model_copy(deep=True)

        self._write(change)

    def get_run(self, run_id: str) -> Run | None:
        return self._read(lambda: self._runs.get(run_id))

    def list_runs(self, filter: RunFilter, limit: int, cursor: str | None) -> RunPage:
        after = _decode_cursor(cursor) if cursor else None

        def page() -> RunPage:
            ordered = sorted(self._runs.values(), key=_order_key, reverse=True)
            picked: list[Run] = []
            for run in ordered:
                if after is not None and _order_key(run) >= after:
                    continue
                if filter.matches(run):
                    picked.append(run)
                    if len(picked) > limit:
                        break
            more = len(picked) > limit
            picked = picked[:limit]
            return RunPage(runs=picked, next_cursor=cursor_after(picked[-1]) if more and picked else None)

        return self._read(page)

    def unfinished_runs(self) -> list[Run]:
        return self._read(lambda: [r for r in self._runs.values() if r.status in ("queued", "running")])

    def all_runs(self) -> list[Run]:
        return self._read(lambda: list(self._runs.values()))

    # -- machinery ---------------------------------------------------------------------------

    def _read(self, fn: Callable[[], T]) -> T:
        with self._locked(shared=True):
            self._catch_up()
            return fn()

    def _write(self, fn: Callable[[], T]) -> T:
        with self._locked():
            self._catch_up()
            workers, runs = dict(self._workers), dict(self._runs)
            try:
                result = fn()
                self._commit()
            except BaseException:
                self._workers, self._runs = workers, runs
                raise
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

    def _signature(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _catch_up(self) -> None:
        signature = self._signature()
        if signature == self._seen:
            return
        if signature is None:
            self._workers, self._runs, self._seen = {}, {}, None
            return
        self._workers, self._runs = self._load()
        self._seen = signature

    def _load(self) -> tuple[dict[str, Worker], dict[str, Run]]:
        try:
            raw = self.path.read_text(encoding="utf-8")
            doc = json.loads(raw)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise StoreError(
                f"the store {self.path} is unreadable ({exc}); it was left untouched. "
                "Move it aside to start a new history, or point MCP_COLLAB_STATE_DIR elsewhere."
            ) from exc
        if not isinstance(doc, dict) or not isinstance(doc.get("schemaVersion"), int):
            raise StoreError(
                f"the store {self.path} has no schemaVersion; it was left untouched. "
                "Move it aside to start a new history, or point MCP_COLLAB_STATE_DIR elsewhere."
            )
        version = doc["schemaVersion"]
        if version > STORE_SCHEMA_VERSION:
            raise StoreError(
                f"the store {self.path} was written by a newer mcp-collab (schema {version}; this version "
                f"reads up to {STORE_SCHEMA_VERSION}); it was left untouched. Upgrade mcp-collab."
            )
        try:
            workers = [Worker.model_validate(w) for w in doc.get("workers", [])]
            runs = [Run.model_validate(r) for r in doc.get("worker_runs", [])]
        except ValidationError as exc:
            raise StoreError(
                f"the store {self.path} holds a record this version cannot read; it was left untouched: "
                f"{exc.errors()[0].get('msg')} at {exc.errors()[0].get('loc')}"
            ) from exc
        return {w.name: w for w in workers}, {r.id: r for r in runs}

    def _commit(self) -> None:
        doc: dict[str, Any] = {
            "schemaVersion": STORE_SCHEMA_VERSION,
            "workers": [w.model_dump(mode="json", by_alias=True) for w in self._workers.values()],
            "worker_runs": [r.model_dump(mode="json", by_alias=True) for r in self._runs.values()],
        }
        data = json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        tmp = self.path.with_name(f"{_TMP_PREFIX}{os.getpid()}-{threading.get_ident()}")
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise StoreError(f"cannot write the store {self.path}: {exc.strerror}") from exc
        self._seen = self._signature()

    def _remove_stray_temps(self) -> None:
        """Temp files of writers that died mid-commit; a live writer's temp is left alone."""
        for tmp in self.path.parent.glob(f"{_TMP_PREFIX}*"):
            pid_text = tmp.name[len(_TMP_PREFIX) :].split("-", 1)[0]
            if pid_text.isdigit() and _pid_alive(int(pid_text)) and int(pid_text) != os.getpid():
                continue
            with contextlib.suppress(OSError):
                tmp.unlink()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno == errno.EPERM
    return True


def _order_key(run: Run) -> tuple[str, str]:
    return (run.created_at.isoformat(), run.id)


def cursor_after(run: Run) -> str:
    """The cursor of the page that starts just after ``run``."""
    created, run_id = _order_key(run)
    return base64.urlsafe_b64encode(f"{created}|{run_id}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[str, str]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        created, run_id = base64.urlsafe_b64decode(padded.encode()).decode().split("|", 1)
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequestError(
            "cursor is not one this server issued; pass the nextCursor of the previous page, or omit it"
        ) from None
    return (created, run_id)
