"""Cost and the complete record: tokens (cached, cache-written, reasoning) from every runtime, the
model each vendor used, dollars from the vendor or the price table, totals per run and per worker,
budgets that stop a run between steps, and what a step ran in and changed."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from mcp import Client

from mcp_collab.config import Settings
from mcp_collab.errors import ConfigError
from mcp_collab.models import DispatchRequest, Usage, Worker, WorkerSpec
from mcp_collab.orchestrator import WorkerOrchestrator
from mcp_collab.pricing import BUILTIN_PRICES, load_prices
from mcp_collab.runtimes.anthropic_sdk import AnthropicSDKRuntime
from mcp_collab.runtimes.base import RuntimeResult, StepRequest
from mcp_collab.runtimes.cli.vendors import VENDORS
from mcp_collab.runtimes.google_sdk import GoogleSDKRuntime
from mcp_collab.runtimes.openai_sdk import OpenAISDKRuntime
from mcp_collab.server import build_server
from tests.conftest import fake_cli
from tests.support.mcp_helpers import call
from tests.support.vendor_stub import StubReply, StubRequest, VendorStub

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]

FIXTURES = Path(__file__).parent.parent / "fixtures" / "cli_outputs"
# A price that makes a handful of tokens cost whole dollars, so budgets bind on a stub's small replies.
DEAR = json.dumps({"dear-model": {"input": 100_000, "output": 100_000}})
# What the stub's default reply (12 tokens in, 5 out) costs at DEAR prices.
DEAR_STEP_USD = 17 * 100_000 / 1_000_000


def request(worker: Worker) -> StepRequest:
    return StepRequest(
        worker=worker, prompt="hi", instructions="", access="read_only", timeout_s=10, idle_timeout_s=10
    )  # fmt: skip


def sdk_env(stub: VendorStub, base_env: dict[str, str], **extra: str) -> dict[str, str]:
    return {
        **base_env,
        "OPENAI_API_KEY": "sk-test",
        "OPENAI_BASE_URL": f"{stub.url}/v1",
        "GEMINI_API_KEY": "g-test",
        "GOOGLE_GEMINI_BASE_URL": stub.url,
        "ANTHROPIC_API_KEY": "a-test",
        "ANTHROPIC_BASE_URL": stub.url,
        **extra,
    }


async def run_once(runtime: Any, req: StepRequest) -> RuntimeResult:
    try:
        return await runtime.run(req)  # type: ignore[no-any-return]
    finally:
        await runtime.aclose()


CACHED = StubReply(
    text="ok", input_tokens=100, output_tokens=40, cached_tokens=30, reasoning_tokens=25, model="served-2026-01-01"
)


# -- tokens and the model used, per runtime --------------------------------------------------------


@pytest.mark.parametrize("wire", ["responses", "chat"])
async def test_openai_sdk_records_cached_and_reasoning_tokens_and_the_model_that_answered(
    stub: VendorStub, base_env: dict[str, str], wire: str
) -> None:
    stub.script(CACHED)
    settings = Settings.from_env(sdk_env(stub, base_env, MCP_COLLAB_OPENAI_WIRE_API=wire))
    result = await run_once(OpenAISDKRuntime(settings), request(Worker(name="w", model="codex_cli", sdk_model="asked")))
    assert result.usage == Usage(
        input_tokens=100, output_tokens=40, total_tokens=140, cached_input_tokens=30, reasoning_tokens=25
    )
    assert result.model == "served-2026-01-01", "the model the vendor says answered, not the one asked for"


async def test_google_sdk_counts_thoughts_as_output_and_records_the_cached_prompt(
    stub: VendorStub, base_env: dict[str, str]
) -> None:
    stub.script(CACHED)
    settings = Settings.from_env(sdk_env(stub, base_env))
    result = await run_once(GoogleSDKRuntime(settings), request(Worker(name="g", model="gemini_cli", sdk_model="x")))
    assert result.usage == Usage(
        input_tokens=100, output_tokens=40, total_tokens=140, cached_input_tokens=30, reasoning_tokens=25
    )
    assert result.model == "served-2026-01-01"


async def test_anthropic_sdk_records_cache_reads_and_writes_apart_within_the_whole_prompt(
    stub: VendorStub, base_env: dict[str, str]
) -> None:
    stub.script(StubReply(text="ok", input_tokens=100, output_tokens=40, cached_tokens=30, cache_write_tokens=20))
    settings = Settings.from_env(sdk_env(stub, base_env))
    result = await run_once(AnthropicSDKRuntime(settings), request(Worker(name="c", model="claude_cli", sdk_model="m")))
    assert result.usage == Usage(
        input_tokens=100, output_tokens=40, total_tokens=140, cached_input_tokens=30, cache_write_tokens=20
    )
    assert result.model == "m"


def parse(vendor: str, path: Path) -> Any:
    parser = VENDORS[vendor].parser()
    for line in path.read_text(encoding="utf-8").splitlines():
        parser.feed(line)
    parser.close()
    return parser.parsed


def test_the_cli_parsers_read_tokens_model_and_cost_from_recorded_outputs() -> None:
    codex = parse("codex_cli", FIXTURES / "codex" / "0.169.0" / "exec_json_happy.jsonl")
    assert codex.usage == Usage(
        input_tokens=12, output_tokens=5, total_tokens=17, cached_input_tokens=0, cache_write_tokens=0,
        reasoning_tokens=0,
    )  # fmt: skip
    assert codex.model is None and codex.cost_usd is None, "codex names neither"
    gemini = parse("gemini_cli", FIXTURES / "gemini" / "0.61.0" / "stream_json_happy.jsonl")
    assert gemini.usage == Usage(input_tokens=12, output_tokens=5, total_tokens=17, cached_input_tokens=0)
    assert gemini.model == "gemini-2.5-flash"
    claude = parse("claude_cli", FIXTURES / "claude" / "2.1.330" / "stream_json_happy.jsonl")
    assert claude.usage == Usage(
        input_tokens=12, output_tokens=5, total_tokens=17, cached_input_tokens=0, cache_write_tokens=0,
        reasoning_tokens=0,
    )  # fmt: skip
    assert claude.model == "claude-sonnet-4-5" and claude.cost_usd == pytest.approx(0.000111)


def test_codex_turns_add_up_and_a_claude_cache_is_counted_inside_its_input() -> None:
    codex = VENDORS["codex_cli"].parser()
    for cached in (0, 8):
        turn = {"input_tokens": 10, "cached_input_tokens": cached, "output_tokens": 4, "reasoning_output_tokens": 3}
        codex.feed(json.dumps({"type": "turn.completed", "usage": turn}))
    assert codex.parsed.usage == Usage(
        input_tokens=20, output_tokens=8, total_tokens=28, cached_input_tokens=8, reasoning_tokens=6
    )
    claude = VENDORS["claude_cli"].parser()
    usage = {
        "input_tokens": 5, "cache_creation_input_tokens": 7, "cache_read_input_tokens": 11, "output_tokens": 9,
        "output_tokens_details": {"thinking_tokens": 4},
    }  # fmt: skip
    claude.feed(json.dumps({"type": "result", "result": "x", "usage": usage, "total_cost_usd": 0.5}))
    assert claude.parsed.usage == Usage(
        input_tokens=23, output_tokens=9, total_tokens=32, cached_input_tokens=11, cache_write_tokens=7,
        reasoning_tokens=4,
    )  # fmt: skip


@pytest.mark.real_cli
@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    ("model", "cli_model", "cached"),
    [("codex_cli", "gpt-5", 30), ("gemini_cli", "gemini-2.5-flash", 30), ("claude_cli", "claude-sonnet-4-5", 30)],
)
async def test_each_real_cli_records_tokens_the_model_its_version_and_a_cost(
    real_env: dict[str, str], stub: VendorStub, tmp_path: Path, model: str, cli_model: str, cached: int
) -> None:
    stub.script(*[StubReply(text="done", input_tokens=100, output_tokens=40, cached_tokens=cached)] * 4)
    async with WorkerOrchestrator(Settings.from_env(real_env)) as orchestrator:
        await orchestrator.register_worker(WorkerSpec(name="w", model=model, cli_model=cli_model))  # type: ignore[arg-type]
        run = await orchestrator.dispatch(DispatchRequest(task="say done", working_directory=str(tmp_path)))
    assert run.status == "completed", run.error
    [step] = run.steps
    assert step.usage is not None and step.usage.input_tokens == 100 and step.usage.output_tokens == 40
    assert step.usage.cached_input_tokens == cached, "the cached part of the prompt, as the CLI reported it"
    assert step.model is not None and step.model.startswith(cli_model)
    assert step.cli_version is not None and step.cli_version.startswith(VENDORS[model].package + " ")
    assert step.directory == str(tmp_path)
    assert step.cost_usd is not None and step.cost_usd > 0
    # claude prices its own steps; for the others the table does (cached input is cheaper than fresh).
    assert step.cost_source == ("vendor" if model == "claude_cli" else "price_table")
    assert run.cost_usd == pytest.approx(step.cost_usd) and run.usage == step.usage


# -- dollars ---------------------------------------------------------------------------------------


async def dispatch_sdk(
    env: dict[str, str], sdk_model: str, *, task: str = "q", strategy: str = "single_worker", **request: Any
) -> Any:
    async with WorkerOrchestrator(Settings.from_env(env)) as orchestrator:
        for worker in await orchestrator.list_workers():  # an earlier call's, on the same store
            await orchestrator.remove_worker(worker.name)
        for name in ("a", "b", "c"):
            await orchestrator.register_worker(
                WorkerSpec(name=name, model="codex_cli", runtime_mode="openai_sdk", sdk_model=sdk_model)
            )
        names = {"single_worker": ["a"], "security_redteam_pass": ["a", "b"]}.get(strategy, ["a", "b", "c"])
        run = await orchestrator.dispatch(DispatchRequest(task=task, strategy=strategy, workers=names, **request))
        return run, await orchestrator.list_runs(worker="b")


async def test_a_priced_model_costs_what_the_table_says_and_the_operator_can_change_the_price(
    stub: VendorStub, base_env: dict[str, str]
) -> None:
    stub.script(StubReply(text="x", input_tokens=1_000_000, output_tokens=100_000, cached_tokens=400_000))
    run, _ = await dispatch_sdk(sdk_env(stub, base_env), "gpt-5-2025-08-07")
    [step] = run.steps
    # gpt-5 (a dated snapshot of it): 600k fresh at $1.25, 400k cached at $0.125, 100k out at $10 per million.
    assert step.cost_source == "price_table" and step.cost_usd == pytest.approx(0.75 + 0.05 + 1.0)
    assert run.cost_usd == pytest.approx(1.8)
    override = json.dumps({"gpt-5": {"input": 2, "output": 20}})  # no cachedInput: the input price
    stub.script(StubReply(text="x", input_tokens=1_000_000, output_tokens=100_000, cached_tokens=400_000))
    run, _ = await dispatch_sdk(sdk_env(stub, base_env, MCP_COLLAB_PRICES=override), "gpt-5-2025-08-07")
    assert run.steps[0].cost_usd == pytest.approx(2.0 + 2.0)


async def test_a_price_file_is_read_too(tmp_path: Path) -> None:
    prices = tmp_path / "prices.json"
    prices.write_text(DEAR, encoding="utf-8")
    table = load_prices(str(prices))
    assert table.cost("dear-model", Usage(input_tokens=12, output_tokens=5), None) == (DEAR_STEP_USD, "price_table")
    assert table.find("gpt-5-codex") == BUILTIN_PRICES["gpt-5-codex"], "the built-in entries stay"


async def test_a_model_without_a_price_gets_no_dollars_and_the_run_says_why(
    stub: VendorStub, base_env: dict[str, str]
) -> None:
    run, _ = await dispatch_sdk(sdk_env(stub, base_env), "my-local-llm")
    [step] = run.steps
    assert step.usage is not None and step.cost_source == "unknown" and step.cost_usd is None
    assert run.cost_usd is None
    assert any("no price is known for my-local-llm" in n and "MCP_COLLAB_PRICES" in n for n in run.notes)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("{not json", "MCP_COLLAB_PRICES is not JSON"),
        ("[1, 2]", "is not a JSON object"),
        ('{"m": {"input": 1}}', "has no 'output' price"),
        ('{"m": {"input": -1, "output": 1}}', "input must be a number of dollars per million tokens"),
        ('{"m": {"input": 1, "output": 1, "cached": 1}}', "unknown keys cached; accepted: input, output"),
        ("/nonexistent/prices.json", "cannot read /nonexistent/prices.json"),
    ],
)
def test_a_bad_price_table_is_refused_at_start_saying_what_is_accepted(value: str, expected: str) -> None:
    with pytest.raises(ConfigError) as refused:
        Settings.from_env({"HOME": "/nonexistent", "MCP_COLLAB_PRICES": value})
    assert expected in str(refused.value)


@pytest.mark.parametrize("value", ["-1", "abc", "1e9"])
def test_a_bad_server_budget_is_refused_at_start(value: str) -> None:
    with pytest.raises(ConfigError) as refused:
        Settings.from_env({"HOME": "/nonexistent", "MCP_COLLAB_MAX_COST_USD": value})
    assert "MCP_COLLAB_MAX_COST_USD" in str(refused.value)


# -- budgets ---------------------------------------------------------------------------------------


async def test_a_run_over_its_budget_stops_before_its_next_step_and_names_the_budget(
    stub: VendorStub, base_env: dict[str, str]
) -> None:
    env = sdk_env(stub, base_env, MCP_COLLAB_PRICES=DEAR)
    async with Client(build_server(Settings.from_env(env))) as client:
        for name in ("a", "b"):
            await call(
                client, "spawn_worker", name=name, model="codex_cli", runtimeMode="openai_sdk", sdkModel="dear-model"
            )
        run = await call(
            client, "dispatch_task", task="t", strategy="security_redteam_pass", workers=["a", "b"], maxCostUsd=1.0
        )
    assert run["status"] == "failed"
    assert run["error"] == f"stopped: the run's cost ${DEAR_STEP_USD:g} reached its budget of $1 (maxCostUsd)"
    assert [s["status"] for s in run["steps"]] == ["completed"], "the second step never started"
    assert len(stub.requests_for("openai")) == 1
    assert run["maxCostUsd"] == 1.0 and run["costUsd"] == pytest.approx(DEAR_STEP_USD)


async def test_the_server_default_budget_applies_when_a_dispatch_names_none(
    stub: VendorStub, base_env: dict[str, str]
) -> None:
    env = sdk_env(stub, base_env, MCP_COLLAB_PRICES=DEAR, MCP_COLLAB_MAX_COST_USD="1")
    run, _ = await dispatch_sdk(env, "dear-model", strategy="security_redteam_pass")
    assert run.status == "failed" and "budget of $1 (maxCostUsd)" in (run.error or "")
    assert len(run.steps) == 1 and run.max_cost_usd == 1.0
    generous, _ = await dispatch_sdk(env, "dear-model", strategy="security_redteam_pass", max_cost_usd=100.0)
    assert generous.status == "completed" and len(generous.steps) == 2, "a dispatch's own budget wins"


async def test_parallel_branches_finish_their_steps_and_the_budget_stops_what_follows(
    stub: VendorStub, base_env: dict[str, str]
) -> None:
    env = sdk_env(stub, base_env, MCP_COLLAB_PRICES=DEAR)
    run, _ = await dispatch_sdk(env, "dear-model", strategy="parallel_consensus", max_cost_usd=2.0)
    answers = [s for s in run.steps if s.role == "answerer"]
    assert len(answers) == 2 and all(s.status == "completed" and s.output for s in answers), (
        "a branch's step is never cut short by another branch's spending"
    )
    assert not any(s.role == "synthesizer" for s in run.steps), "the synthesizer never started"
    assert run.status == "failed" and "reached its budget of $2 (maxCostUsd)" in (run.error or "")
    assert run.cost_usd == pytest.approx(2 * DEAR_STEP_USD)


# -- totals ----------------------------------------------------------------------------------------


async def test_runs_and_workers_have_token_and_dollar_totals(stub: VendorStub, base_env: dict[str, str]) -> None:
    env = sdk_env(stub, base_env, MCP_COLLAB_PRICES=DEAR)

    def replies(req: StubRequest) -> StubReply:
        return StubReply(text="FINDING: none\nVERDICT: PASS", input_tokens=10, output_tokens=10, cached_tokens=4)

    stub.responder = replies
    async with Client(build_server(Settings.from_env(env))) as client:
        for name in ("a", "b"):
            await call(
                client, "spawn_worker", name=name, model="codex_cli", runtimeMode="openai_sdk", sdkModel="dear-model"
            )
        for _ in range(2):
            run = await call(client, "dispatch_task", task="t", strategy="security_redteam_pass", workers=["a", "b"])
            assert run["status"] == "completed"
        step_usd = 20 * 100_000 / 1_000_000
        assert run["costUsd"] == pytest.approx(2 * step_usd)
        assert run["usage"]["inputTokens"] == 20 and run["usage"]["cachedInputTokens"] == 8
        everything = await call(client, "list_worker_runs")
        assert everything["runs"][0]["costUsd"] == pytest.approx(2 * step_usd)
        assert everything["runs"][0]["durationMs"] is not None
        assert everything["totals"]["runs"] == 2 and everything["totals"]["costUsd"] == pytest.approx(4 * step_usd)
        mine = await call(client, "list_worker_runs", worker="b", limit=1)
        assert mine["nextCursor"], "the totals cover every page, not just this one"
        totals = mine["totals"]
        assert (totals["runs"], totals["costUsd"], totals["uncostedSteps"]) == (2, pytest.approx(2 * step_usd), 0)
        usage = totals["usage"]
        assert (usage["inputTokens"], usage["outputTokens"], usage["cachedInputTokens"]) == (20, 20, 8), (
            "b's two steps only"
        )


# -- the complete record ---------------------------------------------------------------------------


def git(repo: Path, *args: str) -> str:
    env = ["-c", "user.email=t@t", "-c", "user.name=t"]
    return subprocess.run(["git", *env, *args], cwd=repo, capture_output=True, text=True, check=True).stdout


class TwoWriters:
    """A cli runtime whose writing steps each add a file of their own; reviewers approve."""

    mode = "cli"

    async def aclose(self) -> None:
        return None

    async def run(self, request: StepRequest) -> RuntimeResult:
        if request.access == "read_only":
            return RuntimeResult(text="VERDICT: APPROVE", model="reviewer-model")
        assert request.working_directory is not None
        done = len(list(request.working_directory.glob("round-*.txt")))
        (request.working_directory / f"round-{done + 1}.txt").write_text(f"round {done + 1}\n", encoding="utf-8")
        return RuntimeResult(text="wrote", model="writer-model")


async def test_a_writing_step_keeps_its_own_diff_readable_by_tool_and_resource(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    (repo / "app.py").write_text("x = 1\n", encoding="utf-8")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "init")
    runtimes: Any = {"cli": TwoWriters()}
    async with Client(build_server(make_settings(), runtimes)) as client:
        await call(client, "spawn_worker", name="w", model="codex_cli")
        await call(client, "spawn_worker", name="r", model="gemini_cli")
        await call(client, "spawn_worker", name="big", model="codex_cli")
        run = await call(
            client, "dispatch_task", task="t", strategy="review_loop", workers=["w", "r"], workingDirectory=str(repo)
        )
        steps = run["steps"]
        assert [s["role"] for s in steps] == ["writer", "reviewer"]
        writer, reviewer = steps
        assert "+round 1" in writer["diff"] and writer["model"] == "writer-model"
        assert reviewer["diff"] == "", "a reviewer changes nothing"
        assert writer["directory"] == run["worktrees"][0]["path"]
        page = await call(client, "read_run_output", runId=run["id"], step=0, diff=True)
        assert page["text"] == writer["diff"]
        resource = await client.read_resource(f"runs://{run['id']}/steps/0/diff")
        assert resource.contents[0].text == writer["diff"]  # type: ignore[union-attr]
        refused = await client.call_tool("read_run_output", {"runId": run["id"], "step": 1, "diff": True})
        assert refused.is_error and "steps that have one: 0" in str(refused.content)
        assert run["durationMs"] is not None and run["durationMs"] >= writer["durationMs"]


async def test_each_round_of_a_loop_keeps_only_the_change_it_made(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    class Revising(TwoWriters):
        reviews = 0

        async def run(self, request: StepRequest) -> RuntimeResult:
            if request.access == "read_only":
                Revising.reviews += 1
                return RuntimeResult(text="VERDICT: APPROVE" if Revising.reviews > 1 else "VERDICT: REQUEST_CHANGES")
            return await super().run(request)

    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    (repo / "app.py").write_text("x = 1\n", encoding="utf-8")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "init")
    runtimes: Any = {"cli": Revising()}
    async with WorkerOrchestrator(make_settings(), runtimes=runtimes) as orchestrator:
        await orchestrator.register_worker(WorkerSpec(name="w", model="codex_cli"))
        await orchestrator.register_worker(WorkerSpec(name="r", model="gemini_cli"))
        run = await orchestrator.dispatch(
            DispatchRequest(task="t", strategy="review_loop", workers=["w", "r"], working_directory=str(repo))
        )
        stored = await orchestrator.get_run(run.id)
    first, second = (s for s in stored.steps if s.role == "writer")
    assert "round-1.txt" in first.diff and "round-2.txt" not in first.diff
    assert "round-2.txt" in second.diff and "round-1.txt" not in second.diff, "round 2's diff is round 2's work"
    assert "round-1.txt" in stored.worktrees[0].diff and "round-2.txt" in stored.worktrees[0].diff


def test_a_long_step_diff_is_stored_apart_and_read_back_whole(tmp_path: Path) -> None:
    from mcp_collab.models import Run, Step
    from mcp_collab.store.json_store import LOG_NAME, PREVIEW_CHARS, JsonStore

    diff = "".join(f"+line {i}\n" for i in range(PREVIEW_CHARS))
    step = Step(index=0, role="writer", worker_name="w", worker_model="codex_cli", status="completed", diff=diff)
    JsonStore(tmp_path).save_run(Run(id="run-1", task="t", strategy="single_worker", steps=[step]))
    log = (tmp_path / LOG_NAME).read_text(encoding="utf-8")
    assert diff not in log, "the log keeps a preview; the diff lives in a file of its own"
    again = JsonStore(tmp_path).get_run("run-1")
    assert again is not None and again.steps[0].diff == diff


# -- the command -----------------------------------------------------------------------------------


def test_the_runs_command_shows_verdict_duration_and_cost(base_env: dict[str, str]) -> None:
    env = {
        **base_env,
        "MCP_COLLAB_CODEX_BIN": fake_cli("slow"),
        "CODEX_FAKE_SECONDS": "0.1",
        "MCP_COLLAB_PRICES": DEAR,
    }

    def mc(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "mcp_collab", *args], env=env, capture_output=True, text=True, timeout=120
        )

    assert mc("workers", "add", "w", "--model", "codex_cli", "--cli-model", "dear-model").returncode == 0
    assert mc("workers", "add", "x", "--model", "codex_cli", "--cli-model", "dear-model").returncode == 0
    done = mc("dispatch", "t", "--strategy", "security_redteam_pass", "--worker", "w", "--worker", "x", "--json")
    run = json.loads(done.stdout)
    # The fake codex reports 3 tokens in and 2 out: $0.5 a step at DEAR prices.
    assert run["steps"][0]["costUsd"] == pytest.approx(0.5) and run["steps"][0]["costSource"] == "price_table"
    stopped = json.loads(
        mc("dispatch", "t", "--strategy", "security_redteam_pass", "--worker", "w", "--worker", "x",
           "--max-cost-usd", "0.25", "--json").stdout
    )  # fmt: skip
    assert stopped["status"] == "failed" and "budget of $0.25 (maxCostUsd)" in stopped["error"]
    table = mc("runs").stdout
    header = table.splitlines()[0]
    assert all(h in header for h in ("verdict", "took", "cost"))
    assert "$1.0000" in table and "$0.5000" in table
    assert "total of 2 matching runs: $1.5000" in table
    shown = mc("runs", "show", run["id"]).stdout
    assert "cost      $1.0000" in shown and "price_table" in shown and "model dear-model" in shown
