"""Start a CLI's process for the supervisor: ``subprocess.Popen``, its exit watched through a pidfd.

``anyio.open_process`` goes through asyncio's subprocess transport: a protocol object per pipe, a
future per read, and on Python before 3.12 a thread per child that blocks in ``waitpid`` and hands
the exit back to the loop. For a step that is a third of the loop's own work (measured by
``bench/dispatch_overhead.py``). Here the pipes are read and written with plain non-blocking
syscalls, waiting for readiness with ``anyio.wait_readable`` / ``wait_writable`` only when a pipe
has nothing to give, and the exit is one more readable descriptor: a pidfd (Linux 5.3+), which
also names the child for good (its pid cannot be reused before we reap it through ``poll``).

On asyncio the supervisor reads stdout and stderr through a ``Pump``: the event loop's readiness
callbacks read each pipe and hand the chunks on, with no task, future or cancel scope per read (a
third of what a step's supervision cost the loop, measured by the same bench).

Where there is no pidfd (another system, an older kernel, a sandbox that refuses the call), the
process comes from ``anyio.open_process`` as before, read by tasks; both give the supervisor the same
interface (``anyio.abc.Process``), and its tests run both ways.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

import anyio
import anyio.abc
import anyio.lowlevel
import sniffio

# Reads that found data waiting, one after the other, before a read yields to the event loop
# anyway: a CLI that writes faster than we read must not starve every other run.
_READS_BEFORE_YIELD = 16
_PUMP_CHUNK = 64 * 1024
# How often the exit is looked for without a pidfd to wait on (or by a second waiter: only one
# task can watch it).
_POLL_WITHOUT_PIDFD_S = 0.02

_pidfd_open = getattr(os, "pidfd_open", None)


def _pidfd(pid: int) -> int | None:
    """A pidfd for ``pid``, or None where the system has none (or refuses it: a seccomp sandbox)."""
    if _pidfd_open is None:
        return None
    try:
        fd: int = _pidfd_open(pid)
    except OSError:
        return None
    return fd


class _Pipe:
    """One end of a pipe to the child, non-blocking; closing it wakes whoever waits on it."""

    def __init__(self, file: IO[bytes]) -> None:
        self._file = file
        self._fd = file.fileno()
        os.set_blocking(self._fd, False)

    def _close(self) -> None:
        if self._fd >= 0:
            anyio.notify_closing(self._fd)  # a task waiting on it wakes with ClosedResourceError
            self._fd = -1
            self._file.close()


class _Reader(_Pipe, anyio.abc.ByteReceiveStream):
    """The read end of the child's stdout or stderr: read by ``receive``, or by a ``Pump``."""

    def __init__(self, file: IO[bytes]) -> None:
        super().__init__(file)
        self._eager = 0  # reads in a row that found data without waiting

    async def receive(self, max_bytes: int = 65536) -> bytes:
        while True:
            if self._fd < 0:
                raise anyio.ClosedResourceError
            try:
                data = os.read(self._fd, max_bytes)
            except BlockingIOError:
                self._eager = 0
                await anyio.wait_readable(self._fd)
                continue
            if not data:
                raise anyio.EndOfStream
            self._eager += 1
            if self._eager >= _READS_BEFORE_YIELD:
                self._eager = 0
                await anyio.lowlevel.checkpoint()
            return data

    async def aclose(self) -> None:
        self._close()


class _Writer(_Pipe, anyio.abc.ByteSendStream):
    """The write end of the child's stdin."""

    async def send(self, item: bytes) -> None:
        view = memoryview(item)
        while view:
            if self._fd < 0:
                raise anyio.ClosedResourceError
            try:
                view = view[os.write(self._fd, view) :]
            except BlockingIOError:
                await anyio.wait_writable(self._fd)
            except BrokenPipeError as exc:
                raise anyio.BrokenResourceError from exc

    async def aclose(self) -> None:
        self._close()


# A pump's sink: a chunk read, or None once the stream has ended (then never called again).
Sink = Callable[[bytes | None], None]


class Pump:
    """Reads the child's stdout and stderr to their ends from the event loop's own readiness
    callbacks, handing each chunk to its sink: no task, no future, no cancel scope per read. That
    is asyncio's ``add_reader``; elsewhere ``PidfdProcess.pump`` gives none and the caller reads
    with tasks. A sink that raises stops the pump: ``error`` holds it and ``failed`` is called (the
    caller cancels what waits on the child)."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, streams: Sequence[tuple[_Reader, Sink]], failed: Callable[[], None]
    ) -> None:
        self._loop = loop
        self._failed = failed
        self.error: BaseException | None = None
        self._reading: dict[int, Sink] = {}
        for reader, sink in streams:
            self._reading[reader._fd] = sink
            loop.add_reader(reader._fd, self._ready, reader._fd)

    def _ready(self, fd: int) -> None:
        sink = self._reading[fd]
        try:
            for _ in range(_READS_BEFORE_YIELD):  # then the loop's turn: it calls again while data waits
                try:
                    chunk = os.read(fd, _PUMP_CHUNK)
                except BlockingIOError:
                    return
                if not chunk:
                    self._release(fd)
                    sink(None)
                    return
                sink(chunk)
        except Exception as exc:  # handed to the caller, which raises it
            self.error = exc
            self.stop()
            self._failed()

    def _release(self, fd: int) -> None:
        if self._reading.pop(fd, None) is not None:
            self._loop.remove_reader(fd)

    def stop(self) -> None:
        """Read no more (the pipes stay open until the process is closed)."""
        for fd in list(self._reading):
            self._release(fd)


class PidfdProcess(anyio.abc.Process):
    """A child started by ``Popen``, its exit watched through a pidfd (polled without one)."""

    def __init__(self, popen: subprocess.Popen[bytes], pidfd: int | None) -> None:
        assert popen.stdin is not None and popen.stdout is not None and popen.stderr is not None
        self._popen = popen
        self._pidfd = pidfd
        self._stdin = _Writer(popen.stdin)
        self._stdout = _Reader(popen.stdout)
        self._stderr = _Reader(popen.stderr)
        self._pump: Pump | None = None

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        return self._popen.returncode

    @property
    def stdin(self) -> anyio.abc.ByteSendStream:
        return self._stdin

    @property
    def stdout(self) -> anyio.abc.ByteReceiveStream:
        return self._stdout

    @property
    def stderr(self) -> anyio.abc.ByteReceiveStream:
        return self._stderr

    def pump(self, out: Sink, err: Sink, failed: Callable[[], None]) -> Pump | None:
        """Read stdout and stderr to their ends from the event loop's callbacks (see ``Pump``), or
        None where the event loop has none (not asyncio): read ``stdout``/``stderr`` then."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return None
        if sniffio.current_async_library() != "asyncio":
            return None
        self._pump = Pump(loop, ((self._stdout, out), (self._stderr, err)), failed)
        return self._pump

    async def wait(self) -> int:
        while (code := self._popen.poll()) is None:
            if self._pidfd is None:
                await anyio.sleep(_POLL_WITHOUT_PIDFD_S)
                continue
            try:
                await anyio.wait_readable(self._pidfd)
            except anyio.BusyResourceError:  # another task watches the pidfd already
                await anyio.sleep(_POLL_WITHOUT_PIDFD_S)
        if self._pidfd is not None:
            anyio.notify_closing(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        return code

    def send_signal(self, signal: int) -> None:
        self._popen.send_signal(signal)  # nothing once the child is reaped (its pid may be reused)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    async def aclose(self) -> None:
        """As ``anyio``'s: the pipes closed, then the exit waited for (killed if that is cancelled)."""
        if self._pump is not None:
            self._pump.stop()  # before its descriptors close (and their numbers are reused)
        with anyio.CancelScope(shield=True) as scope:
            for stream in (self._stdin, self._stdout, self._stderr):
                await stream.aclose()
            scope.shield = False
            try:
                await self.wait()
            except BaseException:
                scope.shield = True
                self.kill()
                await self.wait()
                raise


async def open_process(
    argv: Sequence[str], *, cwd: Path | None, env: Mapping[str, str], start_new_session: bool
) -> anyio.abc.Process:
    """Start ``argv`` with its three standard streams piped to us (see the module docstring)."""
    if not pidfd_usable:
        return await anyio.open_process(
            list(argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=env,
            start_new_session=start_new_session,
        )
    # Popen returns once the child has exec'd (vfork: a fraction of a millisecond), as the start of
    # asyncio's own subprocess transport does on the event loop.
    popen = subprocess.Popen(  # noqa: ASYNC220
        list(argv),
        bufsize=0,  # plain file objects over the descriptors: we read and write them ourselves
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=cwd,
        env=env,
        start_new_session=start_new_session,
    )
    # No checkpoint from here on: a cancel must not find the child started and nobody holding it.
    return PidfdProcess(popen, _pidfd(popen.pid))


def _probe() -> bool:
    fd = _pidfd(os.getpid())
    if fd is None:
        return False
    os.close(fd)
    return True


# Decided once: a system with pidfds gives one to every child (one that fails for a single child,
# out of descriptors, has its exit polled instead).
pidfd_usable = _probe()
