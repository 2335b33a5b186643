"""The CLI supervisor against fake CLIs that hang, flood, crash and leave children behind."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest

from mcp_collab.runtimes.cli import spawn, supervisor
from mcp_collab.runtimes.cli.supervisor import BoundedCapture, LineSplitter, ProcessSpec, run_process
from tests.conftest import alive, fake_cli, read_pids

pytestmark = pytest.mark.anyio


@pytest.fixture(autouse=True, params=["pidfd", "no pidfd for this child", "portable"])
def spawner(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test here runs each way a step's process can be started: Popen with its exit watched
    through a pidfd (Linux); the same when the kernel refuses one child its pidfd (out of
    descriptors), its exit then polled; and anyio's process where there is no pidfd at all."""
    if request.param == "portable":
        monkeypatch.setattr(spawn, "pidfd_usable", False)
    else:
        assert spawn.pidfd_usable, "this system gives no pidfd: the path every Linux server takes goes untested"
    if request.param == "no pidfd for this child":
        monkeypatch.setattr(spawn, "_pidfd", lambda pid: None)
    return str(request.param)


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


async def test_a_reader_of_the_output_that_fails_ends_the_step_with_its_error_and_kills_the_tree(
    pidfile: Path,
) -> None:
    def on_line(line: str) -> None:
        raise RuntimeError(f"the parser choked on {line[:20]!r}")

    # "hang" prints a line, starts two children and never ends: only the failure can end the step
    # (its limits are an hour away; the bound is only there so a regression fails, not hangs).
    with anyio.fail_after(60), pytest.raises(BaseException) as raised:
        await run_process(spec("hang", pidfile, timeout=3600, idle=3600, CODEX_FAKE_CHATTY="1"), on_line=on_line)
    leaves = raised.value.exceptions if isinstance(raised.value, BaseExceptionGroup) else (raised.value,)
    assert any(isinstance(e, RuntimeError) and "the parser choked" in str(e) for e in leaves), raised.value
    assert await until_gone(read_pids(pidfile)) == []


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


async def until_gone(pids: list[int]) -> list[int]:
    """The pids still alive once all are gone or 5 s have passed (a kill takes well under that)."""
    with anyio.move_on_after(5):
        while any(alive(p) for p in pids):
            await anyio.sleep(0.02)
    return [p for p in pids if alive(p)]


@pytest.mark.parametrize("ending", ["normal exit", "cancel", "step timeout", "idle timeout"])
async def test_a_setsid_daemon_started_by_a_step_dies_with_it(pidfile: Path, ending: str) -> None:
    seconds = {"normal exit": "0"}.get(ending, "inf")
    timeout, idle = {"step timeout": (2.0, 60.0), "idle timeout": (60.0, 1.0)}.get(ending, (60.0, 60.0))
    job = spec("daemon", pidfile, timeout=timeout, idle=idle, CODEX_FAKE_SECONDS=seconds)
    outcomes = []
    async with anyio.create_task_group() as tg:

        async def step() -> None:
            outcomes.append(await run_process(job))

        tg.start_soon(step)
        leader, daemon = await wait_for_pids(pidfile, 2)
        if ending == "cancel":
            tg.cancel_scope.cancel()
    if ending != "cancel":
        assert outcomes[0].limit_hit == {"step timeout": "timeout", "idle timeout": "idle"}.get(ending)
    if ending == "normal exit":
        assert outcomes[0].exit_code == 0
    assert await until_gone([leader, daemon]) == []


@pytest.mark.parametrize(
    "window", [supervisor.PID_WINDOW, 0], ids=["reading the pids since the leader", "listing /proc"]
)
async def test_the_end_check_finds_a_daemon_left_behind_by_either_way_of_looking(
    pidfile: Path, monkeypatch: pytest.MonkeyPatch, window: int
) -> None:
    monkeypatch.setattr(supervisor, "PID_WINDOW", window)  # 0: every range of pids is too long to read
    outcome = await run_process(spec("daemon", pidfile, CODEX_FAKE_SECONDS="0"))
    assert outcome.exit_code == 0
    pids = read_pids(pidfile)
    assert len(pids) == 2, "the leader and its setsid daemon"
    assert await until_gone(pids) == []


def test_the_pids_since_a_leader_are_told_only_while_they_cannot_have_wrapped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(supervisor, "PID_WINDOW", 1 << 20)  # however busy the machine is meanwhile
    before = supervisor._tasks_created()
    if before is None:
        pytest.skip("no /proc/stat here")
    leader = subprocess.Popen(["true"])
    leader.wait()
    since = supervisor._pids_since(leader.pid, before)
    assert since is not None and since.start == leader.pid + 1
    assert supervisor._pids_since(leader.pid, before - (1 << 40)) is None, "a whole cycle of pids could have passed"
    assert supervisor._pids_since(leader.pid, None) is None


async def test_children_whose_leader_exited_at_once_die_with_the_step(pidfile: Path) -> None:
    outcome = await run_process(spec("abandon", pidfile))
    assert outcome.exit_code == 0 and "left my children behind" in outcome.stdout
    pids = read_pids(pidfile)
    assert len(pids) == 4, "the leader, a child in a group of its own, its grandchild, a sleeper"
    assert await until_gone(pids) == []


async def test_ending_one_step_leaves_a_concurrent_steps_daemon_alive(tmp_path: Path) -> None:
    first, second = tmp_path / "first.pids", tmp_path / "second.pids"
    async with anyio.create_task_group() as tg:
        tg.start_soon(run_process, spec("daemon", first, CODEX_FAKE_SECONDS="inf"))
        first_leader, first_daemon = await wait_for_pids(first, 2)
        assert os.getsid(first_daemon) != os.getsid(first_leader), "the daemon left the session and group"
        assert os.getpgid(first_daemon) != first_leader
        outcome = await run_process(spec("daemon", second, CODEX_FAKE_SECONDS="0"))
        assert outcome.exit_code == 0
        assert await until_gone(read_pids(second)) == []
        assert alive(first_daemon), "another step's daemon is not this step's to kill"
        tg.cancel_scope.cancel()
    assert await until_gone(read_pids(first)) == []


async def test_a_daemon_seen_by_another_steps_end_check_still_dies_with_its_own_step(tmp_path: Path) -> None:
    # The second step ends while the first one's daemon runs: its end check reads the daemon (not
    # its marker) and remembers it as a known process. The first step's end check must still find it.
    first, second, release = tmp_path / "first.pids", tmp_path / "second.pids", tmp_path / "release"
    outcomes = []
    async with anyio.create_task_group() as tg:

        async def step() -> None:
            outcomes.append(await run_process(spec("daemon", first, CODEX_FAKE_UNTIL=str(release))))

        tg.start_soon(step)
        leader, daemon = await wait_for_pids(first, 2)
        assert (await run_process(spec("ok", second))).exit_code == 0
        assert alive(daemon), "another step's daemon is not this step's to kill"
        release.touch()
    assert outcomes[0].exit_code == 0, "the first step ended on its own, not by a kill"
    assert await until_gone([leader, daemon]) == []


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


async def test_a_prompt_larger_than_a_pipe_streams_both_ways_while_the_cli_echoes_it(tmp_path: Path) -> None:
    # The CLI writes out what it reads as it reads it: the prompt cannot be written whole before the
    # output is read, or both sides wait on a full pipe for ever.
    script = "import sys\nwhile chunk := sys.stdin.buffer.read1(65536):\n    sys.stdout.buffer.write(chunk)\n"
    prompt = bytes(range(256)).replace(b"\n", b" ") * 8192  # 2 MiB, no line breaks: one long line
    lines: list[str] = []
    outcome = await run_process(
        ProcessSpec(
            argv=[sys.executable, "-c", script],
            env={"PATH": os.environ["PATH"]},
            cwd=tmp_path,
            stdin=prompt,
            timeout_s=60,
            idle_timeout_s=60,
            capture_bytes=4096,
            max_line_bytes=len(prompt) * 4,
        ),
        on_line=lines.append,
    )
    assert outcome.exit_code == 0, outcome.stderr
    assert outcome.stdout_bytes == len(prompt)
    assert lines == [prompt.decode("utf-8", "replace")]


async def test_a_step_leaves_no_descriptor_open_in_the_server(tmp_path: Path) -> None:
    before = sorted(os.listdir("/proc/self/fd"))
    for name in ("crash", "orphan"):
        outcome = await run_process(spec(name, tmp_path / f"{name}.pids"))
        assert outcome.exit_code is not None
    # Pipes and the pidfd are closed with the step: thousands of steps never run the server out of
    # descriptors.
    assert sorted(os.listdir("/proc/self/fd")) == before


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
