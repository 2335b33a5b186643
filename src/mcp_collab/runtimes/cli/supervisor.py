"""Run one CLI process under supervision.

What a coding CLI needs from us, and what goes wrong without it:

- argv only, never a shell; stdin gets the prompt and then end-of-file (codex waits for EOF even
  when the prompt is an argument; the server's own stdin is the MCP wire and must never leak).
- its own process group (``start_new_session``), and on a deadline, an idle watchdog, a cancel or
  a normal exit, the whole group and every descendant we can see are signalled: gemini's launcher
  relaunches a child and ignores SIGTERM in the parent, and tools leave grandchildren behind.
- stdout and stderr drained concurrently (a full pipe blocks the child), with a bounded head and
  tail kept in memory, so a worker printing a gigabyte costs us a few MB.
- every stdout line reaches the parser whole, however long: the final answer is often one JSON
  line of many MB. A line that outgrows memory is spooled to an unnamed temporary file while it
  arrives; only a line over ``max_line_bytes`` (MCP_COLLAB_MAX_ANSWER_BYTES) is dropped, and the
  outcome says so, so the step fails with that reason instead of completing without its answer.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import signal
import subprocess
import tempfile
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import anyio
import anyio.abc

from ...config import DEFAULT_MAX_ANSWER_BYTES

# Between SIGTERM and SIGKILL: long enough for a CLI to flush its session file, short enough that
# a cancel leaves nothing running within half a second.
KILL_GRACE_S = 0.25
# After the main process exits, leftovers that still hold our pipes get this long after the kill.
DRAIN_GRACE_S = 1.0
# A line longer than this moves from memory to a temporary file while it arrives, so a flood
# without newlines costs disk up to the line cap, never memory.
SPOOL_AFTER_BYTES = 1 << 20
_READ_CHUNK = 64 * 1024
_POLL_S = 0.02

LineSink = Callable[[str], None]


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


def _stat_fields(pid: int | str) -> list[str] | None:
    """/proc/PID/stat from the state field (the 3rd) on; the command name may hold spaces and ')'."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read().decode("utf-8", "replace")
    except OSError:
        return None
    return raw[raw.rfind(")") + 2 :].split()


def _proc_table() -> list[tuple[int, int, int, str]]:
    """(pid, ppid, pgrp, state) of every process we can see (Linux /proc)."""
    rows = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat_fields(entry)) is not None and len(fields) >= 3:
            rows.append((int(entry), int(fields[1]), int(fields[2]), fields[0]))
    return rows


def process_start_ticks(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot): with the pid, it names one process for good."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields and len(fields) > 19 and fields[19].isdigit() else None


def tree_members(root_pid: int, pgid: int) -> set[int]:
    """Live (non-zombie) processes in ``pgid`` or descended from ``root_pid``."""
    if not os.path.isdir("/proc"):
        try:
            os.killpg(pgid, 0)
        except OSError:
            return set()
        return {pgid}
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, ppid, _, _ in table:
        children.setdefault(ppid, []).append(pid)
    found = {pid for pid, _, pgrp, state in table if pgrp == pgid and state != "Z"}
    stack = [root_pid]
    alive = {pid for pid, _, _, state in table if state != "Z"}
    while stack:
        for child in children.get(stack.pop(), ()):
            if child not in found and child in alive:
                found.add(child)
            stack.append(child)
    return found & alive if alive else found


def group_alive(pgid: int) -> bool:
    """Is any process left in the group? One syscall: the cheap check once the leader has exited,
    when its former children have been re-parented and only the group still finds them."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def signal_tree(root_pid: int, pgid: int, sig: int) -> None:
    members = tree_members(root_pid, pgid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
    for pid in members:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


async def kill_tree(root_pid: int, pgid: int, grace_s: float = KILL_GRACE_S) -> None:
    """SIGTERM the group and its descendants, then SIGKILL whatever is left after ``grace_s``."""
    if not tree_members(root_pid, pgid):
        return
    signal_tree(root_pid, pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        await anyio.sleep(_POLL_S)
        if not tree_members(root_pid, pgid):
            return
    signal_tree(root_pid, pgid, signal.SIGKILL)
    # SIGKILL cannot be ignored; wait (briefly) until the kernel has taken them all down.
    deadline = time.monotonic() + 1.0
    while tree_members(root_pid, pgid) and time.monotonic() < deadline:
        await anyio.sleep(_POLL_S)


# -- supervision ------------------------------------------------------------------------------


async def run_process(
    spec: ProcessSpec,
    on_line: LineSink | None = None,
    on_start: Callable[[int], Awaitable[None]] | None = None,
) -> ProcessOutcome:
    """Run ``spec`` to its end, its limit or our cancellation; the tree is gone when this returns."""
    started = time.monotonic()
    process = await anyio.open_process(
        list(spec.argv),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=spec.cwd,
        env=dict(spec.env),
        start_new_session=True,
    )
    pid = process.pid
    out = BoundedCapture(spec.capture_bytes)
    err = BoundedCapture(min(spec.capture_bytes, 256 * 1024))
    splitter = LineSplitter(on_line, spec.max_line_bytes, spool_dir=spec.spool_dir) if on_line else None
    last_output = [time.monotonic()]
    limit_hit: list[str] = []
    drained = anyio.Event()

    async def feed_stdin() -> None:
        assert process.stdin is not None
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            if spec.stdin:
                await process.stdin.send(spec.stdin)
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            await process.stdin.aclose()

    async def drain(
        stream: anyio.abc.ByteReceiveStream, capture: BoundedCapture, lines: LineSplitter | None, *, alive: bool
    ) -> None:
        with contextlib.suppress(anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
            while True:
                chunk = await stream.receive(_READ_CHUNK)
                if alive:
                    last_output[0] = time.monotonic()
                capture.feed(chunk)
                if lines is not None:
                    lines.feed(chunk)
        if lines is not None:
            lines.close()

    async def drain_both() -> None:
        assert process.stdout is not None and process.stderr is not None
        async with anyio.create_task_group() as tg:
            # Only stdout (the CLI's event stream) counts as a sign of life: codex with its endpoint
            # down prints "Reconnecting..." to stderr forever.
            tg.start_soon(functools.partial(drain, process.stdout, out, splitter, alive=True))
            tg.start_soon(functools.partial(drain, process.stderr, err, None, alive=False))
        drained.set()

    async def watchdog() -> None:
        wall_deadline = started + spec.timeout_s
        while True:
            now = time.monotonic()
            idle_deadline = last_output[0] + spec.idle_timeout_s
            if now >= wall_deadline:
                limit_hit.append("timeout")
                break
            if now >= idle_deadline:
                limit_hit.append("idle")
                break
            await anyio.sleep(max(_POLL_S, min(wall_deadline, idle_deadline) - now))
        await kill_tree(pid, pid)

    try:
        if on_start is not None:
            await on_start(pid)
        async with anyio.create_task_group() as tg:
            tg.start_soon(feed_stdin)
            tg.start_soon(drain_both)
            async with anyio.create_task_group() as watch:
                watch.start_soon(watchdog)
                await process.wait()
                watch.cancel_scope.cancel()
            # The main process is gone; anything it left in its group goes too, so nobody holds
            # our pipes open and nothing outlives the step.
            if group_alive(pid):
                await kill_tree(pid, pid)
            with anyio.move_on_after(DRAIN_GRACE_S):
                await drained.wait()
            tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            if process.returncode is None or group_alive(pid):
                await kill_tree(pid, pid)
            if not drained.is_set():
                # Cancelled: what the CLI printed before it died is still in the pipes; keep it.
                with anyio.move_on_after(DRAIN_GRACE_S):
                    await drain_both()
            with anyio.move_on_after(2):
                await process.wait()
            await process.aclose()
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
