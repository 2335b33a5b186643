"""Run ownership by lease: a server holds a lease in the run store while it runs; a run whose owner's
lease lapsed is recovered by whichever server notices, exactly once; the owner that lost it never
writes it again.

Over both stores where one process can show it; across processes on PostgreSQL, the store several
hosts share: a server stopped with SIGSTOP until its lease lapses, recovered by another process,
then resumed.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client

from mcp_collab.config import Settings
from mcp_collab.errors import StoreError
from mcp_collab.models import DispatchRequest, Lease, Run, RunOwner, WorkerSpec
from mcp_collab.orchestrator import WorkerOrchestrator
from mcp_collab.runtimes.base import RuntimeResult, StepRequest
from mcp_collab.store import RunStore, open_store
from mcp_collab.testing import Reply, ScriptedRuntime
from tests.conftest import alive, fake_cli, read_pids
from tests.support.mcp_helpers import call, free_port, until_listening
from tests.test_store import a_run

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]

# A lease this short is renewed every third of a second: a lapse is seen within a second or two.
SHORT_TTL_S = "1"
# The server that is stopped renews every second: its lease never lapses by accident on a busy
# machine before the test stops it, and lapses within 3 s after.
SUBPROCESS_TTL_S = "3"
# The longest any of these tests waits for something it expects: a hang, not a timing.
WITHIN_S = 30.0
# Orphans two servers race to recover.
ORPHANS = 20
ELSEWHERE = "another-host.invalid"


@pytest.fixture(params=["json", "postgres"])
def store_env(request: pytest.FixtureRequest, base_env: dict[str, str]) -> dict[str, str]:
    """A server environment over the JSON store or a fresh PostgreSQL database, leases of 1 s."""
    env = {**base_env, "MCP_COLLAB_LEASE_TTL_S": SHORT_TTL_S}
    if request.param == "postgres":
        env["MCP_COLLAB_STORE_URL"] = request.getfixturevalue("postgres_url")
    return env


@pytest.fixture
def stores() -> Iterator[Callable[[dict[str, str]], RunStore]]:
    """Store objects over an environment's history (as another process would open it), closed after."""
    opened: list[RunStore] = []

    def make(env: dict[str, str]) -> RunStore:
        store = open_store(Settings.from_env(env))
        opened.append(store)
        return store

    yield make
    for store in opened:
        close = getattr(store, "close", None)
        if close is not None:
            close()


class Held(ScriptedRuntime):
    """Its first step works until it is stopped, and says so; later steps answer at once."""

    def __init__(self) -> None:
        super().__init__("cli", respond=lambda request: Reply("done"))
        self.started = anyio.Event()
        self.stopped = anyio.Event()

    async def run(self, request: StepRequest) -> RuntimeResult:
        if self.started.is_set():
            return await super().run(request)
        self.started.set()
        try:
            await anyio.sleep_forever()
        finally:
            self.stopped.set()
        raise AssertionError("unreachable")


class CutOff:
    """A server's store while its lease renewals cannot get through (a network partition or a
    stalled connection): they fail as a database out of reach fails them. Everything else passes."""

    def __init__(self, store: RunStore) -> None:
        self.store = store
        self.cut = False

    def renew_lease(self, lease: Lease, ttl_s: float) -> Lease:
        if self.cut:
            raise StoreError("cannot write the run store: connection timed out (cut off by the test)")
        return self.store.renew_lease(lease, ttl_s)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


def orphan(i: int, owner: RunOwner | None) -> Run:
    run = a_run(i, status="running")
    run.created_at = datetime.now(UTC)  # within retention
    run.steps[0].status = "running"
    run.owner = owner
    return run


async def test_a_server_holds_a_lease_its_runs_name_and_drops_it_at_exit(
    store_env: dict[str, str], stores: Callable[[dict[str, str]], RunStore]
) -> None:
    store = stores(store_env)
    assert store.live_leases() == []
    cli = ScriptedRuntime("cli", respond=lambda request: Reply("done"))
    async with WorkerOrchestrator(Settings.from_env(store_env), runtimes={"cli": cli}) as orch, orch.running():
        [held] = store.live_leases("server")
        assert (held.host, held.pid, held.roots, held.queue) == (socket.gethostname(), os.getpid(), [], None)
        await orch.register_worker(WorkerSpec(name="w", model="codex_cli"))
        run = await orch.dispatch(DispatchRequest(task="t"))
        assert run.owner is not None and run.owner.lease == held.id
        with anyio.fail_after(WITHIN_S):  # renewed in the background, well before it lapses
            while (renewed := store.live_leases("server"))[0].expires_at == held.expires_at:
                await anyio.sleep(0.05)
        assert [lease.id for lease in renewed] == [held.id]
    assert store.live_leases() == [], "dropped at a clean exit"
    assert not store.lease_alive(held.id)


async def test_a_run_whose_owners_lease_lapsed_is_recovered_by_the_server_that_waits_on_it(
    store_env: dict[str, str], stores: Callable[[dict[str, str]], RunStore]
) -> None:
    settings = Settings.from_env(store_env)
    owner_store = CutOff(stores(store_env))
    held = Held()
    async with (
        WorkerOrchestrator(settings, store=owner_store, runtimes={"cli": held}) as owner,  # type: ignore[arg-type]
        owner.running(),
        WorkerOrchestrator(settings, store=stores(store_env), runtimes={}) as other,
        other.running(),
    ):
        await owner.register_worker(WorkerSpec(name="w", model="codex_cli"))
        run = await owner.start(DispatchRequest(task="work until stopped"))
        with anyio.fail_after(WITHIN_S):
            await held.started.wait()
        assert run.owner is not None and run.owner.lease is not None
        first_lease = run.owner.lease
        assert stores(store_env).lease_alive(first_lease)

        owner_store.cut = True  # its renewals fail from now on: its lease lapses within a second
        with anyio.fail_after(WITHIN_S):
            seen = await other.wait(run.id, WITHIN_S)
        assert seen.status == "interrupted" and seen.steps[0].status == "interrupted"
        assert "its lease lapsed" in (seen.error or "") and f"recovered by pid {os.getpid()}" in (seen.error or "")
        assert seen.owner is not None and seen.owner.lease not in (None, first_lease)
        assert not held.stopped.is_set(), "the owner, cut off, has not noticed yet"

        owner_store.cut = False  # its next renewal finds the lease lapsed: it stops the run it lost
        with anyio.fail_after(WITHIN_S):
            told = await owner.wait(run.id, WITHIN_S)
            await held.stopped.wait()
        assert told == seen, "the owner tells what the store holds, not its own end of the run"
        assert stores(store_env).get_run(run.id) == seen, "the recovered state was not overwritten"

        again = await owner.dispatch(DispatchRequest(task="after the lapse"))
        assert again.status == "completed" and again.owner is not None
        assert again.owner.lease not in (None, first_lease) and stores(store_env).lease_alive(again.owner.lease)
        assert not stores(store_env).lease_alive(first_lease), "a lapsed lease is never taken back"


async def test_two_servers_recovering_the_same_orphans_at_once_recover_each_exactly_once(
    store_env: dict[str, str], stores: Callable[[dict[str, str]], RunStore]
) -> None:
    store = stores(store_env)
    lapsed = store.renew_lease(Lease(kind="server", host=ELSEWHERE, pid=1234), 0)  # lapses as it is granted
    owner = RunOwner(host=ELSEWHERE, pid=1234, lease=lapsed.id)
    store.save_runs([orphan(i, owner) for i in range(ORPHANS)])
    settings = Settings.from_env(store_env)
    recovered: dict[str, list[str]] = {}
    async with (
        WorkerOrchestrator(settings, store=stores(store_env), runtimes={}) as first,
        WorkerOrchestrator(settings, store=stores(store_env), runtimes={}) as second,
    ):

        async def recover(name: str, orch: WorkerOrchestrator) -> None:
            recovered[name] = [run.id for run in await orch.recover()]

        async with anyio.create_task_group() as tg:
            tg.start_soon(recover, "first", first)
            tg.start_soon(recover, "second", second)
    ids = [f"run-{i:05d}" for i in range(ORPHANS)]
    assert sorted(recovered["first"] + recovered["second"]) == ids, "every orphan recovered, none twice"
    for run_id in ids:
        run = store.get_run(run_id)
        assert run is not None and run.status == "interrupted" and run.owner is not None
        assert run.owner.lease is None and run.owner.pid == os.getpid()  # recovered outside running(): no lease


async def test_whose_runs_are_orphans_live_and_old_owners_alike(
    store_env: dict[str, str], stores: Callable[[dict[str, str]], RunStore]
) -> None:
    store = stores(store_env)
    live = store.renew_lease(Lease(kind="server", host=ELSEWHERE, pid=1), 600)
    lapsed = store.renew_lease(Lease(kind="server", host=ELSEWHERE, pid=2), 0)
    dead_here = subprocess.Popen([sys.executable, "-c", ""])
    dead_here.wait()
    store.save_runs(
        [
            orphan(1, RunOwner(host=ELSEWHERE, pid=1, lease=live.id)),  # alive: its lease is
            orphan(2, RunOwner(host=ELSEWHERE, pid=2, lease=lapsed.id)),  # gone: its lease lapsed
            orphan(3, RunOwner(host=ELSEWHERE, pid=3)),  # before leases, elsewhere: not ours to judge
            orphan(4, RunOwner(host=socket.gethostname(), pid=dead_here.pid)),  # before leases, dead here
            orphan(5, RunOwner(host=socket.gethostname(), pid=os.getpid(), lease=live.id)),  # this host, alive
            orphan(6, None),
        ]
    )
    async with WorkerOrchestrator(Settings.from_env(store_env), runtimes={}) as orch, orch.running():
        status = {i: (await orch.get_run(f"run-{i:05d}")).status for i in range(1, 7)}
        two = await orch.get_run("run-00002")
    assert status == {
        1: "running",
        2: "interrupted",
        3: "running",
        4: "interrupted",
        5: "running",
        6: "interrupted",
    }
    assert "pid 2 on another-host.invalid" in (two.error or "") and "its lease lapsed" in (two.error or "")


async def test_a_server_stopped_until_its_lease_lapsed_finds_its_run_recovered_by_another_process_and_leaves_it(
    base_env: dict[str, str], postgres_url: str, pidfile: Path, tmp_path: Path
) -> None:
    env = {
        **base_env,
        "MCP_COLLAB_CODEX_BIN": fake_cli("hang"),
        "CODEX_FAKE_PIDFILE": str(pidfile),
        "MCP_COLLAB_STORE_URL": postgres_url,
        "MCP_COLLAB_LEASE_TTL_S": SUBPROCESS_TTL_S,
    }
    store = open_store(Settings.from_env(env))
    port = free_port()
    log_path = tmp_path / "server.log"
    log = log_path.open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "mcp_collab", "serve", "--transport", "http", "--port", str(port)],
        env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/mcp"
    try:
        await until_listening(port, server, log_path)
        async with Client(url) as client:
            await call(client, "spawn_worker", name="codex-writer", model="codex_cli")
            run = await call(client, "dispatch_task", task="never ends", waitSeconds=0.2)
        with anyio.fail_after(WITHIN_S):  # its CLI's tree is up and recorded in the store
            while (stored := store.get_run(run["id"])) is None or stored.steps[0].process is None:
                await anyio.sleep(0.05)
        first_lease = run["owner"]["lease"]
        assert store.lease_alive(first_lease)
        tree = read_pids(pidfile)

        os.kill(server.pid, signal.SIGSTOP)
        try:
            async with WorkerOrchestrator(Settings.from_env(env), runtimes={}) as other, other.running():
                with anyio.fail_after(WITHIN_S):
                    recovered = await other.wait(run["id"], WITHIN_S)
            assert recovered.status == "interrupted" and f"recovered by pid {os.getpid()}" in (recovered.error or "")
            assert not store.lease_alive(first_lease)
            with anyio.fail_after(WITHIN_S):  # the stopped server's step was killed by whoever recovered it
                while [p for p in tree if alive(p)]:
                    await anyio.sleep(0.05)
        finally:
            os.kill(server.pid, signal.SIGCONT)

        async with Client(url) as client:
            told = await call(client, "wait_worker_run", runId=run["id"], timeoutSeconds=WITHIN_S)
            assert told["status"] == "interrupted" and f"recovered by pid {os.getpid()}" in told["error"]
            assert store.get_run(run["id"]) == recovered, "the resumed server did not write the run again"
            fresh = await call(client, "dispatch_task", task="after the lapse", waitSeconds=0)
            assert fresh["owner"]["lease"] != first_lease and store.lease_alive(fresh["owner"]["lease"])
            await call(client, "cancel_worker_run", runId=fresh["id"])
        assert "lapsed before it was renewed" in log_path.read_text(encoding="utf-8", errors="replace")
    finally:
        server.terminate()
        server.wait(timeout=10)
        log.close()
        close = getattr(store, "close", None)
        if close is not None:
            close()
    assert [p for p in read_pids(pidfile) if alive(p)] == []
