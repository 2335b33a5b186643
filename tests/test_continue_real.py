"""A follow-up resumes the real CLI's own session, from a restarted server: the vendor sees the earlier
turns again."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest

from mcp_collab.config import Settings
from mcp_collab.models import DispatchRequest, WorkerSpec
from mcp_collab.orchestrator import WorkerOrchestrator
from tests.support.vendor_stub import StubReply, StubRequest, VendorStub

pytestmark = [pytest.mark.anyio, pytest.mark.real_cli, pytest.mark.timeout(120)]

FIRST = "the first answer, about parse()"


@pytest.mark.parametrize(
    ("worker", "api"),
    [
        (WorkerSpec(name="codex", model="codex_cli", cli_model="gpt-5.5"), "openai"),
        (WorkerSpec(name="claude", model="claude_cli", cli_model="claude-sonnet-4-5"), "anthropic"),
    ],
    ids=["codex", "claude"],
)
async def test_a_follow_up_resumes_the_real_clis_session(
    real_env: dict[str, str], stub: VendorStub, tmp_path: Path, worker: WorkerSpec, api: str
) -> None:
    def respond(req: StubRequest) -> StubReply:
        return StubReply(text="the follow-up answer" if "and now the tests" in req.prompt else FIRST)

    stub.responder = respond
    work = tmp_path / "work"
    work.mkdir()
    async with WorkerOrchestrator(Settings.from_env(real_env)) as orch, orch.running():
        await orch.register_worker(worker)
        with anyio.fail_after(90):
            first = await orch.dispatch(DispatchRequest(task="explain parse()", working_directory=str(work)))
    assert first.status == "completed", first.error
    assert first.steps[0].session_id, "the CLI reported its session"
    # A new server on the same store (a restart) continues it: all it needs is in the store.
    async with WorkerOrchestrator(Settings.from_env(real_env)) as orch, orch.running():
        with anyio.fail_after(90):
            follow = await orch.wait((await orch.continue_run(first.id, "and now the tests")).id, None)

    assert follow.status == "completed", follow.error
    assert follow.steps[0].continuation == "session" and follow.result == "the follow-up answer"
    generations = [r for r in stub.requests if r.api == api and r.kind in ("responses", "messages")]
    resumed = [r for r in generations if "and now the tests" in r.prompt]
    assert resumed, "the follow-up reached the vendor"
    body = json.dumps(resumed[-1].body)
    assert FIRST in body and "explain parse()" in body, "the vendor got the earlier turns back: a resumed session"
    assert "<earlier_task>" not in body, "not the recorded history: the session itself"
