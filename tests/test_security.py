"""Safe by default: access profiles, workspace confinement, hostile input, secrets, caps."""

from __future__ import annotations

import base64
import json
import logging
import os
import sys
import urllib.parse
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client

from mcp_collab.config import Settings
from mcp_collab.errors import InvalidRequestError
from mcp_collab.models import DispatchRequest, Worker, WorkerSpec
from mcp_collab.orchestrator import WorkerOrchestrator
from mcp_collab.runtimes.base import StepRequest
from mcp_collab.runtimes.cli import CLIRuntime
from mcp_collab.runtimes.cli.vendors import VENDORS
from mcp_collab.security import RedactingFilter, Redactor, pin
from mcp_collab.server import build_server
from mcp_collab.testing import Reply, ScriptedRuntime
from tests.conftest import fake_cli
from tests.support.vendor_stub import StubReply, VendorStub

pytestmark = pytest.mark.anyio

OPENAI_SECRET = "sk-plant-openai-0123456789abcdefXYZ"
GEMINI_SECRET = "AIzaPlantGemini0123456789abcdefghijklmn"
CUSTOM_SECRET = "custom-token-value-42-planted"


async def call(client: Client, tool: str, **args: Any) -> tuple[bool, dict[str, Any] | None, str]:
    result = await client.call_tool(tool, args)
    text = " ".join(getattr(c, "text", "") for c in result.content)
    return result.is_error, result.structured_content, text


# -- access profiles ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "access", "flags"),
    [
        ("codex_cli", "read_only", ["-s", "read-only"]),
        ("codex_cli", "workspace_write", ["-s", "workspace-write"]),
        ("codex_cli", "bypass", ["--dangerously-bypass-approvals-and-sandbox"]),
        ("gemini_cli", "read_only", ["--approval-mode", "plan"]),
        ("gemini_cli", "workspace_write", ["--approval-mode", "auto_edit"]),
        ("gemini_cli", "bypass", ["--approval-mode", "yolo"]),
        ("claude_cli", "read_only", ["--permission-mode", "plan"]),
        ("claude_cli", "workspace_write", ["--permission-mode", "acceptEdits"]),
        ("claude_cli", "bypass", ["--permission-mode", "bypassPermissions"]),
    ],
)
def test_each_profile_maps_to_the_clis_own_flags(model: str, access: str, flags: list[str]) -> None:
    request = StepRequest(
        worker=Worker(name="w", model=model), prompt="--yolo", instructions="", access=access,  # type: ignore[arg-type]
        timeout_s=1, idle_timeout_s=1,
    )  # fmt: skip
    argv = VENDORS[model].argv(model.split("_")[0], request, None)
    joined = " ".join(argv)
    assert " ".join(flags) in joined
    assert "--yolo" not in argv, "the prompt never lands in argv"
    others = {"--dangerously-bypass-approvals-and-sandbox", "yolo", "bypassPermissions"}
    if access != "bypass":
        assert not others & set(argv)


def access_of(requests: list[StepRequest]) -> list[str]:
    return [r.access for r in requests]


async def test_reviewers_run_read_only_and_writers_get_what_the_operator_allows(
    make_settings: Callable[..., Settings],
) -> None:
    for writer_access in ("workspace_write", "read_only", "bypass"):
        cli = ScriptedRuntime("cli", respond=lambda r: Reply("VERDICT: APPROVE"))
        settings = make_settings(
            MCP_COLLAB_WRITER_ACCESS=writer_access, MCP_COLLAB_STATE_DIR=f"/tmp/ignored-{os.getpid()}"
        )
        settings = make_settings(MCP_COLLAB_WRITER_ACCESS=writer_access)
        async with WorkerOrchestrator(settings, runtimes={"cli": cli}) as orch:
            if writer_access == "workspace_write":
                await orch.register_worker(WorkerSpec(name="c", model="codex_cli"))
                await orch.register_worker(WorkerSpec(name="g", model="gemini_cli"))
            await orch.dispatch(DispatchRequest(task="t", strategy="codex_writes_gemini_reviews"))
            await orch.dispatch(DispatchRequest(task="t", strategy="security_redteam_pass"))
        assert access_of(cli.requests) == [writer_access, "read_only", writer_access, "read_only"]


async def test_no_tool_call_can_turn_bypass_on(make_settings: Callable[..., Settings]) -> None:
    async with Client(
        build_server(make_settings(), {"cli": ScriptedRuntime("cli", respond=lambda r: Reply("ok"))})
    ) as c:
        for tool, args in [
            ("spawn_worker", {"name": "w", "model": "codex_cli", "access": "bypass"}),
            ("spawn_worker", {"name": "w", "model": "codex_cli", "instructions": "x", "yolo": True}),
            ("dispatch_task", {"task": "x", "access": "bypass"}),
            ("dispatch_task", {"task": "x", "writerAccess": "bypass"}),
        ]:
            is_error, _, text = await call(c, tool, **args)
            assert is_error, f"{tool}{args} was accepted"
            assert "does not take" in text and "its arguments are:" in text
        tools = {t.name: t for t in (await c.list_tools()).tools}
        schemas = json.dumps([t.input_schema for t in tools.values()])
        assert "bypass" not in schemas and "yolo" not in schemas


@pytest.mark.real_cli
@pytest.mark.timeout(180)
async def test_the_real_clis_accept_their_bypass_flags_when_the_operator_allows(
    real_env: dict[str, str], stub: VendorStub, tmp_path: Path
) -> None:
    env = {**real_env, "MCP_COLLAB_WRITER_ACCESS": "bypass"}
    async with WorkerOrchestrator(Settings.from_env(env)) as orch:
        for name, model, cli_model in [("c", "codex_cli", "gpt-5.5"), ("g", "gemini_cli", "gemini-2.5-flash"),
                                       ("a", "claude_cli", "claude-sonnet-4-5")]:  # fmt: skip
            await orch.register_worker(WorkerSpec(name=name, model=model, cli_model=cli_model))  # type: ignore[arg-type]
        results = {
            name: await orch.dispatch(DispatchRequest(task="hello", workers=[name], working_directory=str(tmp_path)))
            for name in ("c", "g", "a")
        }
    assert results["c"].status == "completed" and results["g"].status == "completed"
    claude = results["a"]
    # claude refuses its bypass mode under root; the refusal must surface, not vanish.
    if os.geteuid() == 0:
        assert claude.status == "failed" and "cannot be used with root" in (claude.error or "")
    else:
        assert claude.status == "completed"


# -- workspace confinement ----------------------------------------------------------------------


@pytest.fixture
async def orchestrator(make_settings: Callable[..., Settings], tmp_path: Path) -> AsyncIterator[WorkerOrchestrator]:
    root = tmp_path / "workspace"
    (root / "project").mkdir(parents=True)
    settings = make_settings(MCP_COLLAB_WORKSPACE_ROOTS=str(root))
    cli = ScriptedRuntime("cli", respond=lambda r: Reply(f"ran in {r.working_directory}"))
    async with WorkerOrchestrator(settings, runtimes={"cli": cli}) as orch:
        await orch.register_worker(WorkerSpec(name="w", model="codex_cli"))
        yield orch


async def test_a_directory_inside_a_root_is_used_resolved(orchestrator: WorkerOrchestrator, tmp_path: Path) -> None:
    project = tmp_path / "workspace" / "project"
    run = await orchestrator.dispatch(DispatchRequest(task="t", working_directory=str(project)))
    assert run.result == f"ran in {project.resolve()}"


@pytest.mark.parametrize(
    ("make_path", "message"),
    [
        (lambda t: t / "workspace" / "project" / ".." / ".." / "outside", "must not contain '..'"),
        (lambda t: t / "outside", "outside the workspace roots"),
        (lambda t: t / "workspace" / "escape", "resolves to"),
        (lambda t: Path("relative/project"), "absolute path"),
        (lambda t: t / "workspace" / "missing", "not an existing directory"),
    ],
)
async def test_escapes_from_the_workspace_are_refused(
    orchestrator: WorkerOrchestrator, tmp_path: Path, make_path: Callable[[Path], Path], message: str
) -> None:
    (tmp_path / "outside").mkdir(exist_ok=True)
    escape = tmp_path / "workspace" / "escape"
    if not escape.exists():
        escape.symlink_to(tmp_path / "outside")
    path = str(make_path(tmp_path))
    before = len((await orchestrator.list_runs()).runs)
    with pytest.raises(InvalidRequestError, match=message) as caught:
        await orchestrator.dispatch(DispatchRequest(task="t", working_directory=path))
    if message in ("outside the workspace roots", "resolves to"):
        assert str(tmp_path / "workspace") in str(caught.value), "the refusal names the roots"
    with pytest.raises(InvalidRequestError, match=message):
        await orchestrator.register_worker(WorkerSpec(name="x", model="codex_cli", working_directory=path))
    assert len((await orchestrator.list_runs()).runs) == before


# -- what was checked is what is used -----------------------------------------------------------


def swap_for_symlink(directory: Path, target: Path) -> None:
    """Replace ``directory`` by a symlink to ``target``, as a hostile process could at any moment."""
    directory.rename(directory.with_name(directory.name + "-moved"))
    directory.symlink_to(target)


class Gate(ScriptedRuntime):
    """An SDK runtime whose step holds the only run slot until the test opens the gate."""

    def __init__(self) -> None:
        super().__init__("openai_sdk", respond=lambda r: Reply("first run done"))
        self.started = anyio.Event()
        self.gate = anyio.Event()

    async def run(self, request: StepRequest) -> Any:
        self.started.set()
        await self.gate.wait()
        return await super().run(request)


@pytest.mark.parametrize("whose", ["dispatch", "worker"])
@pytest.mark.parametrize(("target", "cause"), [("/", "leaves the workspace roots"), ("outside", "leaves the workspace roots"),
                                               ("workspace/other", "a link is never followed")])  # fmt: skip
async def test_a_directory_swapped_for_a_symlink_while_the_run_was_queued_fails_the_step_and_nothing_runs_elsewhere(
    base_env: dict[str, str], tmp_path: Path, whose: str, target: str, cause: str
) -> None:
    root = tmp_path / "workspace"
    for d in (root / "project", root / "other", tmp_path / "outside"):
        d.mkdir(parents=True)
    cwds = tmp_path / "cwds.txt"
    settings = Settings.from_env({
        **base_env, "MCP_COLLAB_WORKSPACE_ROOTS": str(root), "MCP_COLLAB_MAX_CONCURRENT_RUNS": "1",
        "MCP_COLLAB_CODEX_BIN": fake_cli("pwd"), "CODEX_FAKE_CWDFILE": str(cwds),
    })  # fmt: skip
    sdk = Gate()
    async with WorkerOrchestrator(settings, runtimes={"cli": CLIRuntime(settings), "openai_sdk": sdk}) as orch:
        async with orch.running():
            project = root / "project"
            await orch.register_worker(WorkerSpec(name="blocker", model="codex_cli", runtime_mode="openai_sdk"))
            own_dir = str(project) if whose == "worker" else None
            await orch.register_worker(WorkerSpec(name="w", model="codex_cli", working_directory=own_dir))
            first = await orch.start(DispatchRequest(task="hold the slot", workers=["blocker"]))
            with anyio.fail_after(10):
                await sdk.started.wait()
            queued = await orch.start(
                DispatchRequest(task="t", workers=["w"], working_directory=None if own_dir else str(project))
            )
            assert queued.status == "queued"
            swap_for_symlink(project, Path(target) if target == "/" else tmp_path / target)
            sdk.gate.set()
            run = await orch.wait(queued.id, 10)
            assert (await orch.wait(first.id, 10)).status == "completed"
    step = run.steps[0]
    assert run.status == "failed" and step.status == "failed"
    assert step.error is not None and str(project) in step.error, "the refusal names the directory"
    assert "changed since the run was dispatched" in step.error and "is now a symbolic link" in step.error
    assert cause in step.error and "the step was not started" in step.error
    assert not cwds.exists(), "no worker process ever started"


async def test_a_cli_starts_in_exactly_the_directory_that_was_checked(base_env: dict[str, str], tmp_path: Path) -> None:
    """The control for the swap tests: the fake CLI does record where it runs, and that is the real path."""
    project = tmp_path / "workspace" / "project"
    project.mkdir(parents=True)
    (tmp_path / "workspace" / "link").symlink_to(project)
    cwds = tmp_path / "cwds.txt"
    settings = Settings.from_env({
        **base_env, "MCP_COLLAB_CODEX_BIN": fake_cli("pwd"), "CODEX_FAKE_CWDFILE": str(cwds),
    })  # fmt: skip
    async with WorkerOrchestrator(settings, runtimes={"cli": CLIRuntime(settings)}) as orch:
        await orch.register_worker(WorkerSpec(name="w", model="codex_cli"))
        run = await orch.dispatch(DispatchRequest(task="t", working_directory=str(tmp_path / "workspace" / "link")))
    assert run.status == "completed", run.error
    assert cwds.read_text(encoding="utf-8").splitlines() == [str(project.resolve())]
    assert run.result == f"ran in {project.resolve()}"


async def test_a_directory_swapped_between_steps_fails_the_next_step_before_it_runs(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    project = tmp_path / "workspace" / "project"
    project.mkdir(parents=True)

    def writer_then_review(request: StepRequest) -> Reply:
        if request.access != "read_only":  # the writer, hostile or fooled, swaps its directory for /
            swap_for_symlink(project, Path("/"))
        return Reply("VERDICT: APPROVE")

    cli = ScriptedRuntime("cli", respond=writer_then_review)
    settings = make_settings(MCP_COLLAB_WORKSPACE_ROOTS=str(tmp_path / "workspace"))
    async with WorkerOrchestrator(settings, runtimes={"cli": cli}) as orch:
        await orch.register_worker(WorkerSpec(name="c", model="codex_cli"))
        await orch.register_worker(WorkerSpec(name="g", model="gemini_cli"))
        run = await orch.dispatch(
            DispatchRequest(task="t", strategy="codex_writes_gemini_reviews", working_directory=str(project))
        )
    assert [s.status for s in run.steps] == ["completed", "failed"]
    assert len(cli.requests) == 1, "the reviewer never ran"
    error = run.steps[1].error or ""
    assert f"{project} changed since the run was dispatched" in error and "symbolic link to /" in error
    assert run.error is not None and "step 2" in run.error and "leaves the workspace roots" in run.error


@pytest.mark.parametrize("tool", ["spawn_worker", "dispatch_task"])
async def test_a_nul_in_a_path_is_a_clear_refusal(make_settings: Callable[..., Settings], tool: str) -> None:
    async with Client(
        build_server(make_settings(), {"cli": ScriptedRuntime("cli", respond=lambda r: Reply("ok"))})
    ) as c:
        await call(c, "spawn_worker", name="w", model="codex_cli")
        args = {"name": "x", "model": "codex_cli"} if tool == "spawn_worker" else {"task": "t"}
        is_error, _, text = await call(c, tool, workingDirectory="/tmp/a\x00b", **args)
        assert is_error and "internal error" not in text
        assert "workingDirectory must not contain NUL" in text and "absolute path of an existing directory" in text
        is_error, _, _ = await call(c, "list_workers")
        assert not is_error, "the server is still up"


# -- hostile input and caps ---------------------------------------------------------------------


async def test_task_size_caps_give_clear_errors(make_settings: Callable[..., Settings]) -> None:
    async with Client(
        build_server(make_settings(), {"cli": ScriptedRuntime("cli", respond=lambda r: Reply("ok"))})
    ) as c:
        await call(c, "spawn_worker", name="w", model="codex_cli")
        is_error, _, text = await call(c, "dispatch_task", task="x" * 300_000)
        assert is_error and "300000 characters; the limit is 200000 (MCP_COLLAB_MAX_TASK_CHARS)" in text
        is_error, _, text = await call(c, "dispatch_task", task="y" * 3_000_000)
        assert is_error and "task" in text and "2000000" in text
        is_error, run, _ = await call(c, "dispatch_task", task="-- --yolo; $(rm -rf /) `id` | tee /etc/passwd")
        assert not is_error and run is not None and run["status"] == "completed"


async def test_the_queue_cap_refuses_more_runs_with_a_clear_error(make_settings: Callable[..., Settings]) -> None:
    import anyio

    gate = anyio.Event()

    class Blocking(ScriptedRuntime):
        async def run(self, request: StepRequest) -> Any:
            await gate.wait()
            return await super().run(request)

    settings = make_settings(MCP_COLLAB_MAX_CONCURRENT_RUNS="1", MCP_COLLAB_MAX_QUEUED_RUNS="2")
    async with WorkerOrchestrator(settings, runtimes={"cli": Blocking("cli", respond=lambda r: Reply("ok"))}) as orch:
        async with orch.running():
            await orch.register_worker(WorkerSpec(name="w", model="codex_cli"))
            runs = [await orch.start(DispatchRequest(task=f"t{i}")) for i in range(3)]  # 1 running, 2 queued
            with anyio.fail_after(5):
                while (await orch.get_run(runs[0].id)).status != "running":
                    await anyio.sleep(0.01)
            with pytest.raises(InvalidRequestError, match=r"2 runs are already waiting .*MCP_COLLAB_MAX_QUEUED_RUNS"):
                await orch.start(DispatchRequest(task="one too many"))
            gate.set()
            assert [(await orch.wait(r.id, 10)).status for r in runs] == ["completed"] * 3


# -- secrets ------------------------------------------------------------------------------------


def test_the_redactor_hides_known_values_and_key_shapes() -> None:
    redact = Redactor.from_environ(
        {"OPENAI_API_KEY": OPENAI_SECRET, "PATH": "/usr/bin", "MY_TOKEN": CUSTOM_SECRET, "GH_TOKEN": "short"}
    )
    text = (
        f"key={OPENAI_SECRET} other={CUSTOM_SECRET} gh=ghp_abcdefghijklmnopqrstuvwxyz012345 "
        "aws=AKIAABCDEFGHIJKLMNOP auth: Bearer abcdefghijklmnopqrstuvwxyz path=/usr/bin short"
    )
    cleaned = redact(text)
    for secret in (
        OPENAI_SECRET,
        CUSTOM_SECRET,
        "ghp_abcdefghijklmnopqrstuvwxyz012345",
        "AKIAABCDEFGHIJKLMNOP",
        "abcdefghijklmnopqrstuvwxyz",
    ):
        assert secret not in cleaned
    assert "path=/usr/bin" in cleaned and "short" in cleaned and cleaned.count("[REDACTED]") == 5


# A key read from a file (trailing newline), with the characters JSON and URLs escape.
SPECIAL_SECRET = 'tok/en"with\\special chars+&=€-0123'


def encodings(secret: str) -> list[str]:
    """How a key can appear in text: raw, JSON-escaped (also nested, and with '/' escaped), in a URL."""
    quoted = json.dumps(secret)[1:-1]
    return [
        secret, quoted, json.dumps(secret, ensure_ascii=False)[1:-1], quoted.replace("/", "\\/"),
        json.dumps(quoted)[1:-1], urllib.parse.quote(secret, safe=""), urllib.parse.quote(secret),
        urllib.parse.quote_plus(secret), urllib.parse.quote(secret, safe="").lower(),
    ]  # fmt: skip


def test_a_key_is_hidden_however_it_was_set_and_however_it_appears() -> None:
    redact = Redactor.from_environ(
        {"MY_SERVICE_TOKEN": SPECIAL_SECRET + "\n", "OPENAI_API_KEY": f"  {OPENAI_SECRET} \n"}
    )
    for secret in (SPECIAL_SECRET, OPENAI_SECRET):
        for form in encodings(secret):
            cleaned = redact(f'{{"text": "before {form} after"}}')
            assert form not in cleaned and "before [REDACTED] after" in cleaned, form
        url = f"https://user:{urllib.parse.quote(secret, safe='')}@host/v1?key={urllib.parse.quote_plus(secret)}&x=1"
        assert redact(url) == "https://user:[REDACTED]@host/v1?key=[REDACTED]&x=1"
        for user in ("u", "us", "user"):  # the three alignments of the key inside the base64
            header = base64.b64encode(f"{user}:{secret}".encode()).decode()
            cleaned = redact(f"Authorization: Basic {header}")
            assert "[REDACTED]" in cleaned
            head, tail = cleaned.removeprefix("Authorization: Basic ").split("[REDACTED]")
            # What remains is the user name with at most two bytes of the key, and the last group.
            assert len(base64.b64decode(head)) <= len(user) + 1 + 2 and len(tail) <= 4
    assert redact("a/b \\ c+d & e=f") == "a/b \\ c+d & e=f", "ordinary text is left alone"


@pytest.mark.timeout(120)
async def test_a_key_in_any_field_or_argument_never_comes_back_nor_is_stored_or_logged(
    base_env: dict[str, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "workspace"
    (root / OPENAI_SECRET).mkdir(parents=True)
    env = {
        **base_env, "MCP_COLLAB_WORKSPACE_ROOTS": str(root),
        "OPENAI_API_KEY": OPENAI_SECRET + "\n", "MY_SERVICE_TOKEN": f" {SPECIAL_SECRET}\n",
    }  # fmt: skip
    settings = Settings.from_env(env)
    caplog.handler.addFilter(RedactingFilter(settings.redact))
    caplog.set_level(logging.DEBUG)
    leaky = (
        f"found {json.dumps({'key': SPECIAL_SECRET})} and "
        f"https://api.example/v1?key={urllib.parse.quote_plus(SPECIAL_SECRET)} and "
        f"Basic {base64.b64encode(f'me:{OPENAI_SECRET}'.encode()).decode()}"
    )
    cli = ScriptedRuntime("cli", respond=lambda r: Reply(leaky, session_id=f"s-{OPENAI_SECRET}"))
    results: list[str] = []
    refusals: list[str] = []
    async with Client(build_server(settings, {"cli": cli})) as c:
        is_error, _, text = await call(
            c, "spawn_worker", name="w", model="codex_cli", instructions=f"use {SPECIAL_SECRET}"
        )
        assert not is_error, text
        for secret in (OPENAI_SECRET, SPECIAL_SECRET):
            for tool, args in [
                ("spawn_worker", {"name": secret, "model": "codex_cli"}),
                ("spawn_worker", {"name": "x", "model": secret}),
                ("spawn_worker", {"name": "x", "model": "codex_cli", "sdkModel": secret}),
                ("spawn_worker", {"name": "x", "model": "codex_cli", "cliModel": secret}),
                ("spawn_worker", {"name": "x", "model": "codex_cli", "workingDirectory": str(root / secret)}),
                ("spawn_worker", {"name": "x", "model": "codex_cli", "runtimeMode": secret}),
                ("remove_worker", {"name": secret}),
                ("dispatch_task", {"task": "t", "strategy": secret}),
                ("dispatch_task", {"task": "t", "workers": [secret]}),
                ("dispatch_task", {"task": "t", "runtimeModes": {secret: "cli"}}),
                ("dispatch_task", {"task": "t", "runtimeModes": {secret: "bogus"}}),
                ("dispatch_task", {"task": "t", "workingDirectory": f"/nowhere/{secret}"}),
                ("dispatch_task", {"task": "t", "fallbackPolicy": secret}),
                ("get_worker_run", {"runId": secret}),
                ("wait_worker_run", {"runId": secret, "timeoutSeconds": 0}),
                ("cancel_worker_run", {"runId": secret}),
                ("list_worker_runs", {"cursor": secret}),
                ("list_worker_runs", {"status": secret}),
                ("list_workers", {secret: 1}),
            ]:
                is_error, structured, text = await call(c, tool, **args)
                assert is_error, f"{tool} {args} was accepted"
                refusals.append(text)
                results.append(json.dumps(structured) + text)
        is_error, run, text = await call(c, "dispatch_task", task=f"deploy with {OPENAI_SECRET} and {SPECIAL_SECRET}")
        assert not is_error and run is not None and run["status"] == "completed", text
        results.append(json.dumps(run) + text)
        for tool, args in [("get_worker_run", {"runId": run["id"]}), ("list_worker_runs", {}), ("list_workers", {})]:
            _, structured, text = await call(c, tool, **args)
            results.append(json.dumps(structured) + text)
        results.append((await c.read_resource(f"runs://{run['id']}")).contents[0].text)  # type: ignore[union-attr]
        with pytest.raises(Exception) as caught:
            await c.read_resource(f"runs://{OPENAI_SECRET}")
        results.append(str(caught.value))
    # A key-shaped name, sdkModel, cliModel or workingDirectory is refused as a credential; the key
    # with spaces fails the name and model rules first, and only its directory reaches that check.
    assert sum("holds a credential" in r and "it is not repeated here" in r for r in refusals) == 5
    stored = "".join(
        p.read_text(encoding="utf-8", errors="replace") for p in (tmp_path / "state").rglob("*") if p.is_file()
    )
    assert "[REDACTED]" in stored, "the leaks were there to be redacted"
    everything = "\n".join([*results, stored, caplog.text])
    for secret in (OPENAI_SECRET, SPECIAL_SECRET):
        for form in encodings(secret):
            assert form not in everything, f"{form!r} leaked"


@pytest.mark.timeout(120)
async def test_planted_secrets_never_reach_the_store_the_logs_or_a_tool_result(
    base_env: dict[str, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    stub = VendorStub().start()
    try:
        stub.script(StubReply(status=401, error_message=f"Incorrect API key provided: {OPENAI_SECRET}"))
        env = {
            **base_env,
            "OPENAI_API_KEY": OPENAI_SECRET, "OPENAI_BASE_URL": f"{stub.url}/v1",
            "GEMINI_API_KEY": GEMINI_SECRET, "MY_SERVICE_TOKEN": CUSTOM_SECRET, "MCP_COLLAB_CHILD_ENV": "MY_SERVICE_TOKEN",
            "MCP_COLLAB_CODEX_BIN": fake_cli("leak"),
        }  # fmt: skip
        handler_filter = RedactingFilter(Settings.from_env(env).redact)
        caplog.handler.addFilter(handler_filter)
        caplog.set_level(logging.DEBUG)
        results: list[str] = []
        async with Client(build_server(Settings.from_env(env))) as c:
            for tool, args in [
                ("spawn_worker", {"name": "w", "model": "codex_cli", "instructions": f"use {CUSTOM_SECRET}"}),
                ("dispatch_task", {"task": f"deploy with key {OPENAI_SECRET} and {GEMINI_SECRET}"}),
                ("dispatch_task", {"task": "fall back", "runtimeMode": "openai_sdk"}),  # the 401 names the key
                ("list_workers", {}),
            ]:
                _, structured, text = await call(c, tool, **args)
                results.append(json.dumps(structured) + text)
            _, page, text = await call(c, "list_worker_runs")
            results.append(json.dumps(page) + text)
            assert page is not None and len(page["runs"]) == 2
            for run_id in [r["id"] for r in page["runs"]]:
                _, structured, text = await call(c, "get_worker_run", runId=run_id)
                results.append(json.dumps(structured) + text)
                resource = await c.read_resource(f"runs://{run_id}")
                results.append(resource.contents[0].text)  # type: ignore[union-attr]
        assert any("[REDACTED]" in r for r in results), "the leaks were there to be redacted"
        stored = "".join(p.read_text(errors="replace") for p in (tmp_path / "state").rglob("*") if p.is_file())
        everything = "\n".join([*results, stored, caplog.text])
        assert "sk-proj-ABCDEFGHIJKLMNOPQRSTUV123" not in everything
        for secret in (OPENAI_SECRET, GEMINI_SECRET, CUSTOM_SECRET):
            assert secret not in everything
    finally:
        stub.stop()


@pytest.mark.timeout(120)
async def test_the_served_server_logs_no_secret_even_at_debug(base_env: dict[str, str]) -> None:
    import anyio

    env = {
        **base_env,
        "OPENAI_API_KEY": OPENAI_SECRET,
        "MCP_COLLAB_CODEX_BIN": fake_cli("leak"),
        "CODEX_FAKE_FAIL": "1",
    }
    messages = [
        {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}},
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "spawn_worker", "arguments": {"name": "w", "model": "codex_cli"}}},
        {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "dispatch_task", "arguments": {"task": f"use {OPENAI_SECRET}"}}},
    ]  # fmt: skip
    process = await anyio.open_process([sys.executable, "-m", "mcp_collab", "serve", "--log-level", "DEBUG"], env=env)
    assert process.stdin and process.stdout and process.stderr
    out = b""

    async def reply(request_id: int) -> None:
        nonlocal out
        while f'"id":{request_id}'.encode() not in out.replace(b" ", b"") or not out.endswith(b"\n"):
            out += await process.stdout.receive()  # type: ignore[union-attr]

    with anyio.fail_after(60):
        # The server handles requests concurrently: the dispatch goes once the worker is registered.
        await process.stdin.send("".join(json.dumps(m) + "\n" for m in messages[:3]).encode())
        await reply(2)
        await process.stdin.send((json.dumps(messages[3]) + "\n").encode())
        await reply(3)
        await process.stdin.aclose()
        await process.wait()
        err = b"".join([chunk async for chunk in process.stderr])
    replies = [json.loads(line) for line in out.decode().splitlines()]
    [dispatched] = [r for r in replies if r.get("id") == 3]
    run = dispatched["result"]["structuredContent"]
    assert run["status"] == "failed" and "[REDACTED]" in run["error"], "the CLI's failure quoted the key"
    assert OPENAI_SECRET not in out.decode() and OPENAI_SECRET not in err.decode()
    assert b"DEBUG" in err, "the log was at debug level"


def test_a_root_reached_through_a_symlink_that_is_pointed_elsewhere_no_longer_admits_its_directories(
    tmp_path: Path,
) -> None:
    real, other = tmp_path / "real", tmp_path / "other"
    (real / "project").mkdir(parents=True)
    (other / "project").mkdir(parents=True)
    root = tmp_path / "root-link"
    root.symlink_to(real)
    directory = (real / "project").resolve()
    with pin(directory, [root]) as pinned:  # the root's real path holds it
        assert pinned.cwd.resolve() == directory
    root.unlink()
    root.symlink_to(other)  # the operator's root now means another tree
    with pytest.raises(InvalidRequestError, match="now leaves the workspace roots"):
        pin(directory, [root])
    with pin((other / "project").resolve(), [root]):
        pass
