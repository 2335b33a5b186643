"""The JSON Schema in contracts/ matches the models, and the wire uses the seed's camelCase names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from mcp_collab import contracts
from mcp_collab.models import Run, Step, WorkerSpec

CONTRACTS = Path(__file__).parent.parent / "contracts"


def test_contracts_are_regenerated_after_every_model_change() -> None:
    assert contracts.stale(CONTRACTS) == [], "run `python -m mcp_collab.contracts` and commit contracts/"


def test_the_drift_check_notices_a_changed_schema(tmp_path: Path) -> None:
    assert contracts.main(["--dir", str(tmp_path)]) == 0
    path = tmp_path / "step.schema.json"
    schema = json.loads(path.read_text(encoding="utf-8"))
    del schema["properties"]["fallbackFrom"]
    path.write_text(json.dumps(schema), encoding="utf-8")
    assert contracts.stale(tmp_path) == ["step.schema.json differs from the models"]
    assert contracts.main(["--dir", str(tmp_path), "--check"]) == 1


def test_steps_and_runs_carry_the_seed_names_on_the_wire() -> None:
    step = json.loads((CONTRACTS / "step.schema.json").read_text(encoding="utf-8"))
    assert {"workerName", "runtimeMode", "fallbackFrom", "status", "attempts", "output"} <= set(step["properties"])
    run = json.loads((CONTRACTS / "run.schema.json").read_text(encoding="utf-8"))
    assert {"id", "strategy", "status", "steps"} <= set(run["properties"])
    dumped = Run(
        id="r", task="t", strategy="single_worker",
        steps=[Step(index=0, role="worker", worker_name="w", worker_model="codex_cli", runtime_mode="cli")],
    ).model_dump(mode="json", by_alias=True)  # fmt: skip
    assert dumped["steps"][0]["workerName"] == "w" and dumped["steps"][0]["fallbackFrom"] is None


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"name": "x", "model": "gpt_cli"}, "'codex_cli', 'gemini_cli' or 'claude_cli'"),
        (
            {"name": "x", "model": "codex_cli", "runtimeMode": "google_sdk"},
            "accepted for codex_cli: 'cli', 'openai_sdk'",
        ),
        (
            {"name": "x", "model": "gemini_cli", "runtimeMode": "openai_sdk"},
            "accepted for gemini_cli: 'cli', 'google_sdk'",
        ),
        ({"name": "x", "model": "codex_cli", "fallbackPolicy": "sometimes"}, "'on_error' or 'never'"),
        ({"name": "-rf", "model": "codex_cli"}, "should match pattern"),
        ({"name": "x", "model": "codex_cli", "cliModel": "--yolo"}, "not starting with '-'"),
        ({"name": "x", "model": "codex_cli", "instructions": "a\x00b"}, "control characters"),
        ({"name": "x", "model": "codex_cli", "timeoutSeconds": 0}, "greater than 0"),
        ({"name": "x", "model": "codex_cli", "colour": "blue"}, "Extra inputs are not permitted"),
    ],
)
def test_bad_worker_specs_are_refused_with_what_is_accepted(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        WorkerSpec.model_validate(fields)
    assert message in str(caught.value)
