"""probes/run_probes.py: evidence JSON, never a secret, and --live through every ready runtime."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mcp_collab.runtimes.registry import RUNTIMES
from tests.support.vendor_stub import VendorStub

PROBE = Path(__file__).parent.parent / "probes" / "run_probes.py"


def run_probe(env: dict[str, str], out: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(PROBE), "--out", str(out), *flags],
        env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def test_the_probe_writes_evidence_and_hints_without_secrets(base_env: dict[str, str], tmp_path: Path) -> None:
    env = {**base_env, "OPENAI_API_KEY": "sk-probe-secret-1234", "MCP_COLLAB_CLAUDE_BIN": str(tmp_path / "missing")}
    done = run_probe(env, tmp_path / "out")
    evidence = json.loads((tmp_path / "out" / "readiness.json").read_text(encoding="utf-8"))
    checks = {c["name"]: c for c in evidence["report"]["checks"]}
    assert checks["credential:OPENAI_API_KEY"]["detail"] == "present"
    assert checks["cli:claude"]["ok"] is False and done.returncode == 1
    assert "npm install -g @anthropic-ai/claude-code" in done.stdout
    assert "sk-probe-secret-1234" not in done.stdout + done.stderr + json.dumps(evidence)
    assert not (tmp_path / "out" / "live.json").exists(), "no live call without --live"


@pytest.mark.real_cli
@pytest.mark.timeout(300)
def test_the_live_probe_makes_one_call_per_runtime(real_env: dict[str, str], stub: VendorStub, tmp_path: Path) -> None:
    env = {**real_env, "OPENAI_API_KEY": "sk-stub"}
    done = run_probe(env, tmp_path / "out", "--live")
    live = json.loads((tmp_path / "out" / "live.json").read_text(encoding="utf-8"))
    calls = {(c["runtimeMode"], c["workerModel"]): c for c in live["calls"]}
    assert set(calls) == {(spec.mode, model) for spec in RUNTIMES.values() for model in spec.serves}
    assert all(c["ok"] is True for c in calls.values()), done.stdout + done.stderr
    assert len(
        [r for r in stub.requests if r.kind in ("responses", "generateContent", "streamGenerateContent", "messages")]
    ) == len(calls)
    assert done.returncode == 0
