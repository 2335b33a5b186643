"""Run one CLI process under supervision.

What a coding CLI needs from us, and what goes wrong without it:

- argv only, never a shell; stdin gets the prompt and then end-of-file (codex waits for EOF even
  when the prompt is an argument; the server's own stdin is the MCP wire and must never leak).
- its own process group (``start_new_session``), and on a deadline, an idle watchdog, a cancel or
  a normal exit, its whole tree is killed: gemini's launcher relaunches a child and ignores SIGTERM
  in the parent, tools leave grandchildren behind, and a daemon double-forks out of the group.
- stdout and stderr drained concurrently (a full pipe blocks the child), with a bounded head and
  tail kept in memory, so a worker printing a gigabyte costs us a few MB.
- every stdout line reaches the parser whole, however long: the final answer is often one JSON
  line of many MB. A line that outgrows memory is spooled to an unnamed temporary file while it
  arrives; only a line over ``max_line_bytes`` (MCP_COLLAB_MAX_ANSWER_BYTES) is dropped, and the
  outcome says so, so the step fails with that reason instead of completing without its answer.

How we find a step's tree. The process group and ppid links miss two cases: a ``setsid``
double-fork (new session and group, re-parented to init) and the children of a leader that has
already died (their ppid link is gone). So every child gets ``MCP_COLLAB_STEP=<marker>`` in its
environment, a value unique to the spawn: this server's ``pid-startticks`` and 128 random bits.
The environment is inherited through fork, exec and ``setsid`` and it outlives our own death, so
a scan of ``/proc/*/environ`` (readable for our own uid) finds the whole tree during the step and,
from the marker recorded on the step (``ProcessRef``), again after a ``kill -9`` of the server.
When a step ends, one pass over ``/proc/*/environ`` says whether anything is left: of the pids
allocated since the leader's, when there are few (pids are handed out in order; the kernel's count
of tasks created rules out a wrap), else of every process but those a pidfd shows to be older than
the step's leader (``_ElderProcesses``), so it reads only the few started since; only then, and
while a kill is in progress, the full scan reads every ``stat`` too, and the environment only of
processes started no earlier than the leader. The random part means no process carries a step's
marker unless the step's own tree handed it down, and the leader's pid counts only with its
recorded start time, so a reused pid is never killed. Recovery also takes every process carrying
the dead server's ``pid-startticks`` tag: a dead server served only this store, and the tag covers
a spawn whose record had not reached the store when the server died.

Chosen over the alternatives: a child subreaper (``PR_SET_CHILD_SUBREAPER``) only helps while the
server lives, is process-wide (git's orphans would become ours to reap, racing the event loop's own
child watcher) and cannot tell which of several concurrent steps an orphan came from; a cgroup v2
per step needs a writable delegated hierarchy, which neither this kind of machine nor a CI runner
promises. The limit: a process that clears its environment *and* leaves the group *and* whose
parent dies escapes; the group, ppid links and marker together catch everything short of that.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import resource
import secrets
import select
import signal
import tempfile
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import anyio
import anyio.abc

from ...config import DEFAULT_MAX_ANSWER_BYTES
from . import spawn

# Between SIGTERM and SIGKILL: long enough for a CLI to flush its session file, short enough that
# a cancel leaves nothing running within half a second.
KILL_GRACE_S = 0.25
# After the main process exits, leftovers that still hold our pipes get this long after the kill.
DRAIN_GRACE_S = 1.0
# A line longer than this moves from memory to a temporary file while it arrives, so a flood
# without newlines costs disk up to the line cap, never memory.
SPOOL_AFTER_BYTES = 1 << 20
# After SIGKILL, how long to keep re-scanning and re-killing until the kernel has taken every member.
KILL_WAIT_S = 1.0
# The variable every child inherits; its value names the spawn (see the module docstring).
MARKER_VAR = "MCP_COLLAB_STEP"
_READ_CHUNK = 64 * 1024
# Linux's /proc, where the scans below find a step's processes: looked for once, not per step.
_HAS_PROC = os.path.isdir("/proc")
_POLL_S = 0.02

LineSink = Callable[[str], None]
# A pipe holds at least a page: a prompt no longer than this is written whole without waiting for
# the CLI to read, so it needs no task of its own (a longer one is fed beside the reading of stdout,
# so a CLI that writes before it reads never blocks us both).
STDIN_AT_ONCE_BYTES = 4096


@dataclass(frozen=True)
class ProcessSpec:
    argv: Sequence[str]
    env: Mapping[str, str]
    cwd: Path | None
    stdin: bytes
    timeout_s: float
    idle_timeout_s: float
    capture_bytes: int
    # The longest stdout line handed to the parser; a longer one is dropped and reported.
    max_line_bytes: int = DEFAULT_MAX_ANSWER_BYTES
    # Where a long line is spooled while it arrives (None: the system's TMPDIR).
    spool_dir: Path | None = None


@dataclass(frozen=True)
class ProcessOutcome:
    exit_code: int | None
    stdout: str
    stderr: str
    stdout_truncated: bool
    stdout_bytes: int
    limit_hit: str | None  # "timeout" | "idle" | None
    duration_ms: int
    pid: int
    # stdout lines the parser never saw, because they were over ``max_line_bytes`` or could not be
    # spooled: the answer may have been one of them.
    dropped_lines: int = 0
    longest_dropped_line: int = 0  # its size in bytes
    spool_error: str | None = None


class BoundedCapture:
    """Keeps the first and the last ``limit`` bytes of a stream and counts the rest."""

    def __init__(self, limit: int) -> None:
        self.limit = max(1, limit)
        self.head = bytearray()
        self.tail: deque[bytes] = deque()
        self.tail_size = 0
        self.total = 0

    def feed(self, data: bytes) -> None:
        self.total += len(data)
        room = self.limit - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if not data:
            return
        self.tail.append(data)
        self.tail_size += len(data)
        while self.tail and self.tail_size - len(self.tail[0]) >= self.limit:
            self.tail_size -= len(self.tail.popleft())

    @property
    def truncated(self) -> bool:
        return self.total > len(self.head) + self.tail_size

    def text(self) -> str:
        tail = b"".join(self.tail)
        if self.tail_size > self.limit:
            tail = tail[-self.limit :]
        omitted = self.total - len(self.head) - len(tail)
        head_text = self.head.decode("utf-8", "replace")
        tail_text = tail.decode("utf-8", "replace")
        if omitted <= 0:
            return head_text + tail_text
        return f"{head_text}\n[... {omitted} bytes omitted ...]\n{tail_text}"


class LineSplitter:
    """Turns chunks into complete lines, each handed to ``sink`` whole, however long it is.

    A line is held in memory up to ``spool_after`` bytes, then in an unnamed temporary file, and read
    back once its newline (or the end of the stream) arrives; memory is bounded by ``spool_after``
    while a line arrives and by ``max_line_bytes`` when it is handed over. A line longer than
    ``max_line_bytes``, or one the spool could not hold, is dropped and counted: the caller must
    not treat a stream with a dropped line as complete.
    """

    def __init__(
        self,
        sink: LineSink,
        max_line_bytes: int = DEFAULT_MAX_ANSWER_BYTES,
        *,
        spool_after: int = SPOOL_AFTER_BYTES,
        spool_dir: Path | None = None,
    ) -> None:
        self.sink = sink
        self.max_line_bytes = max(1, max_line_bytes)
        self.spool_after = min(spool_after, self.max_line_bytes)
        self.spool_dir = spool_dir
        self.buffer = bytearray()
        self.spool: BinaryIO | None = None
        self.line_bytes = 0  # the current line's size so far, kept or not
        self.skipping = False
        self.dropped = 0
        self.longest_dropped = 0
        self.spool_error: str | None = None

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        start = 0
        while True:
            nl = data.find(b"\n", start)
            self._add(view[start : len(data) if nl < 0 else nl])
            if nl < 0:
                return
            self._end_line()
            start = nl + 1

    def close(self) -> None:
        if self.line_bytes:
            self._end_line()

    def _add(self, piece: memoryview) -> None:
        if not piece:
            return
        self.line_bytes += len(piece)
        if self.skipping:
            return
        if self.line_bytes > self.max_line_bytes:
            self._drop()
            return
        try:
            if self.spool is not None:
                # A plain blocking write: it lands in the page cache, as fast as the pipe read.
                self.spool.write(piece)
                return
            self.buffer += piece
            if len(self.buffer) > self.spool_after:
                self.spool = tempfile.TemporaryFile(dir=self.spool_dir)
                self.spool.write(self.buffer)
                self.buffer = bytearray()  # a new object: clear() would keep the allocation
        except OSError as exc:
            self.spool_error = f"cannot spool a long line to {self.spool_dir or tempfile.gettempdir()}: {exc}"
            self._drop()

    def _drop(self) -> None:
        self.skipping = True
        self._release()

    def _release(self) -> None:
        self.buffer.clear()  # its allocation, at most ``spool_after`` and a chunk, is reused
        if self.spool is not None:
            with contextlib.suppress(OSError):
                self.spool.close()
            self.spool = None

    def _end_line(self) -> None:
        try:
            if self.skipping:
                self.dropped += 1
                self.longest_dropped = max(self.longest_dropped, self.line_bytes)
            elif self.spool is not None:
                try:
                    self.spool.seek(0)
                    raw = self.spool.read()
                except OSError as exc:
                    self.spool_error = f"cannot read back a spooled line: {exc}"
                    self.dropped += 1
                    self.longest_dropped = max(self.longest_dropped, self.line_bytes)
                else:
                    self._release()
                    self._emit(raw)
            else:
                self._emit(self.buffer)
        finally:
            self._release()
            self.skipping = False
            self.line_bytes = 0

    def _emit(self, raw: bytes | bytearray) -> None:
        # Invalid UTF-8 becomes U+FFFD: the store keeps text, and one bad byte must not lose a line.
        line = raw.decode("utf-8", "replace").strip()
        if line:
            self.sink(line)


# -- process tree -----------------------------------------------------------------------------


# /proc/PID/stat is one line of well under this; one read() takes it whole.
_STAT_BYTES = 4096
# /proc/stat: a few lines per CPU and one of interrupt counts; its "processes" line comes after them.
_PROC_STAT_BYTES = 1 << 16
# A process's environment is nearly always smaller than this: one read() takes it whole.
_ENVIRON_BYTES = 64 * 1024


def _read_proc(pid: int | str, name: str, *, whole: bool = True) -> bytes | None:
    """One /proc/PID file, read with plain syscalls (the scans below read a hundred or more per
    step); ``whole=False``: a single read, enough for ``stat``."""
    try:
        fd = os.open(f"/proc/{pid}/{name}", os.O_RDONLY)
    except OSError:
        return None
    try:
        if not whole:
            return os.read(fd, _STAT_BYTES)
        # The kernel fills a read of environ (and cmdline) until the buffer or the file ends, so a
        # short read is the whole file: one read per process instead of two, a hundred times a step.
        data = os.read(fd, _ENVIRON_BYTES)
        if len(data) < _ENVIRON_BYTES:
            return data
        chunks = [data]
        while chunk := os.read(fd, _ENVIRON_BYTES):
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError:
        return None
    finally:
        os.close(fd)


def _stat_fields(pid: int | str) -> list[str] | None:
    """/proc/PID/stat from the state field (the 3rd) on; the command name may hold spaces and ')'."""
    raw = _read_proc(pid, "stat", whole=False)
    if raw is None:
        return None
    return raw[raw.rfind(b")") + 2 :].decode("ascii", "replace").split()


@dataclass(frozen=True)
class _ProcRow:
    ppid: int
    pgrp: int
    zombie: bool
    start_ticks: int


def _proc_table() -> dict[int, _ProcRow]:
    """Every process we can see (Linux /proc), by pid."""
    rows = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat_fields(entry)) is not None and len(fields) > 19:
            rows[int(entry)] = _ProcRow(int(fields[1]), int(fields[2]), fields[0] in "ZX", int(fields[19]))
    return rows


def process_start_ticks(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot): with the pid, it names one process for good."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields and len(fields) > 19 and fields[19].isdigit() else None


def process_running(pid: int, start_ticks: int | None) -> bool:
    """Is ``pid`` (started at ``start_ticks``, when known) alive? A zombie is not: a killed server its
    parent has not reaped yet still has a /proc entry, but it will never finish a run."""
    fields = _stat_fields(pid)
    if not fields or len(fields) <= 19 or fields[0] in ("Z", "X"):
        return False
    return start_ticks is None or (fields[19].isdigit() and int(fields[19]) == start_ticks)


@functools.cache
def _server_tag(pid: int) -> str:
    return f"{pid}-{process_start_ticks(pid)}"


def server_tag() -> str:
    """This server process as ``pid-startticks``: the prefix of every marker it hands out, so a
    later server can find what this one left behind even where no step recorded its process."""
    return _server_tag(os.getpid())  # keyed by pid: a forked child is another server


def owner_tag(pid: int, start_ticks: int | None) -> str | None:
    """The marker prefix of the server process ``pid`` started at ``start_ticks`` (None: unknown)."""
    return None if start_ticks is None else f"{pid}-{start_ticks}"


def new_marker() -> str:
    """A marker for one spawn: this server's tag, then 128 random bits nobody can guess."""
    return f"{server_tag()}-{secrets.token_hex(16)}"


def orphaned_tags() -> dict[str, int]:
    """The marker tags (``pid-startticks``) of spawners (servers, workers) that are gone while
    processes they started live on, with each spawner's start time. Only what this process may read
    is seen (its own user's processes)."""
    if not _HAS_PROC:
        return {}
    me = os.getpid()
    needle = f"\0{MARKER_VAR}=".encode()
    found: dict[str, int] = {}
    for pid, row in _proc_table().items():
        if row.zombie or pid == me:
            continue
        environ = _read_proc(pid, "environ")
        if environ is None:
            continue
        environ = b"\0" + environ
        at = environ.find(needle)
        if at < 0:
            continue
        end = environ.find(b"\0", at + 1)
        parts = environ[at + len(needle) : end if end > 0 else None].split(b"-")
        if len(parts) != 3 or not parts[0].isdigit() or not parts[1].isdigit():
            continue
        spawner, ticks = int(parts[0]), int(parts[1])
        tag = f"{spawner}-{ticks}"
        if tag not in found and not process_running(spawner, ticks):
            found[tag] = ticks
    return found


async def kill_orphans() -> int:
    """Kill every process tree whose spawner died without killing it (a worker or server that was
    killed outright); returns how many dead spawners had left some."""
    import anyio.to_thread

    tags = await anyio.to_thread.run_sync(orphaned_tags)
    for tag, ticks in tags.items():
        await kill_tree(ProcessTree(None, None, live=False, server_tag=tag, since_ticks=ticks))
    return len(tags)


@dataclass(frozen=True)
class ProcessTree:
    """Everything one step started, and how to find it again.

    ``pid``/``start_ticks`` name the leader; ``pgid`` its group; ``marker`` the ``MARKER_VAR``
    value every descendant inherits. ``live`` is True in the supervisor that spawned the leader
    (the group is ours for as long as any member lives); in recovery the group and the leader's
    ppid links count only while the leader itself is verified by its start time, because the
    numbers may since have been reused. ``server_tag`` (recovery only) also takes every process
    carrying a marker handed out by that (dead) server."""

    pid: int | None
    pgid: int | None
    start_ticks: int | None = None
    marker: str | None = None
    live: bool = True
    server_tag: str | None = None
    since_ticks: int | None = None  # nothing of ours started earlier: the marker scan skips it
    # The spawn's number in this server (``_ElderProcesses``): processes known before it are no
    # descendants of the leader. None: unknown, every process is read.
    spawn_number: int | None = None
    # Tasks the kernel had created since boot just before the leader was forked (``_tasks_created``):
    # with the last pid allocated, it tells which pids were allocated since (``_pids_since``).
    tasks_before: int | None = None


def _carries(pid: int | str, needles: Sequence[bytes]) -> bool:
    environ = _read_proc(pid, "environ")
    if environ is None:
        return False
    environ = b"\0" + environ  # so the first variable, too, starts after a NUL
    return any(needle in environ for needle in needles)


def tree_members(tree: ProcessTree) -> set[int]:
    """The live (non-zombie) processes of ``tree``: its leader, its group, everything carrying its
    marker, and every descendant (by ppid link) of those."""
    if not _HAS_PROC:
        return {tree.pgid} if tree.pgid is not None and group_alive(tree.pgid) else set()
    table = _proc_table()
    me = os.getpid()
    leader = table.get(tree.pid) if tree.pid is not None else None
    leader_ours = leader is not None and not leader.zombie and tree.start_ticks in (None, leader.start_ticks)
    found: set[int] = set()
    if leader_ours and tree.pid is not None:
        found.add(tree.pid)
    if tree.pgid is not None and (tree.live or leader_ours):
        found |= {pid for pid, row in table.items() if row.pgrp == tree.pgid and not row.zombie}
    needles = []
    if tree.marker:
        needles.append(f"\0{MARKER_VAR}={tree.marker}\0".encode())
    if tree.server_tag:
        needles.append(f"\0{MARKER_VAR}={tree.server_tag}-".encode())
    if needles:
        since = tree.since_ticks if tree.since_ticks is not None else tree.start_ticks or 0
        for pid, row in table.items():
            # A descendant starts no earlier than what it descends from: older processes are skipped
            # without reading their environment, which keeps the scan cheap on a busy machine.
            if row.start_ticks >= since and not row.zombie and pid not in found and pid != me:
                if _carries(pid, needles):
                    found.add(pid)
    children: dict[int, list[int]] = {}
    for pid, row in table.items():
        if not row.zombie:
            children.setdefault(row.ppid, []).append(pid)
    stack = list(found)
    while stack:
        for child in children.get(stack.pop(), ()):
            if child not in found:
                found.add(child)
                stack.append(child)
    found.discard(me)
    return found


# Pidfds the elder-process cache may hold open: a small share of the server's descriptors (the
# soft limit is often 1024), enough for the long-lived processes of a typical machine.
ELDER_FDS_MAX = 256
ELDER_FDS_SHARE = 8  # at most 1/8 of RLIMIT_NOFILE's soft limit


class _ElderProcesses:
    """Processes known to be older than a spawn, so the end-of-step check need not read them.

    A step's marker is inherited, so only a process created after the step's leader can carry it.
    Every scan keeps a pidfd (``pidfd_open``, Linux 5.3) of each process it read that did not
    carry the marker, stamped with the number of spawns made so far; each spawn takes the next
    number before it forks. A later scan for a spawn numbered ``n`` skips a process whose pidfd
    was stamped below ``n`` and has not signalled its exit: the pidfd names that very process, not
    its pid, so it existed before the leader forked and descends from nothing of the step's. A
    process that exited is dropped (its pid may be reused by a step's process, which is then read
    like any new one). Without pidfds, or beyond the descriptor budget, processes are read as before.

    Everything runs on the calling thread within one synchronous scan; a lock keeps scans of
    event loops in other threads apart."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner = os.getpid()
        self._spawns = 0
        self._known: dict[int, tuple[int, int]] = {}  # pid -> (pidfd, spawns made when it was opened)
        self._by_fd: dict[int, int] = {}  # pidfd -> pid
        self._poll = select.poll()
        self._budget = _elder_budget()

    def next_spawn(self) -> int:
        """The number of a spawn about to fork (taken before the fork, never after)."""
        with self._lock:
            self._forked_check()
            self._spawns += 1
            return self._spawns

    def any_carrying(self, needles: Sequence[bytes], spawn_number: int) -> bool:
        with self._lock:
            self._forked_check()
            me = str(os.getpid())
            entries = os.listdir("/proc")
            # After the listing: a pidfd still quiet now held its pid all along, so the entry listed
            # under that pid was this very process.
            self._drop_exited()
            for entry in entries:
                if not entry.isdigit() or entry == me:
                    continue
                pid = int(entry)
                known = self._known.get(pid)
                if known is not None and known[1] < spawn_number:
                    continue
                if _carries(entry, needles):
                    return True
                if known is None:
                    self._remember(pid)
            return False

    def _remember(self, pid: int) -> None:
        if len(self._known) >= self._budget:
            return
        try:
            fd = os.pidfd_open(pid)
        except (OSError, AttributeError):
            return  # gone already, no pidfds here, or out of descriptors: read it next time
        self._known[pid] = (fd, self._spawns)
        self._by_fd[fd] = pid
        self._poll.register(fd, select.POLLIN)

    def _drop_exited(self) -> None:
        for fd, _ in self._poll.poll(0):
            pid = self._by_fd.pop(fd)
            del self._known[pid]
            self._poll.unregister(fd)
            os.close(fd)

    def _forked_check(self) -> None:
        if self._owner != os.getpid():  # a forked child: its own numbering, nothing inherited trusted
            self._owner = os.getpid()
            for fd in self._by_fd:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._known, self._by_fd, self._poll = {}, {}, select.poll()


def _elder_budget() -> int:
    try:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        return 0
    return min(ELDER_FDS_MAX, soft // ELDER_FDS_SHARE) if soft != resource.RLIM_INFINITY else ELDER_FDS_MAX


_elders = _ElderProcesses()


def tree_left(tree: ProcessTree) -> bool:
    """Is anything of a live ``tree`` still running once its leader has exited? The cheap check
    every step makes: one syscall for the group, then the environment of each process that may be
    younger than the leader for the marker: those with the pids allocated since the leader's, when
    they are few and can be told (``_pids_since``), else every process in /proc that
    ``_ElderProcesses`` does not know to be older. It sees what ``tree_members`` sees: with the
    leader gone, anything else is in the group, carries the marker, or descends from something
    that does (and then that one is still here)."""
    if tree.pgid is not None and group_alive(tree.pgid):
        return True
    if not tree.marker or not _HAS_PROC:
        return False
    needles = (f"\0{MARKER_VAR}={tree.marker}\0".encode(),)
    since = _pids_since(tree.pid, tree.tasks_before) if tree.pid is not None else None
    if since is not None:
        # Everything younger than the leader has one of these few pids: read them, not a listing
        # of /proc (which costs more than the rest of the step's supervision on a busy machine).
        return any(pid != os.getpid() and _carries(pid, needles) for pid in since)
    if tree.spawn_number is not None:
        return _elders.any_carrying(needles, tree.spawn_number)
    me = str(os.getpid())
    return any(entry.isdigit() and entry != me and _carries(entry, needles) for entry in os.listdir("/proc"))


# The end check reads the pids allocated since the leader's one by one, up to this many (beyond, a
# listing of /proc costs less).
PID_WINDOW = 64
# Where pids start again when they wrap around at pid_max (the kernel's RESERVED_PIDS).
PID_WRAP_FLOOR = 300


def _proc_number(path: str, field: int) -> int | None:
    """Field ``field`` (0-based, whitespace-separated) of a small /proc file, as a number."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fields = os.read(fd, _STAT_BYTES).split()
    except OSError:
        return None
    finally:
        os.close(fd)
    return int(fields[field]) if len(fields) > field and fields[field].isdigit() else None


def _tasks_created() -> int | None:
    """Tasks (processes and threads, each taking a pid) the kernel created since boot: the
    ``processes`` line of /proc/stat."""
    try:
        fd = os.open("/proc/stat", os.O_RDONLY)
    except OSError:
        return None
    try:
        raw = os.read(fd, _PROC_STAT_BYTES)
    except OSError:
        return None
    finally:
        os.close(fd)
    at = raw.find(b"\nprocesses ")
    if at < 0:
        return None
    value = raw[at + len(b"\nprocesses ") :].split(b"\n", 1)[0].strip()
    return int(value) if value.isdigit() else None


# pid_max is read again once this old: an administrator may change it, and rarely does.
PID_MAX_TTL_S = 1.0
_pid_max_read: list[tuple[float, int | None]] = []  # (when, value), the last reading


def _pid_max() -> int | None:
    now = time.monotonic()
    if not _pid_max_read or now - _pid_max_read[0][0] > PID_MAX_TTL_S:
        _pid_max_read[:] = [(now, _proc_number("/proc/sys/kernel/pid_max", 0))]
    return _pid_max_read[0][1]


def _pids_since(leader: int, tasks_before: int | None) -> range | None:
    """The pids allocated after ``leader``'s, up to the last one allocated now, when that can be told.
    Pids are handed out in increasing order and wrap around at pid_max: while the last one is above
    the leader's and fewer tasks than a whole cycle of pids were created since ``tasks_before``
    (taken just before the leader's fork), the pids allocated since are exactly those in between.
    None when not, or when there are more than ``PID_WINDOW`` of them, or without /proc."""
    if tasks_before is None:
        return None
    last = _proc_number("/proc/loadavg", 4)  # its last field: the last pid allocated (our namespace)
    created = _tasks_created()  # read after it: it counts every allocation up to that pid, and more
    pid_max = _pid_max()
    if last is None or created is None or pid_max is None or not leader <= last <= leader + PID_WINDOW:
        return None
    if created - tasks_before >= pid_max - PID_WRAP_FLOOR:
        return None  # the pids may have gone round once since the leader's
    return range(leader + 1, last + 1)


def group_alive(pgid: int) -> bool:
    """Is any process left in the group? One syscall (the fallback where there is no /proc)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def signal_tree(tree: ProcessTree, sig: int) -> set[int]:
    members = tree_members(tree)
    if tree.pgid is not None and (tree.live or (tree.pid is not None and tree.pid in members)):
        # The group in one call also reaches a member forked after the scan.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(tree.pgid, sig)
    for pid in members:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
    return members


async def kill_tree(tree: ProcessTree, grace_s: float = KILL_GRACE_S) -> None:
    """SIGTERM the whole tree, then SIGKILL whatever is left after ``grace_s``, again and again
    until nothing is left (a member may fork between a scan and the signal)."""
    if not signal_tree(tree, signal.SIGTERM):
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        await anyio.sleep(_POLL_S)
        if not tree_members(tree):
            return
    # SIGKILL cannot be ignored; wait (bounded) until the kernel has taken them all down.
    deadline = time.monotonic() + KILL_WAIT_S
    while signal_tree(tree, signal.SIGKILL) and time.monotonic() < deadline:
        await anyio.sleep(_POLL_S)


# Live spawns by leader pid, so the orchestrator can record how to find a step's tree again.
_spawned: dict[int, ProcessTree] = {}


def spawned(pid: int) -> ProcessTree | None:
    """The tree of a CLI ``run_process`` started and is still supervising."""
    return _spawned.get(pid)


# -- supervision ------------------------------------------------------------------------------


async def run_process(
    spec: ProcessSpec,
    on_line: LineSink | None = None,
    on_start: Callable[[int], Awaitable[None]] | None = None,
) -> ProcessOutcome:
    """Run ``spec`` to its end, its limit or our cancellation; the tree is gone when this returns."""
    started = time.monotonic()
    marker = new_marker()
    spawn_number = _elders.next_spawn()
    tasks_before = _tasks_created()
    process = await spawn.open_process(
        spec.argv, cwd=spec.cwd, env={**spec.env, MARKER_VAR: marker}, start_new_session=True
    )
    pid = process.pid
    tree = ProcessTree(
        pid=pid,
        pgid=pid,
        start_ticks=process_start_ticks(pid),
        marker=marker,
        spawn_number=spawn_number,
        tasks_before=tasks_before,
    )
    _spawned[pid] = tree
    settled = False  # the tree was found empty after the leader exited
    out = BoundedCapture(spec.capture_bytes)
    err = BoundedCapture(min(spec.capture_bytes, 256 * 1024))
    splitter = LineSplitter(on_line, spec.max_line_bytes, spool_dir=spec.spool_dir) if on_line else None
    last_output = [time.monotonic()]
    limit_hit: list[str] = []
    drained = anyio.Event()  # both pipes read to their end
    ended = [0]  # pipes read to their end so far
    fed = [False]  # the prompt written and stdin closed

    async def feed_stdin() -> None:
        assert process.stdin is not None
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            if spec.stdin:
                await process.stdin.send(spec.stdin)
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            await process.stdin.aclose()
        fed[0] = True

    def took(chunk: bytes | None, capture: BoundedCapture, lines: LineSplitter | None, alive: bool) -> None:
        """A chunk of stdout or stderr, or None at its end."""
        if chunk is None:
            if lines is not None:
                lines.close()
            ended[0] += 1
            if ended[0] == 2:
                drained.set()
            return
        if alive:
            last_output[0] = time.monotonic()
        capture.feed(chunk)
        if lines is not None:
            lines.feed(chunk)

    async def drain(
        stream: anyio.abc.ByteReceiveStream, capture: BoundedCapture, lines: LineSplitter | None, *, alive: bool
    ) -> None:
        with contextlib.suppress(anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
            while True:
                took(await stream.receive(_READ_CHUNK), capture, lines, alive)
        took(None, capture, lines, alive)

    pump: list[spawn.Pump] = []  # the event loop's callbacks read the pipes (asyncio), when they do

    def start_draining(tg: anyio.abc.TaskGroup) -> None:
        assert process.stdout is not None and process.stderr is not None
        ended[0] = 0
        # Only stdout (the CLI's event stream) counts as a sign of life: codex with its endpoint
        # down prints "Reconnecting..." to stderr forever.
        if isinstance(process, spawn.PidfdProcess):
            reading = process.pump(
                functools.partial(took, capture=out, lines=splitter, alive=True),
                functools.partial(took, capture=err, lines=None, alive=False),
                failed=tg.cancel_scope.cancel,
            )
            if reading is not None:
                pump.append(reading)
                return
        tg.start_soon(functools.partial(drain, process.stdout, out, splitter, alive=True))
        tg.start_soon(functools.partial(drain, process.stderr, err, None, alive=False))

    async def watch() -> None:
        """Until the main process exits; at the wall-clock or idle limit, kill the tree first. The
        limits are deadlines on the wait itself: no task of their own, nothing to cancel after."""
        wall_deadline = started + spec.timeout_s
        while True:
            now = time.monotonic()
            idle_deadline = last_output[0] + spec.idle_timeout_s
            if now >= wall_deadline or now >= idle_deadline:
                limit_hit.append("timeout" if now >= wall_deadline else "idle")
                await kill_tree(tree)
                await process.wait()
                return
            with anyio.move_on_after(max(_POLL_S, min(wall_deadline, idle_deadline) - now)) as waiting:
                await process.wait()
            if not waiting.cancelled_caught:
                return

    try:
        if on_start is not None:
            await on_start(pid)
        async with anyio.create_task_group() as tg:
            if len(spec.stdin) <= STDIN_AT_ONCE_BYTES:
                await feed_stdin()  # the pipe takes it whole at once: no task of its own
            else:
                tg.start_soon(feed_stdin)
            start_draining(tg)
            await watch()
            # The main process is gone; anything it left behind goes too (in its group, detached
            # with setsid, holding our pipes or not), so nothing outlives the step.
            if tree_left(tree):
                await kill_tree(tree)
            settled = True
            if not drained.is_set():
                with anyio.move_on_after(DRAIN_GRACE_S):
                    await drained.wait()
            if not (drained.is_set() and fed[0]):
                tg.cancel_scope.cancel()  # a pipe still held (by what was just killed) or unread
    finally:
        with anyio.CancelScope(shield=True):
            _spawned.pop(pid, None)
            if not settled:
                await kill_tree(tree)
            if not drained.is_set():
                # Cancelled: what the CLI printed before it died is still in the pipes; keep it.
                with anyio.move_on_after(DRAIN_GRACE_S):
                    if pump:
                        if pump[0].error is None:
                            await drained.wait()  # the pump still reads
                    else:
                        async with anyio.create_task_group() as again:
                            start_draining(again)
            if process.returncode is None:
                with anyio.move_on_after(2):
                    await process.wait()
            await process.aclose()
    if pump and pump[0].error is not None:
        raise pump[0].error  # a sink failed: what the tasks' reading would have raised
    return ProcessOutcome(
        exit_code=process.returncode,
        stdout=out.text(),
        stderr=err.text(),
        stdout_truncated=out.truncated,
        stdout_bytes=out.total,
        limit_hit=limit_hit[0] if limit_hit else None,
        duration_ms=math.ceil((time.monotonic() - started) * 1000),
        pid=pid,
        dropped_lines=splitter.dropped if splitter else 0,
        longest_dropped_line=splitter.longest_dropped if splitter else 0,
        spool_error=splitter.spool_error if splitter else None,
    )
