"""Who may talk to Temporal: TLS with a client certificate and a private CA (through a
TLS-terminating proxy in front of the dev server, which speaks plain gRPC only)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest

from mcp_collab import readiness
from mcp_collab.config import Settings
from mcp_collab.engine.temporal import client as temporal_client
from mcp_collab.models import DispatchRequest
from tests.conftest import quick_vendor_clis
from tests.support.temporal import TemporalDev, WorkerProcess
from tests.support.tls import SERVER_NAME, CertAuthority, TLSProxy
from tests.test_temporal_engine import engine_checks, server

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def temporal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TemporalDev]:
    dev = TemporalDev(tmp_path_factory.mktemp("temporal")).start()
    try:
        yield dev
    finally:
        dev.stop()


@pytest.fixture
def env(base_env: dict[str, str], temporal: TemporalDev, tmp_path: Path) -> dict[str, str]:
    return {
        **base_env,
        **quick_vendor_clis(),
        "MCP_COLLAB_ENGINE": "temporal",
        "MCP_COLLAB_TEMPORAL_ADDRESS": temporal.address,
        "MCP_COLLAB_TEMPORAL_QUEUE": f"runs-{tmp_path.name}",
    }


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


async def said(worker: WorkerProcess, text: str) -> str:
    """The worker's log line that holds ``text``, once it has logged it."""
    with anyio.fail_after(60):
        while not (found := [line for line in worker.lines if text in line]):
            await anyio.sleep(0.1)
    return found[0]


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
        probed = engine_checks(await readiness.check(Settings.from_env(tls)))["engine:temporal"]
        assert probed.ok and "TLS and a client certificate and a private CA" in probed.detail, probed

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
