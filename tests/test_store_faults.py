"""A store on a failing disk: the call or run that needed it fails with the path and the cause,
the server goes on answering every other call, and nothing committed is lost.

The disk is a real one: a small tmpfs mounted for the test (full, or remounted read-only). Mounting
needs root (CI runs as root); elsewhere these tests are skipped, and in CI a refused mount fails.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client

from mcp_collab.config import Settings
from mcp_collab.runtimes.base import StepRequest
from mcp_collab.server import build_server
from mcp_collab.store import JsonStore
from mcp_collab.testing import Reply, ScriptedRuntime
from tests.conftest import quick_vendor_clis
from tests.support.mcp_helpers import call

pytestmark = pytest.mark.anyio

DISK_BYTES = 1 << 20


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB file system of the test's own."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES},mode=0755", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        reason = f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}); these tests need root"
        if os.environ.get("MCP_COLLAB_REQUIRE_REAL_CLIS") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> None:
    """Fill the disk to the last byte."""
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (65536, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)
    with pytest.raises(OSError) as full:
        with open(disk / "probe", "wb", buffering=0) as probe:
            probe.write(b"\0" * 8192)
    assert full.value.errno == errno.ENOSPC


def free(disk: Path) -> None:
    (disk / "filler").unlink()
    with contextlib.suppress(FileNotFoundError):
        (disk / "probe").unlink()


def remount(disk: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(disk)], check=True)


class Gate:
    """A cli runtime whose steps wait until the test opens the gate."""

    def __init__(self) -> None:
        self.started = anyio.Event()
        self.release = anyio.Event()
        self.runtime = ScriptedRuntime("cli", respond=lambda _: Reply("done"))
        self.mode = "cli"
        self.blocking = False

    async def aclose(self) -> None:  # the WorkerRuntime seam: nothing held
        return None

    async def run(self, request: StepRequest) -> Any:
        if self.blocking:
            self.started.set()
            await self.release.wait()
        return await self.runtime.run(request)


@pytest.fixture
async def served(disk: Path, make_settings: Callable[..., Settings]) -> AsyncIterator[tuple[Client, Gate]]:
    gate = Gate()
    settings = make_settings(MCP_COLLAB_STATE_DIR=str(disk / "state"), **quick_vendor_clis())
    async with Client(build_server(settings, {"cli": gate})) as client:  # type: ignore[dict-item]
        await call(client, "spawn_worker", name="w1", model="codex_cli")
        yield client, gate


async def refusal(client: Client, tool: str, **args: Any) -> str:
    result = await client.call_tool(tool, args)
    assert result.is_error, f"{tool} should have failed"
    return " ".join(getattr(c, "text", "") for c in result.content)


async def still_answers(client: Client, run_id: str) -> None:
    """Every call that does not write still answers, with the history intact."""
    assert "w1" in [w["name"] for w in (await call(client, "list_workers"))["workers"]]
    assert (await call(client, "get_worker_run", runId=run_id))["status"] == "completed"
    assert run_id in [r["id"] for r in (await call(client, "list_worker_runs"))["runs"]]
    assert (await call(client, "check_runtimes"))["checks"]


async def until_refused(client: Client, tool: str, **args: Any) -> tuple[str, list[dict[str, Any]]]:
    """Call until the disk refuses (a log's last page may still hold a record or two); the refusal
    and what was accepted before it."""
    accepted = []
    for i in range(200):
        result = await client.call_tool(tool, {k: v.format(i=i) for k, v in args.items()})
        if result.is_error:
            return " ".join(getattr(c, "text", "") for c in result.content), accepted
        assert result.structured_content is not None
        accepted.append(result.structured_content)
    raise AssertionError(f"{tool} was never refused on a full disk")


async def test_a_full_disk_fails_the_writing_calls_clearly_and_the_server_goes_on(
    served: tuple[Client, Gate], disk: Path
) -> None:
    client, _ = served
    first = await call(client, "dispatch_task", task="before the disk filled")
    fill(disk)

    dispatch_refused, runs = await until_refused(client, "dispatch_task", task="on a full disk {i}")
    worker_refused, workers = await until_refused(client, "spawn_worker", name="w-{i}", model="gemini_cli")
    for message in (dispatch_refused, worker_refused):
        assert "No space left on device" in message and str(disk / "state") in message
        assert "\n" not in message and "internal error" not in message
    await still_answers(client, first["id"])
    store_check = [c for c in (await call(client, "check_runtimes"))["checks"] if c["name"] == "store"]
    assert store_check and not store_check[0]["ok"] and "No space left" in store_check[0]["detail"]

    free(disk)
    assert (await call(client, "dispatch_task", task="after it was freed"))["status"] == "completed"
    await still_answers(client, first["id"])
    listed = {r["id"] for r in (await call(client, "list_worker_runs", limit=200))["runs"]}
    assert {r["id"] for r in runs} <= listed, "every run accepted on the full disk is in the history"
    names = {w["name"] for w in (await call(client, "list_workers"))["workers"]}
    assert {w["name"] for w in workers} <= names


async def test_a_run_whose_end_cannot_be_stored_fails_with_the_cause(served: tuple[Client, Gate], disk: Path) -> None:
    client, gate = served
    first = await call(client, "dispatch_task", task="a run that lands")
    gate.blocking = True
    running = await call(client, "dispatch_task", task="a run the disk fills under", waitSeconds=0)
    with anyio.fail_after(10):
        await gate.started.wait()
    fill(disk)
    await until_refused(client, "spawn_worker", name="w-{i}", model="gemini_cli")  # no room left for a run
    gate.release.set()

    ended = await call(client, "wait_worker_run", runId=running["id"], timeoutSeconds=10)

    assert ended["status"] == "failed"
    assert "No space left on device" in ended["error"] and str(disk / "state") in ended["error"]
    gate.blocking = False
    await still_answers(client, first["id"])
    free(disk)
    assert (await call(client, "dispatch_task", task="after it was freed"))["status"] == "completed"


async def test_a_store_remounted_read_only_refuses_writes_and_keeps_serving_reads(
    served: tuple[Client, Gate], disk: Path
) -> None:
    client, _ = served
    first = await call(client, "dispatch_task", task="before the remount")
    remount(disk, "ro")
    try:
        message = await refusal(client, "dispatch_task", task="on a read-only store")
        assert "Read-only file system" in message and str(disk / "state") in message
        await still_answers(client, first["id"])
    finally:
        remount(disk, "rw")
    assert (await call(client, "dispatch_task", task="writable again"))["status"] == "completed"
    assert len((await call(client, "list_worker_runs"))["runs"]) == 2


def serve(env: dict[str, str], *prefix: str) -> subprocess.CompletedProcess[str]:
    command = [*prefix, sys.executable, "-m", "mcp_collab", "serve"]
    return subprocess.run(command, env=env, input="", capture_output=True, text=True, timeout=60, check=False)


def assert_one_line_refusal(done: subprocess.CompletedProcess[str], *expected: str) -> None:
    assert done.returncode != 0
    assert done.stdout == "", "nothing but JSON-RPC on stdout"
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr and "ExceptionGroup" not in done.stderr
    for text in expected:
        assert text in lines[0], lines[0]


def test_serve_on_a_full_disk_says_so_in_one_line(disk: Path, base_env: dict[str, str]) -> None:
    state = disk / "state"
    JsonStore(state).save_runs([])
    fill(disk)
    done = serve({**base_env, "MCP_COLLAB_STATE_DIR": str(state)})
    assert_one_line_refusal(done, "No space left on device", str(state))


def test_serve_on_a_read_only_state_directory_says_so_in_one_line(disk: Path, base_env: dict[str, str]) -> None:
    (disk / "state").mkdir()
    remount(disk, "ro")
    try:
        done = serve({**base_env, "MCP_COLLAB_STATE_DIR": str(disk / "state")})
    finally:
        remount(disk, "rw")
    assert_one_line_refusal(done, "Read-only file system", str(disk / "state"))


def test_serve_with_the_log_a_directory_says_so_in_one_line(tmp_path: Path, base_env: dict[str, str]) -> None:
    (tmp_path / "state" / "runs.jsonl").mkdir(parents=True)
    done = serve({**base_env, "MCP_COLLAB_STATE_DIR": str(tmp_path / "state")})
    assert_one_line_refusal(done, "is not a regular file", str(tmp_path / "state" / "runs.jsonl"))


def test_serve_on_a_directory_it_may_not_write_says_so_in_one_line(tmp_path: Path, base_env: dict[str, str]) -> None:
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        pytest.skip("needs root and setpriv to run the server as another user")
    state = tmp_path / "state"
    state.mkdir()
    os.chmod(tmp_path, 0o755)
    # Another user, who may still read everything (CAP_DAC_READ_SEARCH: the checkout and its venv
    # can be anywhere, a private temp dir included) but write only where permissions allow.
    done = serve(
        {**base_env, "MCP_COLLAB_STATE_DIR": str(state), "HOME": "/nonexistent"},
        setpriv, "--reuid=65534", "--regid=65534", "--clear-groups",
        "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search",
    )  # fmt: skip
    assert_one_line_refusal(done, "Permission denied", str(state))
