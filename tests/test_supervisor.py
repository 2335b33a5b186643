"""The CLI supervisor against fake CLIs that hang, flood, crash and leave children behind."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import anyio
import pytest

from mcp_collab.runtimes.cli.supervisor import BoundedCapture, LineSplitter, ProcessSpec, run_process
from tests.conftest import alive, fake_cli, read_pids

pytestmark = pytest.mark.anyio


def spec(name: str, pidfile: Path, *, timeout: float = 30, idle: float = 30, capture: int = 1 << 20, **env: str):
    return ProcessSpec(
        argv=[fake_cli(name), "exec", "--json", "-"],
        env={"PATH": os.environ["PATH"], "CODEX_FAKE_PIDFILE": str(pidfile), **env},
        cwd=None,
        stdin=b"the prompt",
        timeout_s=timeout,
        idle_timeout_s=idle,
        capture_bytes=capture,
    )


async def wait_for_pids(pidfile: Path, count: int) -> list[int]:
    with anyio.fail_after(10):
        while len(read_pids(pidfile)) < count:
            await anyio.sleep(0.02)
    return read_pids(pidfile)


async def test_a_hanging_cli_and_its_children_are_killed_as_a_group_at_the_timeout(pidfile: Path) -> None:
    started = time.monotonic()
    outcome = await run_process(spec("hang", pidfile, timeout=1.5, CODEX_FAKE_CHATTY="1"))
    elapsed = time.monotonic() - started
    pids = read_pids(pidfile)
    assert outcome.limit_hit == "timeout"
    assert len(pids) == 3, "the fake starts itself and two children"
    assert [p for p in pids if alive(p)] == []
    assert 1.5 <= elapsed < 5


async def test_the_idle_watchdog_kills_a_cli_that_goes_silent(pidfile: Path) -> None:
    outcome = await run_process(spec("silent", pidfile, timeout=60, idle=0.7))
    assert outcome.limit_hit == "idle"
    assert outcome.duration_ms < 10_000
    assert [p for p in read_pids(pidfile) if alive(p)] == []


async def test_a_child_that_outlives_its_parent_is_killed_when_the_parent_exits(pidfile: Path) -> None:
    lines: list[str] = []
    outcome = await run_process(spec("orphan", pidfile), on_line=lines.append)
    assert outcome.exit_code == 0 and outcome.limit_hit is None
    assert any("left a child behind" in line for line in lines)
    pids = read_pids(pidfile)
    assert len(pids) == 2
    assert [p for p in pids if alive(p)] == []


async def test_a_flood_of_output_is_kept_bounded_with_a_marker(pidfile: Path) -> None:
    lines: list[str] = []
    outcome = await run_process(
        spec("flood", pidfile, capture=64 * 1024, CODEX_FAKE_FLOOD_BYTES=str(8 << 20)), on_line=lines.append
    )
    assert outcome.exit_code == 0
    assert outcome.stdout_truncated
    assert outcome.stdout_bytes > 8 << 20
    assert len(outcome.stdout) < 3 * 64 * 1024
    assert "bytes omitted" in outcome.stdout
    assert '"turn.completed"' in outcome.stdout, "the tail keeps the end of the stream"
    assert any("flooded" in line for line in lines)


async def test_a_crash_reports_its_exit_code_and_stderr(pidfile: Path) -> None:
    outcome = await run_process(spec("crash", pidfile))
    assert outcome.exit_code == 101
    assert "simulated crash" in outcome.stderr
    assert "half done" in outcome.stdout


async def test_cancelling_the_caller_kills_the_whole_tree(pidfile: Path) -> None:
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_process, spec("hang", pidfile))
        await wait_for_pids(pidfile, 3)
        tg.cancel_scope.cancel()
    pids = read_pids(pidfile)
    assert [p for p in pids if alive(p)] == []


async def test_stdin_reaches_end_of_file_and_the_prompt_is_data(tmp_path: Path) -> None:
    script = "import sys; data = sys.stdin.read(); print(repr(data))"
    outcome = await run_process(
        ProcessSpec(
            argv=[sys.executable, "-c", script],
            env={"PATH": os.environ["PATH"]},
            cwd=tmp_path,
            stdin=b"--version; rm -rf / $(whoami)",
            timeout_s=10,
            idle_timeout_s=10,
            capture_bytes=4096,
        )
    )
    assert outcome.exit_code == 0
    assert outcome.stdout.strip() == repr("--version; rm -rf / $(whoami)")


def test_bounded_capture_keeps_head_and_tail() -> None:
    cap = BoundedCapture(10)
    for chunk in (b"0123456789", b"abcdefghij", b"KLMNOPQRST", b"uvwxyz"):
        cap.feed(chunk)
    assert cap.total == 36
    assert cap.truncated
    assert cap.text() == "0123456789\n[... 16 bytes omitted ...]\nQRSTuvwxyz"


def test_line_splitter_drops_overlong_lines_and_keeps_the_rest() -> None:
    got: list[str] = []
    splitter = LineSplitter(got.append, 8)
    splitter.feed(b"short\nthis line is far too long")
    splitter.feed(b" and goes on\nok\npartial")
    splitter.close()
    assert got == ["short", "ok", "partial"]
    assert splitter.dropped == 1
