"""Every runtime in the registry, through what a user has: the real SDK clients over HTTP against the
loopback stub, the orchestrator, the MCP server and the doctor. A runtime added to the registry is
tested here without a line of this file changing."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from typing import Any, get_args

import anyio
import pytest
from mcp import Client

from mcp_collab.config import ENDPOINT_VARIABLES, Settings
from mcp_collab.errors import RuntimeFatal, RuntimeTransient, RuntimeUnavailable
from mcp_collab.models import COMPATIBLE_MODES, WORKER_MODELS, DispatchRequest, RuntimeMode, Worker, WorkerSpec
from mcp_collab.orchestrator import WorkerOrchestrator, default_runtimes
from mcp_collab.readiness import check
from mcp_collab.runtimes.base import StepRequest
from mcp_collab.runtimes.registry import RUNTIMES, RuntimeSpec, sdk_runtimes
from mcp_collab.server import build_server
from mcp_collab.testing import Reply, ScriptedRuntime
from tests.conftest import quick_vendor_clis
from tests.support.vendor_stub import StubReply, VendorStub

pytestmark = pytest.mark.anyio

SDKS = sdk_runtimes()
# The path each vendor's base URL variable includes (OPENAI_BASE_URL carries /v1, the others do not).
BASE_PATHS = {"openai": "/v1"}


def sdk_ids(spec: RuntimeSpec) -> str:
    return spec.mode


def env_for(spec: RuntimeSpec, url: str, **extra: str) -> dict[str, str]:
    """A server environment with this runtime's key set and its endpoint at ``url``."""
    assert spec.endpoint is not None
    variable = ENDPOINT_VARIABLES[spec.endpoint][0]
    return {"HOME": "/nonexistent", spec.credentials[0]: "key-test", variable: url + BASE_PATHS.get(spec.endpoint, ""),
            **extra}  # fmt: skip


def worker_for(spec: RuntimeSpec, sdk_model: str | None = "model-test") -> Worker:
    return Worker(name="w", model=spec.serves[0], sdk_model=sdk_model)


def request(spec: RuntimeSpec, timeout: float = 10, sdk_model: str | None = "model-test") -> StepRequest:
    return StepRequest(
        worker=worker_for(spec, sdk_model), prompt="write hello.py", instructions="be brief", access="read_only",
        timeout_s=timeout, idle_timeout_s=timeout,
    )  # fmt: skip


async def run_once(spec: RuntimeSpec, settings: Settings, req: StepRequest) -> Any:
    runtime = spec.create(settings)
    try:
        return await runtime.run(req)
    finally:
        await runtime.aclose()


# -- the registry is the list ---------------------------------------------------------------------


def test_the_typed_list_of_modes_is_the_registry() -> None:
    assert get_args(RuntimeMode) == tuple(RUNTIMES), "models.RuntimeMode and runtimes/registry.py list the same modes"
    for mode, spec in RUNTIMES.items():
        assert spec.mode == mode and set(spec.serves) <= set(WORKER_MODELS)


def test_every_identity_accepts_its_cli_and_exactly_the_sdks_that_serve_it() -> None:
    for model in WORKER_MODELS:
        assert COMPATIBLE_MODES[model] == ("cli", *(s.mode for s in SDKS if model in s.serves))


def test_the_orchestrator_builds_one_of_each_registered_runtime() -> None:
    runtimes = default_runtimes(Settings.from_env({"HOME": "/nonexistent"}))
    assert {mode: r.mode for mode, r in runtimes.items()} == {mode: mode for mode in RUNTIMES}


def test_every_sdk_maps_its_client_errors_with_a_table() -> None:
    for spec in SDKS:
        table = spec.failures()
        assert table is not None and table.rules, spec.mode
    assert RUNTIMES["cli"].failures() is None


# -- each SDK runtime, with its real client, against the stub --------------------------------------


@pytest.mark.parametrize("spec", SDKS, ids=sdk_ids)
async def test_a_step_runs_through_the_real_client(stub: VendorStub, spec: RuntimeSpec) -> None:
    result = await run_once(spec, Settings.from_env(env_for(spec, stub.url)), request(spec))
    assert result.text == f"stub reply from {spec.endpoint} model model-test: write hello.py"
    assert result.usage is not None and (result.usage.input_tokens, result.usage.output_tokens) == (12, 5)
    assert result.session_id
    [call] = stub.requests
    assert call.api == spec.endpoint and call.model == "model-test" and call.system == "be brief"


@pytest.mark.parametrize("spec", SDKS, ids=sdk_ids)
async def test_the_model_comes_from_the_runtimes_variable_then_its_default(stub: VendorStub, spec: RuntimeSpec) -> None:
    [model_var] = [v for v in spec.variables if v.name.endswith("_MODEL")]
    await run_once(spec, Settings.from_env(env_for(spec, stub.url)), request(spec, sdk_model=None))
    await run_once(
        spec, Settings.from_env(env_for(spec, stub.url, **{model_var.name: "env-model"})), request(spec, sdk_model=None)
    )
    assert [r.model for r in stub.requests] == [model_var.default, "env-model"]


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (401, RuntimeUnavailable),
        (403, RuntimeUnavailable),
        (408, RuntimeTransient),
        (409, RuntimeTransient),
        (429, RuntimeTransient),
        (500, RuntimeTransient),
        (503, RuntimeTransient),
        (529, RuntimeTransient),
        (400, RuntimeFatal),
        (404, RuntimeFatal),
        (422, RuntimeFatal),
    ],
)
@pytest.mark.parametrize("spec", SDKS, ids=sdk_ids)
async def test_each_http_status_is_classified_the_same_for_every_sdk(
    stub: VendorStub, spec: RuntimeSpec, status: int, error: type[Exception]
) -> None:
    stub.script(StubReply(status=status, error_message=f"stub says {status}"))
    with pytest.raises(error) as caught:
        await run_once(spec, Settings.from_env(env_for(spec, stub.url)), request(spec))
    assert caught.value.code == f"http_{status}"  # type: ignore[attr-defined]
    assert f"HTTP {status}" in str(caught.value) and f"stub says {status}" in str(caught.value)
    assert len(stub.requests) == 1, "no hidden retries: the fallback policy decides what happens next"


@pytest.mark.parametrize("spec", SDKS, ids=sdk_ids)
async def test_a_missing_key_is_unavailable_names_the_variable_and_sends_nothing(
    stub: VendorStub, spec: RuntimeSpec
) -> None:
    env = env_for(spec, stub.url)
    del env[spec.credentials[0]]
    with pytest.raises(RuntimeUnavailable, match=spec.credentials[-1]) as caught:
        await run_once(spec, Settings.from_env(env), request(spec))
    assert caught.value.code == "missing_credentials"
    assert stub.requests == []


@pytest.mark.parametrize("spec", SDKS, ids=sdk_ids)
async def test_an_unreachable_endpoint_is_transient(spec: RuntimeSpec) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again at once: nothing listens there
    with pytest.raises(RuntimeTransient) as caught:
        await run_once(spec, Settings.from_env(env_for(spec, f"http://127.0.0.1:{port}")), request(spec))
    assert caught.value.code == "connection"


@pytest.mark.parametrize("spec", SDKS, ids=sdk_ids)
async def test_a_slow_reply_hits_the_step_timeout_as_transient(stub: VendorStub, spec: RuntimeSpec) -> None:
    stub.script(StubReply(text="too late", delay_s=5))
    with pytest.raises(RuntimeTransient, match="within 1s") as caught:
        await run_once(spec, Settings.from_env(env_for(spec, stub.url)), request(spec, timeout=1))
    assert caught.value.code == "timeout"


@pytest.mark.parametrize("spec", SDKS, ids=sdk_ids)
async def test_without_a_key_the_step_falls_back_to_the_cli_and_records_why(
    stub: VendorStub, spec: RuntimeSpec, base_env: dict[str, str]
) -> None:
    settings = Settings.from_env({**base_env, ENDPOINT_VARIABLES[spec.endpoint or ""][0]: stub.url})
    cli = ScriptedRuntime("cli", [Reply("done by the cli")])
    async with WorkerOrchestrator(settings, runtimes={"cli": cli, spec.mode: spec.create(settings)}) as orch:
        await orch.register_worker(WorkerSpec(name="w", model=spec.serves[0], runtime_mode=spec.mode))
        with anyio.fail_after(30):
            run = await orch.dispatch(DispatchRequest(task="add a README", workers=["w"]))
    [step] = run.steps
    assert (run.status, step.runtime_mode, step.fallback_from, step.output) == (
        "completed", "cli", spec.mode, "done by the cli"
    )  # fmt: skip
    assert [(a.runtime_mode, a.error_kind, a.error_code) for a in step.attempts] == [
        (spec.mode, "unavailable", "missing_credentials"), ("cli", None, None)
    ]  # fmt: skip
    assert stub.requests == []


# -- what the doctor and the MCP server say about each runtime -------------------------------------


@pytest.mark.parametrize("spec", SDKS, ids=sdk_ids)
async def test_the_doctor_reports_each_sdks_package_key_endpoint_and_readiness(
    stub: VendorStub, spec: RuntimeSpec, base_env: dict[str, str]
) -> None:
    base_env = {**base_env, **quick_vendor_clis()}  # the SDKs' rows are the point, not the CLIs'
    without = await check(Settings.from_env(base_env))
    keyed = await check(Settings.from_env({**base_env, **env_for(spec, stub.url)}))
    for report, has_key in ((without, False), (keyed, True)):
        checks = {c.name: c for c in report.checks}
        assert checks[f"sdk:{spec.mode}"].ok, f"{spec.package} is a dependency"
        credential = checks[f"credential:{' or '.join(spec.credentials)}"]
        assert credential.ok is has_key and not credential.required
        if not has_key:
            assert f"export {spec.credentials[0]} to use runtimeMode {spec.mode}" in (credential.hint or "")
        assert f"endpoint:{spec.mode}" in checks
        rows = [r for r in report.runtimes if r.mode == spec.mode]
        assert [r.worker_model for r in rows] == list(spec.serves)
        assert all(r.ready is has_key for r in rows), [r.reason for r in rows]
    assert stub.requests == [], "the doctor sends no request"


@pytest.mark.parametrize("spec", SDKS, ids=sdk_ids)
async def test_the_mcp_server_accepts_a_runtime_for_the_identities_it_serves_and_refuses_it_for_others(
    make_settings: Callable[..., Settings], spec: RuntimeSpec
) -> None:
    runtimes = {mode: ScriptedRuntime(mode, respond=lambda r: Reply("ok")) for mode in RUNTIMES}
    async with Client(build_server(make_settings(), runtimes)) as client:  # type: ignore[arg-type]
        for model in WORKER_MODELS:
            result = await client.call_tool("spawn_worker", {"name": f"x-{model}", "model": model,
                                                             "runtimeMode": spec.mode})  # fmt: skip
            text = json.dumps([c.model_dump(mode="json") for c in result.content])
            if model in spec.serves:
                assert not result.is_error, text
                assert result.structured_content is not None
                assert result.structured_content["runtimeMode"] == spec.mode
            else:
                assert result.is_error
                assert f"runtimeMode '{spec.mode}' cannot run a {model} worker" in text
                assert f"accepted for {model}: " + ", ".join(repr(m) for m in COMPATIBLE_MODES[model]) in text
        listed = await client.call_tool("list_workers", {})
        assert listed.structured_content is not None
        assert [w["model"] for w in listed.structured_content["workers"]] == list(spec.serves)
