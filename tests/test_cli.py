"""The `mcp-collab` command as a user types it: doctor, workers, dispatch (live progress), runs, prune."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import fake_cli


def mc(env: dict[str, str], *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mcp_collab", *args], env=env, capture_output=True, text=True, timeout=120, input=stdin,
    )  # fmt: skip


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
    assert "step 1/1 started: worker w via cli" in done.stderr
    assert "w: codex: thinking: step 1" in done.stderr, "the CLI's own events are shown live"
    assert "slow work finished after 0.5s" in done.stdout
    from_stdin = mc(env, "dispatch", "-", "--json", stdin="--version; rm -rf /")
    run = json.loads(from_stdin.stdout)
    assert run["task"] == "--version; rm -rf /" and run["status"] == "completed"
    table = mc(env, "runs").stdout
    assert table.count("single_worker") == 2 and "w[cli]:completed" in table
    shown = mc(env, "runs", "show", run["id"])
    assert f"run       {run['id']}" in shown.stdout and "attempt cli: completed" in shown.stdout
    missing = mc(env, "runs", "show", "run-nope")
    assert missing.returncode == 1 and "unknown run 'run-nope'" in missing.stderr
    assert mc(env, "runs", "prune", "--max-runs", "1").stdout.startswith("pruned 1 runs")
    assert mc(env, "runs").stdout.count("single_worker") == 1


def test_a_failed_run_exits_non_zero(env: dict[str, str]) -> None:
    bad = {**env, "MCP_COLLAB_CODEX_BIN": fake_cli("crash")}
    mc(bad, "workers", "add", "w", "--model", "codex_cli")
    done = mc(bad, "dispatch", "x")
    assert done.returncode == 1 and "status    failed" in done.stdout and "simulated crash" in done.stdout


def test_a_malformed_setting_is_a_clear_error(env: dict[str, str]) -> None:
    done = mc({**env, "MCP_WORKER_RUNTIME_DEFAULT": "grpc"}, "runs")
    assert done.returncode == 1 and "MCP_WORKER_RUNTIME_DEFAULT='grpc' is not accepted" in done.stderr
    assert "Traceback" not in done.stderr
