"""``mcp-collab worker``: runs steps for runs on Temporal, on a machine that has the CLIs, the
repositories and the credentials.

A worker serves two task queues: the runs' workflow queue (every worker may host any run's
workflow; it is light) and its own step queue, named by ``--queue``, where the steps, spaces and
diffs of runs whose directory lies in its workspace roots are sent. Workers that serve one queue
must have the same roots (two machines with the same checkout may share a queue). A worker
announces its queue and roots in the store (a lease it renews), which is how the server routes a
dispatch to a worker that has the directory.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread

from ...config import Settings
from ...errors import CollabError, ConfigError, LeaseLostError, StoreError
from ...models import Lease
from ...runtimes.cli.supervisor import kill_orphans
from ...runtimes.registry import RUNTIMES
from ...store import RunStore, open_store
from ..executor import StepExecutor
from ..recorder import RunRecorder
from .client import connect, worker_lease
from .jobs import HEARTBEAT_EVERY_S

if TYPE_CHECKING:
    from temporalio.worker import WorkflowRunner

log = logging.getLogger("mcp_collab.worker")

# A worker's lease (the server routes only to live workers) lasts MCP_COLLAB_LEASE_TTL_S, like a
# server's, and is renewed this many times per TTL: two missed renewals in a row are survivable.
RENEWALS_PER_TTL = 3
# What a run's workflow raises that fails it at once, instead of failing its workflow task, which
# Temporal retries forever while the run shows running and nobody is told: our own errors and
# Python's (a bug; a job, result or strategy this worker cannot handle, as a server newer than its
# workers sends) fail every retry alike. Temporal's own errors are not among them, nondeterminism
# above all: a workflow that cannot replay on upgraded workers keeps being retried, so rolling the
# workers back lets its run go on.
WORKFLOW_FAILURES: tuple[type[Exception], ...] = (
    CollabError, ArithmeticError, AssertionError, AttributeError, ImportError, LookupError, NameError, RuntimeError,
    TypeError, ValueError,
)  # fmt: skip


async def serve_worker(
    settings: Settings, queue: str, slots: int, *, stop: anyio.Event | None = None, ready: anyio.Event | None = None
) -> None:
    """Serve until ``stop`` is set (or the task is cancelled)."""
    from temporalio.worker import Worker

    from .activities import Activities
    from .workflow import DeliverWorkflow, RunWorkflow

    if not queue or queue == settings.temporal.queue:
        raise ConfigError(
            f"--queue must name this worker's own step queue, not the runs' workflow queue ({settings.temporal.queue})"
        )
    store = open_store(settings)
    await anyio.to_thread.run_sync(store.check_writable)
    client = await connect(settings)
    runtimes = {mode: spec.create(settings) for mode, spec in RUNTIMES.items()}
    executor = StepExecutor(settings, runtimes, RunRecorder(store, settings.redact))
    activities = Activities(settings, store, executor)
    beat = timedelta(seconds=HEARTBEAT_EVERY_S)
    # A worker that is told to stop gives its running steps MCP_COLLAB_WORKER_STOP_GRACE_S to end
    # (then they are cancelled and their process trees killed).
    common: dict[str, Any] = {"graceful_shutdown_timeout": timedelta(seconds=settings.worker_stop_grace_s)}
    runs = Worker(
        client,
        task_queue=settings.temporal.queue,
        workflows=[RunWorkflow, DeliverWorkflow],
        activities=[activities.save_run, activities.queue_served],  # the workflows' local activities
        workflow_runner=workflow_runner(),
        workflow_failure_exception_types=WORKFLOW_FAILURES,
        **common,
    )
    steps = Worker(
        client,
        task_queue=queue,
        activities=activities.all(),
        max_concurrent_activities=slots,
        max_heartbeat_throttle_interval=beat,
        default_heartbeat_throttle_interval=beat,
        **common,
    )
    # A worker of this machine that was killed outright left its steps' CLIs running: they die now.
    left = await kill_orphans()
    if left:
        log.warning("killed the leftover step processes of %d stopped worker(s) or server(s)", left)
    held = [worker_lease(queue, settings.workspace_roots, slots)]
    try:
        # Left in reverse: the workflow worker stops first, so a run's workflow it hosted moves to
        # another worker at once, before this one's steps are ended (a workflow task taken while
        # shutting down was dropped and Temporal gave it to another worker only after its 10 s
        # timeout); then the steps get their grace.
        async with steps, runs, anyio.create_task_group() as tg:
            held[0] = await _renew(store, held[0], settings.lease_ttl_s)  # routable from now on
            lease = held[0]
            tg.start_soon(_keep_renewing, store, held, settings.lease_ttl_s)
            log.info(
                "worker %s serving step queue %s (%d slots) and runs on %s at %s, namespace %s; roots: %s",
                lease.id, queue, slots, settings.temporal.queue, settings.temporal.address,
                settings.temporal.namespace, ", ".join(map(str, settings.workspace_roots)) or "none",
            )  # fmt: skip
            if ready is not None:
                ready.set()
            await (stop.wait() if stop is not None else anyio.sleep_forever())
            tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(store.drop_lease, held[0].id)
            for runtime in runtimes.values():
                await runtime.aclose()


def workflow_runner() -> WorkflowRunner:
    """How a worker (and a replay) runs the workflows: outside Temporal's sandbox.

    The sandbox guards a workflow module's own imports, but every module of a run's workflow is the
    engine's (strategies, models, the executor's helpers) and must be passed through it as it is, so
    it guarded nothing of ours while it cost about a quarter of a worker's CPU per run (a sandbox is
    built for every workflow it starts). The workflow's determinism is kept by its own discipline
    (time from ``workflow.now()``, no I/O, asyncio only) and checked by replaying recorded histories
    (``tests/test_temporal_replay.py``)."""
    from temporalio.worker import UnsandboxedWorkflowRunner

    return UnsandboxedWorkflowRunner()


async def _renew(store: RunStore, lease: Lease, ttl_s: float) -> Lease:
    return await anyio.to_thread.run_sync(store.renew_lease, lease, ttl_s)


async def _keep_renewing(store: RunStore, held: list[Lease], ttl_s: float) -> None:
    while True:
        await anyio.sleep(ttl_s / RENEWALS_PER_TTL)
        try:
            held[0] = await _renew(store, held[0], ttl_s)
        except LeaseLostError:
            # Cut off from the store for a while: the worker owns no run, so it just announces
            # itself again (the server routes to it once more).
            log.warning("the worker's lease lapsed; taking a new one")
            held[0] = await _renew(
                store,
                held[0].model_copy(
                    update={"id": Lease(kind="worker", host="", pid=0).id, "expires_at": None, "started_at": None}
                ),
                ttl_s,
            )
        except StoreError as exc:  # a store hiccup must not stop the steps; the next renewal may land
            log.error("the worker's lease was not renewed: %s", exc)
