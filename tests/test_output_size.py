"""No output is lost to its size: an answer of any size and shape is stored whole, tools return a
clipped view that points at it, and an answer that cannot be read fails the step, saying why."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest
from mcp import Client

from mcp_collab.config import Settings
from mcp_collab.models import DispatchRequest, Run, WorkerSpec
from mcp_collab.orchestrator import WorkerOrchestrator
from mcp_collab.runtimes.cli.supervisor import LineSplitter, ProcessSpec, run_process
from mcp_collab.server import build_server
from mcp_collab.store import JsonStore
from mcp_collab.testing import Reply, ScriptedRuntime
from tests.conftest import fake_cli
from tests.fake_clis.fakecli import answer_text, plain_text
from tests.support.mcp_helpers import call
from tests.support.vendor_stub import StubReply, VendorStub

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(180)]

MIB = 1 << 20
# Through the escaping of the fake's answer unit, 5 Mi characters are a JSON line of about 8 MiB.
FIVE_MIB = 5 * MIB
BIN_VARS = {
    "codex_cli": "MCP_COLLAB_CODEX_BIN",
    "gemini_cli": "MCP_COLLAB_GEMINI_BIN",
    "claude_cli": "MCP_COLLAB_CLAUDE_BIN",
}
BAD_BYTES_ANSWER = "bad \ufffd\ufffd bytes, a raw \x00 NUL and an escaped \x00 one"


def env_for(base_env: dict[str, str], model: str, fake: str, **extra: str) -> dict[str, str]:
    return {**base_env, BIN_VARS[model]: fake_cli(fake), **extra}


async def run_once(env: dict[str, str], model: str = "codex_cli", cli_model: str | None = None) -> tuple[Run, Run]:
    """One step on a worker of ``model``; the run as the orchestrator ended it, and as a fresh
    store reads it back from disk."""
    settings = Settings.from_env(env)
    async with WorkerOrchestrator(settings) as orch:
        await orch.register_worker(WorkerSpec(name="worker", model=model, cli_model=cli_model))
        with anyio.fail_after(120):
            run = await orch.dispatch(DispatchRequest(task="answer at length", workers=["worker"]))
    stored = JsonStore(settings.store_dir).get_run(run.id)
    assert stored is not None
    return run, stored


@pytest.mark.parametrize("chars", [FIVE_MIB, 20 * MIB], ids=["5MiB", "20MiB"])
async def test_a_codex_answer_on_one_huge_json_line_is_stored_whole(base_env: dict[str, str], chars: int) -> None:
    run, stored = await run_once(env_for(base_env, "codex_cli", "size_codex", CODEX_FAKE_ANSWER_CHARS=str(chars)))
    expected = answer_text(chars)
    assert run.status == "completed", run.error
    [step] = stored.steps
    assert step.status == "completed" and not step.output_truncated
    assert step.output == expected
    assert stored.result == expected


@pytest.mark.parametrize(
    ("model", "fake", "extra"),
    [
        ("gemini_cli", "size_gemini", {"GEMINI_FAKE_ANSWER_CHARS": str(FIVE_MIB)}),
        ("claude_cli", "size_claude", {"CLAUDE_FAKE_ANSWER_CHARS": str(FIVE_MIB)}),
    ],
    ids=["gemini-streamed-in-small-deltas", "claude-result-with-no-final-newline"],
)
async def test_a_5_mib_answer_from_gemini_and_claude_is_stored_whole(
    base_env: dict[str, str], model: str, fake: str, extra: dict[str, str]
) -> None:
    run, stored = await run_once(env_for(base_env, model, fake, **extra), model)
    assert run.status == "completed", run.error
    assert stored.steps[0].output == answer_text(FIVE_MIB)
    assert not stored.steps[0].output_truncated


async def test_a_huge_plain_line_before_the_events_does_not_cost_the_answer(base_env: dict[str, str]) -> None:
    env = env_for(
        base_env, "codex_cli", "size_codex", CODEX_FAKE_ANSWER_CHARS="5000", CODEX_FAKE_NOISE_BYTES=str(10 * MIB)
    )
    run, stored = await run_once(env)
    assert run.status == "completed", run.error
    assert stored.steps[0].output == answer_text(5000)


async def test_invalid_utf8_and_nul_bytes_inside_the_answer_are_kept(base_env: dict[str, str]) -> None:
    run, stored = await run_once(env_for(base_env, "codex_cli", "size_bytes"))
    assert run.status == "completed", run.error
    assert stored.steps[0].output == BAD_BYTES_ANSWER


async def test_plain_output_with_no_newline_fails_as_unreadable_and_is_kept(base_env: dict[str, str]) -> None:
    chars = MIB + MIB // 2  # within the head and tail the stream capture keeps (1 MiB each)
    run, stored = await run_once(env_for(base_env, "codex_cli", "size_plain", CODEX_FAKE_ANSWER_CHARS=str(chars)))
    assert run.status == "failed"
    [step] = stored.steps
    assert step.status == "failed" and step.error is not None
    assert "printed no final event" in step.error
    assert step.output == plain_text(chars)


async def test_an_answer_line_over_the_cap_fails_the_step_naming_the_cap(base_env: dict[str, str]) -> None:
    env = env_for(
        base_env, "codex_cli", "size_codex", CODEX_FAKE_ANSWER_CHARS=str(2 * MIB), MCP_COLLAB_MAX_ANSWER_BYTES=str(MIB)
    )
    run, stored = await run_once(env)
    assert run.status == "failed" and run.result is None
    [step] = stored.steps
    assert step.status == "failed" and step.error is not None
    assert "MCP_COLLAB_MAX_ANSWER_BYTES" in step.error and f"{MIB}-byte cap" in step.error
    assert len(answer_text(2 * MIB).encode()) < int(step.error.split("a line of ")[1].split()[0])


async def test_a_streamed_answer_over_the_cap_fails_the_step_naming_the_cap(base_env: dict[str, str]) -> None:
    env = env_for(
        base_env,
        "gemini_cli",
        "size_gemini",
        GEMINI_FAKE_ANSWER_CHARS=str(2 * MIB),
        GEMINI_FAKE_PIECE_CHARS="65536",
        MCP_COLLAB_MAX_ANSWER_BYTES=str(MIB),
    )
    run, stored = await run_once(env, "gemini_cli")
    assert run.status == "failed"
    [step] = stored.steps
    assert step.error is not None
    assert "streamed an answer of at least" in step.error and "MCP_COLLAB_MAX_ANSWER_BYTES" in step.error


async def test_an_sdk_answer_over_the_cap_fails_the_step_and_keeps_its_ends(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(MCP_COLLAB_MAX_ANSWER_BYTES=str(MIB))
    big = "start " + "x" * (2 * MIB) + " end"
    sdk = ScriptedRuntime("openai_sdk", [Reply(big)])
    async with WorkerOrchestrator(settings, runtimes={"openai_sdk": sdk}) as orch:
        await orch.register_worker(WorkerSpec(name="worker", model="codex_cli"))
        run = await orch.dispatch(DispatchRequest(task="t", workers=["worker"], runtime_mode="openai_sdk"))
    [step] = run.steps
    assert run.status == "failed" and step.status == "failed" and step.error is not None
    assert f"the answer is {len(big)} bytes, over the {MIB}-byte cap" in step.error
    assert "MCP_COLLAB_MAX_ANSWER_BYTES" in step.error
    assert step.output_truncated and step.output.startswith("start ") and step.output.endswith(" end")


async def test_an_sdk_answer_larger_than_the_stream_capture_is_stored_whole(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(MCP_COLLAB_CAPTURE_BYTES="4096")
    big = answer_text(MIB)
    sdk = ScriptedRuntime("openai_sdk", [Reply(big)])
    async with WorkerOrchestrator(settings, runtimes={"openai_sdk": sdk}) as orch:
        await orch.register_worker(WorkerSpec(name="worker", model="codex_cli"))
        run = await orch.dispatch(DispatchRequest(task="t", workers=["worker"], runtime_mode="openai_sdk"))
    assert run.status == "completed"
    assert run.steps[0].output == big and not run.steps[0].output_truncated


@pytest.mark.parametrize(
    ("fake", "extra", "expected"),
    [
        ("size_codex", {"CODEX_FAKE_ANSWER_CHARS": str(FIVE_MIB)}, answer_text(FIVE_MIB)),
        ("size_bytes", {}, BAD_BYTES_ANSWER),
    ],
    ids=["5MiB", "bad-bytes"],
)
async def test_through_mcp_a_tool_returns_a_clipped_view_and_the_resource_the_whole_answer(
    base_env: dict[str, str], fake: str, extra: dict[str, str], expected: str
) -> None:
    settings = Settings.from_env(env_for(base_env, "codex_cli", fake, **extra))
    async with Client(build_server(settings)) as client:
        await call(client, "spawn_worker", name="codex-writer", model="codex_cli")
        started = await call(client, "dispatch_task", task="answer at length", waitSeconds=0)
        with anyio.fail_after(120):
            while (run := await call(client, "get_worker_run", runId=started["id"]))["status"] not in (
                "completed",
                "failed",
            ):
                await call(client, "wait_worker_run", runId=started["id"], timeoutSeconds=30)
        assert run["status"] == "completed", run["error"]
        step = run["steps"][0]
        uri = f"runs://{run['id']}/steps/0/output"
        if len(expected) > 8_000:
            assert step["outputTruncated"] is True and uri in step["output"]
            assert len(step["output"]) < 10_000 and expected.startswith(step["output"].split("\n[... ")[0])
        else:
            assert step["output"] == expected
        whole = await client.read_resource(uri)
        assert whole.contents[0].text == expected  # type: ignore[union-attr]
        entire = await client.read_resource(f"runs://{run['id']}")
        assert json.loads(entire.contents[0].text)["result"] == expected  # type: ignore[union-attr]


async def test_a_line_without_a_newline_is_spooled_not_held_and_dropped_over_the_cap(tmp_path: Path) -> None:
    lines: list[str] = []
    outcome = await run_process(
        ProcessSpec(
            argv=[fake_cli("size_plain")],
            env={"PATH": os.environ["PATH"], "CODEX_FAKE_ANSWER_CHARS": str(3 * MIB)},
            cwd=None,
            stdin=b"",
            timeout_s=60,
            idle_timeout_s=60,
            capture_bytes=64 * 1024,
            max_line_bytes=2 * MIB,
            spool_dir=tmp_path,
        ),
        on_line=lines.append,
    )
    assert outcome.exit_code == 0
    assert lines == [] and outcome.dropped_lines == 1
    assert outcome.longest_dropped_line == len(plain_text(3 * MIB).encode())
    assert list(tmp_path.iterdir()) == [], "the spool leaves nothing behind"


def test_the_line_splitter_hands_over_long_lines_whole_through_its_spool(tmp_path: Path) -> None:
    got: list[str] = []
    splitter = LineSplitter(got.append, 64, spool_after=8, spool_dir=tmp_path)
    splitter.feed(b"short\nthis line outgrows ")
    splitter.feed(b"memory \xff and\x00 ends here\n" + b"x" * 65)
    splitter.feed(b"\nlast line, no newline")
    splitter.close()
    assert got == ["short", "this line outgrows memory \ufffd and\x00 ends here", "last line, no newline"]
    assert splitter.dropped == 1 and splitter.longest_dropped == 65


@pytest.mark.real_cli
async def test_the_real_codex_cli_brings_a_5_mib_answer_whole(real_env: dict[str, str], stub: VendorStub) -> None:
    expected = answer_text(FIVE_MIB)
    stub.script(StubReply(text=expected))
    run, stored = await run_once(real_env, cli_model="gpt-5.5")
    assert run.status == "completed", run.error
    assert stored.steps[0].output == expected
