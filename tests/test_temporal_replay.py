"""A run whose workflow is under way when its workers are upgraded is replayed on the new code:
its recorded history must take the same course there (a change of course is guarded by
``workflow.patched``). The histories were recorded by ``tests/support/record_temporal_histories.py``
on the workflow code of their day (one directory per recording), and each is replayed here with the
workers' own runner, data converter and failure types; no Temporal server is needed."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

from mcp_collab.engine.temporal.jobs import RunJob
from mcp_collab.engine.temporal.worker import WORKFLOW_FAILURES, workflow_runner
from mcp_collab.engine.temporal.workflow import DeliverWorkflow, RunWorkflow

pytestmark = pytest.mark.anyio

HISTORIES = sorted((Path(__file__).parent / "fixtures" / "temporal_histories").rglob("*.json"))


def test_there_are_recorded_histories_of_every_shape_of_run() -> None:
    shapes = {path.stem for path in HISTORIES}
    assert {"single_worker", "review_loop", "best_of_n", "follow_up", "cancelled"} <= shapes, shapes


@pytest.mark.parametrize("path", HISTORIES, ids=lambda p: f"{p.parent.name}/{p.stem}")
async def test_a_recorded_run_replays_on_this_workflow_code(path: Path) -> None:
    history = WorkflowHistory.from_json(f"{path.parent.name}-{path.stem}", path.read_text(encoding="utf-8"))
    replayer = Replayer(
        workflows=[RunWorkflow, DeliverWorkflow],
        data_converter=pydantic_data_converter,
        workflow_runner=workflow_runner(),
        workflow_failure_exception_types=WORKFLOW_FAILURES,  # as the workers run them
    )
    result = await replayer.replay_workflow(history, raise_on_replay_failure=False)
    assert result.replay_failure is None, f"{path.name} does not replay: {result.replay_failure}"


@pytest.mark.parametrize("path", HISTORIES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_a_recorded_run_keeps_the_heartbeat_timeout_and_pickups_it_was_dispatched_with(path: Path) -> None:
    """Runs dispatched before MCP_COLLAB_TEMPORAL_HEARTBEAT_TIMEOUT_S existed decode with the 20 s
    they ran with, and their worktrees' commit waits 15 s for a worker, as it did."""
    started = json.loads(path.read_text(encoding="utf-8"))["events"][0]["workflowExecutionStartedEventAttributes"]
    job = RunJob.model_validate_json(base64.b64decode(started["input"]["payloads"][0]["data"]))
    assert "heartbeat_timeout_s" not in job.model_fields_set, "recorded before the setting"
    assert job.heartbeat_timeout_s == 20.0
    assert job.pickup_s == 30.0 and job.finish_pickup_s == 15.0
