"""Table tests: fixtures/worker_orchestrator/{default,fault}.json through the WorkerOrchestrator."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pydantic
import pytest

from mcp_collab import errors
from mcp_collab.models import DispatchRequest, WorkerSpec
from mcp_collab.orchestrator import WorkerOrchestrator, default_runtimes
from mcp_collab.store import JsonStore
from mcp_collab.testing import Reply, ScriptedRuntime
from tests.conftest import alive, fake_cli, read_pids

FIXTURES = Path(__file__).parent.parent / "fixtures" / "worker_orchestrator"


def load(name: str) -> list[Any]:
    doc = json.loads((FIXTURES / name).read_text(encoding="utf-8"))
    return [pytest.param(s, id=s["name"]) for s in doc["scenarios"]]


def script_item(item: dict[str, Any]) -> Reply | errors.RuntimeFailure:
    if "error" in item:
        return errors.failure_for_kind(item["error"])(item["message"], code=item.get("code", "error"))
    return Reply(text=item["text"])


def attempt_label(attempt: Any) -> str:
    label = f"{attempt.runtime_mode}:{attempt.status}"
    return label + (f":{attempt.error_kind}" if attempt.error_kind else "")


@pytest.mark.anyio
@pytest.mark.parametrize("scenario", load("default.json") + load("fault.json"))
async def test_scenario(scenario: dict[str, Any], make_settings: Any, tmp_path: Path) -> None:
    env = dict(scenario.get("settings", {}))
    pidfile = tmp_path / "pids.txt"
    for vendor, behaviour in scenario.get("fakeCli", {}).items():
        env[f"MCP_COLLAB_{vendor.upper()}_BIN"] = fake_cli(behaviour)
        env["CODEX_FAKE_PIDFILE"] = str(pidfile)
    settings = make_settings(**env)
    scripted = {
        mode: ScriptedRuntime(mode, [script_item(i) for i in scenario.get("scripts", {}).get(mode, [])])
        for mode in ("cli", "openai_sdk", "google_sdk")
    }
    runtimes: dict[str, Any] = dict(scripted)
    if "fakeCli" in scenario:
        runtimes["cli"] = default_runtimes(settings)["cli"]
    store = JsonStore(settings.store_dir)
    orchestrator = WorkerOrchestrator(settings, store, runtimes=runtimes)  # type: ignore[arg-type]
    for worker in scenario.get("workers", []):
        await orchestrator.register_worker(WorkerSpec.model_validate(worker))

    expected_error = scenario.get("expectError")
    if expected_error:
        error_type = (
            pydantic.ValidationError
            if expected_error["type"] == "ValidationError"
            else getattr(errors, expected_error["type"])
        )
        runs_before = store.all_runs()
        with pytest.raises(error_type) as caught:
            if "register" in scenario:
                await orchestrator.register_worker(WorkerSpec.model_validate(scenario["register"]))
            else:
                await orchestrator.dispatch(DispatchRequest.model_validate(scenario["dispatch"]))
        for fragment in expected_error["contains"]:
            assert fragment in str(caught.value)
        assert store.all_runs() == runs_before, "a refused request stores nothing"
        return

    run = await orchestrator.dispatch(DispatchRequest.model_validate(scenario["dispatch"]))
    expect = scenario["expect"]
    stored = store.get_run(run.id)
    assert stored == run, "what the caller sees is what the history holds"
    assert run.status == expect["status"], run.error
    assert run.ended_at is not None
    if "result" in expect:
        assert run.result == expect["result"]
    for key in ("verdict", "findings"):
        if key in expect:
            assert getattr(run, key) == expect[key]
    for fragment in expect.get("errorContains", []):
        assert run.error is not None and fragment in run.error
    assert len(run.steps) == len(expect["steps"])
    wire = [s.model_dump(mode="json", by_alias=True) for s in run.steps]
    for got, step, want in zip(wire, run.steps, expect["steps"], strict=True):
        for key, value in want.items():
            if key == "attempts":
                assert [attempt_label(a) for a in step.attempts] == value
            else:
                assert got[key] == value, f"{key}: {got[key]!r} != {value!r}"
    for mode, count in expect.get("calls", {}).items():
        assert len(scripted[mode].requests) == count
    for mode, per_call in expect.get("promptsContain", {}).items():
        for request, fragments in zip(scripted[mode].requests, per_call, strict=True):
            for fragment in fragments:
                assert fragment in request.prompt
    if expect.get("noSurvivors"):
        pids = read_pids(pidfile)
        assert pids, "the fake CLI ran"
        assert [p for p in pids if alive(p)] == []
