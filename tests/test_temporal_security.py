"""What Temporal sees of runs, and who may talk to it: payloads encrypted with
MCP_COLLAB_TEMPORAL_PAYLOAD_KEYS (read back from the real dev server's history without the keys),
and TLS with a client certificate and a private CA (through a TLS-terminating proxy in front of the
dev server, which speaks plain gRPC only)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest
from google.protobuf.message import Message
from temporalio.api.common.v1 import Payload
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client

from mcp_collab import readiness
from mcp_collab.config import Settings, payload_key_id
from mcp_collab.engine.temporal import client as temporal_client
from mcp_collab.engine.temporal.codec import EncryptionCodec
from mcp_collab.models import DispatchRequest
from tests.conftest import quick_vendor_clis
from tests.support.temporal import TemporalDev, WorkerProcess, dev_server, engine_env
from tests.support.tls import SERVER_NAME, CertAuthority, TLSProxy
from tests.test_temporal_engine import engine_checks, server

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(240)]

KEY_1 = "11" * 32
KEY_2 = "22" * 32
SENT_BY_US = {
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED,
    EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED,
    EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED,
    EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED,
}


@pytest.fixture(scope="module")
def temporal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TemporalDev]:
    yield from dev_server(tmp_path_factory)


@pytest.fixture
def env(base_env: dict[str, str], temporal: TemporalDev, tmp_path: Path) -> dict[str, str]:
    # doctor's CLI rows are not what these tests are about: the CLIs answer at once
    return engine_env({**base_env, **quick_vendor_clis()}, temporal, tmp_path.name)


@pytest.fixture
def machines(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Start worker processes (``start=False``: made, not started); each is stopped at the end."""
    made: list[WorkerProcess] = []

    def make(env: dict[str, str], queue: str, root: Path, *, start: bool = True, **extra: str) -> WorkerProcess:
        root.mkdir(parents=True, exist_ok=True)
        worker = WorkerProcess({**env, **extra}, f"{queue}-{tmp_path.name}", [root])
        made.append(worker)
        return worker.start() if start else worker

    yield make
    for i, worker in enumerate(made):
        worker.stop()
        (tmp_path / f"worker-{i}-{worker.queue}.log").write_text("".join(worker.lines), encoding="utf-8")


def payloads_in(message: Message) -> Iterator[Payload]:
    """Every payload a history event holds, however deep."""
    if isinstance(message, Payload):
        yield message
        return
    for field, value in message.ListFields():
        if field.message_type is None:
            continue
        if field.message_type.GetOptions().map_entry:
            items = list(value.values())
        elif field.is_repeated:
            items = list(value)
        else:
            items = [value]
        for item in items:
            if isinstance(item, Message):
                yield from payloads_in(item)


async def said(worker: WorkerProcess, text: str) -> str:
    """The worker's log line that holds ``text``, once it has logged it."""
    with anyio.fail_after(60):
        while not (found := [line for line in worker.lines if text in line]):
            await anyio.sleep(0.1)
    return found[0]


async def test_a_run_with_a_payload_key_leaves_neither_its_task_nor_its_output_readable_in_temporal(
    env: dict[str, str], machines: Callable[..., WorkerProcess], temporal: TemporalDev, tmp_path: Path
) -> None:
    key_file = tmp_path / "payload.key"
    key_file.write_text(KEY_1 + "\n", encoding="utf-8")
    env = {**env, "MCP_COLLAB_TEMPORAL_PAYLOAD_KEYS": str(key_file)}
    task, output = "rotate the ledger's zebra-crossing secret", "the ledger now holds a pelican"
    machines(env, "alpha", tmp_path / "alpha", CODEX_FAKE_SAY=output)
    orchestrator = await server(env)
    async with orchestrator, orchestrator.running():
        run = await orchestrator.dispatch(DispatchRequest(task=task, working_directory=str(tmp_path / "alpha")))
    assert run.status == "completed" and run.result == output, run.error

    plain = await Client.connect(temporal.address)  # anyone who can read the namespace, without the key
    history = await plain.get_workflow_handle(run.id).fetch_history()
    raw = b"".join(event.SerializeToString() for event in history.events)
    assert task.encode() not in raw and output.encode() not in raw
    payloads = [p for event in history.events for p in payloads_in(event)]
    payloads = [p for event in history.events for p in payloads_in(event)]
    # Every payload mcp-collab sends is sealed: the run's job and end, each activity's input and
    # result. What stays in clear is Temporal's own bookkeeping (the markers of patches and local
    # activities, the search attribute of patches): no task, no output, as ``raw`` showed.
    ours = [p for event in history.events if event.event_type in SENT_BY_US for p in payloads_in(event)]
    assert len(ours) >= 4 and all(p.metadata["encoding"] == b"binary/encrypted" for p in ours)
    sealed = [p for p in payloads if p.metadata["encoding"] == b"binary/encrypted"]
    assert {p.metadata["encryption-key-id"] for p in sealed} == {payload_key_id(bytes.fromhex(KEY_1)).encode()}
    # The same history through the key: the task and the step's output were there all along.
    opened = b"".join(p.data for p in await EncryptionCodec([bytes.fromhex(KEY_1)]).decode(sealed))
    assert task.encode() in opened and output.encode() in opened

    checks = engine_checks(await readiness.check(Settings.from_env(env)))
    assert checks["engine:payloads"].ok and payload_key_id(bytes.fromhex(KEY_1)) in checks["engine:payloads"].detail
    assert KEY_1 not in checks["engine:payloads"].model_dump_json()


async def test_a_worker_with_another_key_or_none_fails_the_run_and_says_which_key_it_lacks(
    env: dict[str, str], machines: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    """The run ends (it never goes on with what it could not read), the worker's log names the key it
    needs and the setting, and the server goes on serving. A worker that hosts the run's workflow
    fails the workflow (the run ends failed, saying why); one that only runs its step fails the
    step, which says why."""
    server_env = {**env, "MCP_COLLAB_TEMPORAL_PAYLOAD_KEYS": KEY_1}
    needed = payload_key_id(bytes.fromhex(KEY_1))
    orchestrator = await server(server_env)
    async with orchestrator, orchestrator.running():
        for name, keys, lacks in (("other", KEY_2, payload_key_id(bytes.fromhex(KEY_2))), ("none", "", "none")):
            worker = machines(env, name, tmp_path / name, MCP_COLLAB_TEMPORAL_PAYLOAD_KEYS=keys)
            run = await orchestrator.start(DispatchRequest(task="x", working_directory=str(tmp_path / name)))
            ended = await orchestrator.wait(run.id, 60)
            assert ended.status == "failed" and f"a payload is encrypted with key {needed}" in (ended.error or "")
            history = (
                await (await Client.connect(env["MCP_COLLAB_TEMPORAL_ADDRESS"]))
                .get_workflow_handle(run.id)
                .fetch_history()
            )
            failure = history.events[-1].workflow_execution_failed_event_attributes.failure.message
            assert f"a payload is encrypted with key {needed}" in failure, "temporal workflow show says why"
            line = await said(worker, f"a payload is encrypted with key {needed}, and this process has")
            assert lacks in line and "MCP_COLLAB_TEMPORAL_PAYLOAD_KEYS on the server and every worker" in line
            assert KEY_1 not in "".join(worker.lines) and KEY_2 not in "".join(worker.lines)
            worker.stop()
        assert {r.id for r in (await orchestrator.list_runs()).runs} >= {run.id}, "the server still answers"

        machines(server_env, "host", tmp_path / "host")  # now the only one on the runs' workflow queue
        machines({**env, "MCP_COLLAB_TEMPORAL_QUEUE": "no-runs-here"}, "steps", tmp_path / "steps",
                 MCP_COLLAB_TEMPORAL_PAYLOAD_KEYS=KEY_2)  # fmt: skip
        run = await orchestrator.dispatch(DispatchRequest(task="x", working_directory=str(tmp_path / "steps")))
    [step] = run.steps
    assert run.status == "failed" and step.status == "failed", run
    assert f"Failed decoding arguments: a payload is encrypted with key {needed}" in (step.error or ""), step.error


def test_the_codec_opens_what_an_older_key_sealed_and_refuses_altered_payloads(
    caplog: pytest.LogCaptureFixture,
) -> None:
    old, new = bytes.fromhex(KEY_1), bytes.fromhex(KEY_2)
    plain = Payload(metadata={"encoding": b"json/plain"}, data=b'"hello"')

    async def check() -> None:
        [sealed] = await EncryptionCodec([old]).encode([plain])
        rotated = EncryptionCodec([new, old])  # the new key encrypts, the old one still decrypts
        assert await rotated.decode([sealed]) == [plain]
        [resealed] = await rotated.encode([plain])
        assert resealed.metadata["encryption-key-id"] == payload_key_id(new).encode()
        assert await EncryptionCodec([]).decode([plain]) == [plain], "an unencrypted payload passes as it is"
        assert not caplog.records, "unremarked where no key is set"
        assert await rotated.decode([plain, plain]) == [plain, plain]
        [warning] = caplog.records  # said once
        assert "unencrypted although MCP_COLLAB_TEMPORAL_PAYLOAD_KEYS is set here" in warning.getMessage()
        altered = Payload()
        altered.CopyFrom(sealed)
        altered.data = sealed.data[:-1] + bytes([sealed.data[-1] ^ 1])
        with pytest.raises(Exception, match="does not decrypt: it was altered or damaged"):
            await rotated.decode([altered])

    anyio.run(check)


async def test_mtls_with_a_private_ca_runs_through_a_proxy_that_requires_client_certificates(
    env: dict[str, str], machines: Callable[..., WorkerProcess], temporal: TemporalDev, tmp_path: Path
) -> None:
    ca = CertAuthority(tmp_path / "pki", "ours")
    proxy_pair, ours = ca.issue("proxy", server=True), ca.issue("worker", server=False)
    theirs = CertAuthority(tmp_path / "pki-other", "theirs").issue("intruder", server=False)
    with TLSProxy(temporal.address, ca, proxy_pair) as proxy:
        tls = {
            **env,
            "MCP_COLLAB_TEMPORAL_ADDRESS": proxy.address,
            "MCP_COLLAB_TEMPORAL_TLS_CERT": str(ours.cert),
            "MCP_COLLAB_TEMPORAL_TLS_KEY": str(ours.key),
            "MCP_COLLAB_TEMPORAL_TLS_CA": str(ca.cert),
            "MCP_COLLAB_TEMPORAL_TLS_SERVER_NAME": SERVER_NAME,
        }
        machines(tls, "alpha", tmp_path / "alpha", CODEX_FAKE_SAY="done over mTLS")
        orchestrator = await server(tls)
        async with orchestrator, orchestrator.running():
            run = await orchestrator.dispatch(DispatchRequest(task="x", working_directory=str(tmp_path / "alpha")))
        assert run.status == "completed" and run.result == "done over mTLS", run.error
        checks = engine_checks(await readiness.check(Settings.from_env(tls)))
        probed, payloads = checks["engine:temporal"], checks["engine:payloads"]
        assert probed.ok and "TLS and a client certificate and a private CA" in probed.detail, probed
        assert not payloads.ok and not payloads.required and "not encrypted" in payloads.detail
        assert "MCP_COLLAB_TEMPORAL_PAYLOAD_KEYS" in (payloads.hint or "")

        without = {
            k: v for k, v in tls.items() if k not in ("MCP_COLLAB_TEMPORAL_TLS_CERT", "MCP_COLLAB_TEMPORAL_TLS_KEY")
        }
        stranger = {
            **tls,
            "MCP_COLLAB_TEMPORAL_TLS_CERT": str(theirs.cert),
            "MCP_COLLAB_TEMPORAL_TLS_KEY": str(theirs.key),
        }
        for refused, why in (
            (without, "it asks for a client certificate"),
            (stranger, "it refused this client's certificate"),
        ):
            orchestrator = await server(refused)
            async with orchestrator, orchestrator.running():
                with pytest.raises(temporal_client.TemporalUnavailable) as caught:
                    await orchestrator.start(DispatchRequest(task="x", working_directory=str(tmp_path / "alpha")))
                assert why in str(caught.value) and "check MCP_COLLAB_TEMPORAL_TLS_CERT" in str(caught.value)
                assert (await orchestrator.list_runs()).runs, "the server still answers from its store"
            probed = engine_checks(await readiness.check(Settings.from_env(refused)))["engine:temporal"]
            assert not probed.ok and why in probed.detail and "MCP_COLLAB_TEMPORAL_TLS_CERT" in (probed.hint or "")
        worker = machines(stranger, "beta", tmp_path / "beta", start=False)
        with contextlib.suppress(RuntimeError):  # "exited at start", when it is seen gone by then
            worker.start()
        assert worker.process is not None and worker.process.wait(timeout=60) != 0, "it stops at once"
        await said(worker, "it refused this client's certificate; check MCP_COLLAB_TEMPORAL_TLS_CERT")
        assert not any("PRIVATE KEY" in line for line in worker.lines), "no key material in the log"
