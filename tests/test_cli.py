"""The `mcp-collab` command as a user types it: doctor, workers, dispatch (live progress), runs, prune;
what reaches the terminal, the exit codes, Ctrl-C."""

from __future__ import annotations

import json
import os
import pty
import re
import signal
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from anyio.abc import Process
from anyio.streams.text import TextReceiveStream

from mcp_collab import cli
from mcp_collab.orchestrator import WorkerOrchestrator
from tests.conftest import alive, fake_cli, read_pids

# How long a subprocess may take to say something or to end (a bound, not a timing assertion).
WAIT_S = 60.0


def mc(env: dict[str, str], *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mcp_collab", *args], env=env, capture_output=True, text=True, timeout=120, input=stdin,
    )  # fmt: skip


def mc_bytes(env: dict[str, str], *args: str) -> tuple[int, bytes, bytes]:
    """The command's exit code and the exact bytes it sent to stdout and stderr."""
    done = subprocess.run([sys.executable, "-m", "mcp_collab", *args], env=env, capture_output=True, timeout=120)
    return done.returncode, done.stdout, done.stderr


def one_line_refusal(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr and len(done.stderr.splitlines()) == 1, done.stderr
    assert done.stderr.startswith("mcp-collab"), done.stderr
    return done.stderr


@pytest.fixture
def env(base_env: dict[str, str]) -> dict[str, str]:
    return {**base_env, "MCP_COLLAB_CODEX_BIN": fake_cli("slow"), "CODEX_FAKE_SECONDS": "0.5"}


def test_doctor_prints_a_table_with_fixes_and_never_a_secret(env: dict[str, str], tmp_path: Path) -> None:
    done = mc(
        {**env, "OPENAI_API_KEY": "sk-doctor-secret-0123456789", "MCP_COLLAB_GEMINI_BIN": str(tmp_path / "nope")},
        "doctor",
    )
    assert done.returncode == 1, "a required check failed"
    assert "FAIL  cli:gemini" in done.stdout and "npm install -g @google/gemini-cli" in done.stdout
    assert "ok    credential:OPENAI_API_KEY" in done.stdout and "sk-doctor-secret" not in done.stdout
    report = json.loads(mc({**env, "MCP_COLLAB_GEMINI_BIN": str(tmp_path / "nope")}, "doctor", "--json").stdout)
    assert {c["name"] for c in report["checks"]} >= {"cli:codex", "cli:gemini", "cli:claude", "store", "sdk:openai_sdk"}


def test_workers_dispatch_and_runs_from_the_terminal(env: dict[str, str]) -> None:
    assert "no workers registered" in mc(env, "workers").stdout
    assert mc(env, "workers", "add", "w", "--model", "codex_cli").returncode == 0
    refused = mc(env, "workers", "add", "x", "--model", "gemini_cli", "--runtime-mode", "openai_sdk")
    assert refused.returncode == 2 and "accepted for gemini_cli: 'cli', 'google_sdk'" in refused.stderr
    done = mc(env, "dispatch", "write the parser")
    assert done.returncode == 0
    assert "step 1 started: worker w via cli" in done.stderr
    assert "w: codex: thinking: step 1" in done.stderr, "the CLI's own events are shown live"
    assert "slow work finished after 0.5s" in done.stdout
    from_stdin = mc(env, "dispatch", "-", "--json", stdin="--version; rm -rf /")
    run = json.loads(from_stdin.stdout)
    assert run["task"] == "--version; rm -rf /" and run["status"] == "completed"
    table = mc(env, "runs").stdout
    assert table.count("single_worker") == 2 and "worker w[cli] completed" in table
    shown = mc(env, "runs", "show", run["id"])
    assert f"run       {run['id']}" in shown.stdout and "attempt cli: completed" in shown.stdout
    missing = one_line_refusal(mc(env, "runs", "show", "run-nope"))
    assert "unknown run 'run-nope'" in missing and "`mcp-collab runs` lists" in missing
    assert "list_worker_runs" not in missing, "a terminal user is not told to call an MCP tool"
    assert mc(env, "runs", "prune", "--max-runs", "1").stdout.startswith("pruned 1 runs")
    assert mc(env, "runs").stdout.count("single_worker") == 1


def test_a_failed_run_exits_non_zero(env: dict[str, str]) -> None:
    bad = {**env, "MCP_COLLAB_CODEX_BIN": fake_cli("crash")}
    mc(bad, "workers", "add", "w", "--model", "codex_cli")
    done = mc(bad, "dispatch", "x")
    assert done.returncode == 1 and "status    failed" in done.stdout and "simulated crash" in done.stdout


def test_a_malformed_setting_is_a_clear_error(env: dict[str, str]) -> None:
    done = mc({**env, "MCP_WORKER_RUNTIME_DEFAULT": "grpc"}, "runs")
    assert "MCP_WORKER_RUNTIME_DEFAULT='grpc' is not accepted" in one_line_refusal(done)


# Everything a terminal acts on instead of showing: escape sequences (window title, OSC 52 clipboard,
# screen clear), a one-byte C1 CSI, bidi overrides and isolates, a bare carriage return.
HOSTILE = "T\x1b]0;pwned\x07 C\x1b]52;c;cHduZWQ=\x07 X\x1b[2J\x1b[H E\x9b31m B\u202eevil\u2066 R\rZ"
RAW_CONTROLS = re.compile(rb"[\x00-\x08\x0b-\x1f\x7f]|\xc2[\x80-\x9f]|\xe2\x80[\xaa-\xae]|\xe2\x81[\xa6-\xa9]")


def assert_shown_harmlessly(terminal: bytes) -> None:
    raw = RAW_CONTROLS.findall(terminal)
    assert not raw, f"raw control bytes reached the terminal: {raw[:5]}"
    text = terminal.decode("utf-8")
    assert "\\x1b]0;pwned\\x07" in text and "<U+202E>evil<U+2066>" in text and "\\x9b31m" in text


@pytest.fixture
def hostile_env(base_env: dict[str, str]) -> dict[str, str]:
    return {**base_env, "MCP_COLLAB_CODEX_BIN": fake_cli("echo"), "CODEX_FAKE_TEXT": HOSTILE}


def test_worker_output_and_stored_text_never_reach_the_terminal_as_control_sequences(
    hostile_env: dict[str, str],
) -> None:
    assert mc(hostile_env, "workers", "add", "w", "--model", "codex_cli").returncode == 0
    code, out, err = mc_bytes(hostile_env, "dispatch", "fix it \u202eso\x9b2J")
    assert code == 0
    assert_shown_harmlessly(out)  # the answer, and the task as stored
    assert_shown_harmlessly(err)  # the worker's live events
    assert b"fix it <U+202E>so\\x9b2J" in out
    code, out, err = mc_bytes({**hostile_env, "CODEX_FAKE_FAIL": "1"}, "dispatch", "fail loudly")
    assert code == 1
    assert_shown_harmlessly(out)  # the error, as the run records it
    [failed] = json.loads(mc(hostile_env, "runs", "--status", "failed", "--json").stdout)["runs"]
    assert "\x1b]0;pwned" in failed["error"], "the store keeps the text as it came"
    for command in (["runs"], ["runs", "show", failed["id"]], ["workers"]):
        code, out, err = mc_bytes(hostile_env, *command)
        assert code == 0 and not RAW_CONTROLS.findall(out + err), command
    code, out, _ = mc_bytes(hostile_env, "runs", "show", failed["id"])
    assert_shown_harmlessly(out)
    # The real gemini CLI takes 2 s to say its version: the fake answers for it.
    code, out, _ = mc_bytes({**hostile_env, "MCP_COLLAB_GEMINI_BIN": fake_cli("ok")}, "doctor")
    assert_shown_harmlessly(out)  # the CLI's own --version line


def test_json_output_is_the_same_text_with_terminal_controls_escaped(hostile_env: dict[str, str]) -> None:
    mc(hostile_env, "workers", "add", "w", "--model", "codex_cli")
    code, out, _ = mc_bytes(hostile_env, "dispatch", "--json", "fix it \u202eso\x9b2J")
    assert code == 0 and not RAW_CONTROLS.findall(out)
    run = json.loads(out)
    assert run["task"] == "fix it \u202eso\x9b2J" and run["result"] == HOSTILE, "JSON readers get the text as is"


def test_prune_takes_0_as_no_limit_and_forgets_everything_only_when_told(env: dict[str, str]) -> None:
    fast = {**env, "MCP_COLLAB_CODEX_BIN": fake_cli("ok"), "MCP_COLLAB_RETAIN_RUNS": "0"}
    mc(fast, "workers", "add", "w", "--model", "codex_cli")
    for task in ("one", "two", "three"):
        assert mc(fast, "dispatch", task).returncode == 0
    assert mc(fast, "runs", "prune").stdout.startswith("pruned 0 runs"), "MCP_COLLAB_RETAIN_RUNS=0: no limit"
    assert mc(fast, "runs", "prune", "--max-runs", "0", "--max-age-days", "0").stdout.startswith("pruned 0 runs")
    assert mc(fast, "runs").stdout.count("single_worker") == 3
    assert "0 (no limit) or more" in one_line_refusal(mc(fast, "runs", "prune", "--max-runs", "-1"))
    assert "only apply to `mcp-collab runs prune`" in one_line_refusal(mc(fast, "runs", "--all"))
    assert mc(fast, "runs", "prune", "--all").stdout.startswith("pruned 3 runs")
    assert mc(fast, "runs").stdout.strip() == "no runs yet"


@pytest.mark.parametrize(
    ("args", "stdin", "fragments"),
    [
        (["dispatch", "x", "--worker", "ghost"], None, ["unknown worker 'ghost'", "registered workers: w"]),
        (["dispatch", "x", "--worker", "w", "--worker", "w"], None, ["takes at most 1 worker(s)"]),
        (
            ["dispatch", "x", "--strategy", "codex_writes_gemini_reviews"],
            None,
            ["reviewer role", "gemini_cli", "`mcp-collab workers add NAME --model MODEL`"],
        ),
        (["dispatch", "x", "--strategy", "pair"], None, ["invalid choice: 'pair'", "single_worker"]),
        (["dispatch", "x", "--runtime-mode", "google_sdk"], None, ["cannot run a codex_cli worker", "'cli'"]),
        (["dispatch", "-"], "   ", ["task must not be blank"]),
        (["dispatch", "-"], "a\x01b", ["control characters"]),
        (["dispatch", "x", "--working-directory", "/"], None, ["outside"]),
        (["runs", "--status", "bogus"], None, ["invalid choice: 'bogus'", "'completed'", "'cancelled'"]),
        (["runs", "--strategy", "bogus"], None, ["unknown strategy 'bogus'", "security_redteam_pass"]),
        (["runs", "--limit", "0"], None, ["limit must be between 1 and 200"]),
        (["workers", "remove", "ghost"], None, ["unknown worker 'ghost'"]),
    ],
)
def test_a_refusal_is_one_line_and_exit_code_2(
    env: dict[str, str], args: list[str], stdin: str | None, fragments: list[str]
) -> None:
    mc(env, "workers", "add", "w", "--model", "codex_cli")
    message = one_line_refusal(mc(env, *args, stdin=stdin))
    for fragment in fragments:
        assert fragment in message
    assert "spawn_worker" not in message and "list_worker_runs" not in message
    assert "no runs yet" in mc(env, "runs").stdout, "nothing ran"


def test_an_unusable_store_is_a_one_line_refusal(env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("", encoding="utf-8")
    broken = {**env, "MCP_COLLAB_STATE_DIR": str(tmp_path / "a-file" / "state")}
    refusal = one_line_refusal(mc(broken, "dispatch", "x"))
    assert "cannot create the" in refusal and "a-file/state" in refusal, "it names the store it cannot use"


def test_an_unknown_worker_filter_is_an_empty_answer_for_a_removed_worker_keeps_its_runs(env: dict[str, str]) -> None:
    fast = {**env, "MCP_COLLAB_CODEX_BIN": fake_cli("ok")}
    mc(fast, "workers", "add", "w", "--model", "codex_cli")
    mc(fast, "dispatch", "x")
    mc(fast, "workers", "remove", "w")
    assert "worker w[cli] completed" in mc(fast, "runs", "--worker", "w").stdout, (
        "a removed worker's runs stay findable"
    )
    nobody = mc(fast, "runs", "--worker", "nobody")
    assert nobody.returncode == 0 and nobody.stdout.strip() == "no runs match these filters"


def test_a_bug_is_one_line_naming_it_and_debug_shows_the_traceback(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    async def broken(*_: object, **__: object) -> None:
        raise KeyError("the bug")

    monkeypatch.setattr(WorkerOrchestrator, "list_runs", broken)
    assert cli.main(["runs"]) == 70
    err = capsys.readouterr().err
    assert err == "mcp-collab: internal error (KeyError: 'the bug'); run with --debug for the traceback\n"
    assert cli.main(["runs", "--debug"]) == 70
    err = capsys.readouterr().err
    assert "Traceback" in err and "raise KeyError" in err and err.endswith("internal error (KeyError: 'the bug')\n")


async def read_until(process: Process, said: str, seen: list[str]) -> None:
    """Read the process's stderr into ``seen`` until it has said ``said``."""
    assert process.stderr is not None
    with anyio.fail_after(WAIT_S):
        async for chunk in TextReceiveStream(process.stderr):
            seen.append(chunk)
            if said in "".join(seen):
                return
    raise AssertionError(f"the process ended without saying {said!r}: {''.join(seen)}")


async def rest_of(process: Process, seen: list[str]) -> str:
    assert process.stderr is not None
    with anyio.fail_after(WAIT_S):
        seen.extend([chunk async for chunk in TextReceiveStream(process.stderr)])
        await process.wait()
    return "".join(seen)


@pytest.mark.anyio
async def test_ctrl_c_during_dispatch_cancels_the_run_and_its_processes(env: dict[str, str], pidfile: Path) -> None:
    hanging = {**env, "MCP_COLLAB_CODEX_BIN": fake_cli("hang"), "CODEX_FAKE_PIDFILE": str(pidfile)}
    mc(hanging, "workers", "add", "w", "--model", "codex_cli")
    seen: list[str] = []
    async with await anyio.open_process([sys.executable, "-m", "mcp_collab", "dispatch", "wait"], env=hanging) as proc:
        await read_until(proc, "step 1 started", seen)
        await read_until(proc, "partial work: step one done", seen)  # the CLI is running
        pruned = mc(hanging, "runs", "prune", "--all")
        assert pruned.stdout.startswith("pruned 0 runs"), "a running run is never pruned"
        proc.send_signal(signal.SIGINT)
        err = await rest_of(proc, seen)
        assert proc.returncode == 130
        assert proc.stdout is not None
        out = (await proc.stdout.receive()).decode()
    assert "Traceback" not in err and "cancelled from the terminal" in err
    assert "status    cancelled  (cancelled from the terminal)" in out and "partial work: step one done" in out
    [run] = json.loads(mc(hanging, "runs", "--json").stdout)["runs"]
    assert run["status"] == "cancelled" and run["error"] == "cancelled from the terminal"
    assert run["steps"][0]["status"] == "cancelled"
    assert read_pids(pidfile) and not any(alive(pid) for pid in read_pids(pidfile)), "its processes are gone"


INITIALIZE = {
    "jsonrpc": "2.0", "id": 1, "method": "initialize",
    "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
}  # fmt: skip


@pytest.mark.anyio
@pytest.mark.parametrize(("stop", "exit_code"), [("ctrl-c", 130), ("ctrl-d", 0)])
async def test_serve_on_a_terminal_says_it_waits_for_a_client_and_stops_cleanly(
    env: dict[str, str], stop: str, exit_code: int
) -> None:
    terminal, typed_on = pty.openpty()
    seen: list[str] = []
    try:
        async with await anyio.open_process(
            [sys.executable, "-m", "mcp_collab", "serve"], stdin=typed_on, env=env
        ) as proc:
            await read_until(proc, "\n", seen)
            assert "waiting for an MCP client on stdin" in seen[0] and "Ctrl-C or Ctrl-D" in seen[0]
            os.write(terminal, (json.dumps(INITIALIZE) + "\n").encode())
            assert proc.stdout is not None
            with anyio.fail_after(WAIT_S):
                assert b'"id":1' in await proc.stdout.receive(), "a session is open"
            if stop == "ctrl-c":
                proc.send_signal(signal.SIGINT)
            else:
                os.write(terminal, b"\x04")
            err = await rest_of(proc, seen)
    finally:
        os.close(terminal)
        os.close(typed_on)
    assert proc.returncode == exit_code and "Traceback" not in err


def test_serve_without_a_terminal_says_nothing_extra(env: dict[str, str]) -> None:
    done = mc(env, "serve", stdin="")
    assert done.returncode == 0 and done.stdout == "" and "waiting for an MCP client" not in done.stderr


@pytest.mark.parametrize(
    ("said", "verdict", "exit_code"),
    [
        ("nothing exploitable\nVERDICT: PASS", "pass", 0),
        ("FINDING: high: injection\nVERDICT: FAIL", "fail", 3),
        ("VERDICT: APPROVE", "unknown", 3),
        ("looks fine to me", "unknown", 3),
    ],
)
def test_dispatch_exits_3_unless_the_judge_approves_so_ci_can_gate_on_it(
    base_env: dict[str, str], said: str, verdict: str, exit_code: int
) -> None:
    env = {**base_env, "MCP_COLLAB_CODEX_BIN": fake_cli("echo"), "CODEX_FAKE_TEXT": said}
    mc(env, "workers", "add", "doer", "--model", "codex_cli")
    mc(env, "workers", "add", "attacker", "--model", "codex_cli")
    done = mc(env, "dispatch", "x", "--strategy", "security_redteam_pass")
    assert done.returncode == exit_code, done.stderr
    assert f"verdict   {verdict}" in done.stdout
    if exit_code:
        assert done.stderr.splitlines()[-1] == (
            f"mcp-collab: run {json.loads(mc(env, 'runs', '--json').stdout)['runs'][0]['id']} completed, "
            f"but its verdict is {verdict} (exit 3)"
        )
    if verdict == "unknown":
        assert "verdict   unknown (the redteam gave no VERDICT line of pass or fail)" in done.stdout
    table = mc(env, "runs").stdout
    assert re.search(rf"completed\s+{verdict}\s+[0-9.]+s\s+worker doer", table), table  # verdict, took, (no cost)


def test_dispatch_help_documents_the_exit_codes() -> None:
    help_text = mc(dict(os.environ), "dispatch", "--help").stdout
    for line in ("0    the run completed", "1    the run failed", "2    refused", "3    the run completed, but",
                 "70   internal error", "130  Ctrl-C"):  # fmt: skip
        assert line in help_text
