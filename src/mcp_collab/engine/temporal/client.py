"""The server's side of runs on Temporal: dispatch starts a workflow, wait and cancel go through
it, and the store (which the workflow keeps current) is what every reader sees.

A dispatch goes to a worker that has its directory: the live workers' leases in the store say
which queue serves which workspace roots. The directory is checked here by its path only (the
server need not have the disk); the worker opens and confines it again when each step starts.
The server owns nothing of a run once it started: it can restart, or another server can take over,
and the run goes on; a run whose workflow ended without recording its end is reconciled (found
failed, if its workflow failed, else interrupted) by whoever reads it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import secrets
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import anyio
import anyio.abc
import anyio.to_thread

from ...config import DEFAULT_MAX_CONCURRENT_RUNS, Settings
from ...errors import CollabError, InvalidRequestError, StoreError, shown
from ...models import TERMINAL_RUN_STATUSES, DispatchRequest, Lease, Run, RunOwner, RunStatus, Worker, preview
from ...store import RunStore
from ...strategies.prompts import MAX_QUOTED_OUTPUT_CHARS, quote
from .. import continuation, delivery
from ..delivery import Delivered
from ..executor import StepExecutor, step_label, stop_open_steps
from ..lifecycle import CANCEL_WAIT_S, HEARTBEAT_S, LEASE_RENEWALS_PER_TTL, RunLifecycle, where
from ..plan import Plan, ProgressCallback, make_plan
from ..recorder import RunRecorder
from .jobs import (
    DELIVER_WORKFLOW,
    STOP_SIGNAL,
    WORKFLOW_NAME,
    Beat,
    CastEntry,
    ContinueJob,
    DeliveredJob,
    DeliverJob,
    RunJob,
    StepSettings,
)

if TYPE_CHECKING:
    from temporalio.client import Client, WorkflowHandle

log = logging.getLogger("mcp_collab.engine")
T = TypeVar("T")
# How long one read of the store routes and bounds dispatches: the workers' leases (a directory no
# worker had then is looked for again in a fresh read; a worker that stopped meanwhile is found out
# by its step's pickup) and the runs open on each queue (a dispatch refused by it reads again first).
STORE_READ_EVERY_S = 1.0
# A worker of an earlier version does not announce its slots: it is taken to have what a worker
# gets when its machine cannot be read.
UNANNOUNCED_SLOTS = DEFAULT_MAX_CONCURRENT_RUNS

# How often a wait that reports progress re-reads the run (the workflow saves each change) and the
# steps' heartbeats.
POLL_S = 0.25
# A wait with no one to tell of progress wakes when the run's workflow closes; it re-reads the run
# this often only in case that notice is missed (200 quiet waits at POLL_S cost the server more CPU
# than the runs' own bookkeeping: bench/temporal_scale.py).
QUIET_POLL_S = 2.0
# A run is stored before its workflow starts: one younger than this with no workflow yet is being
# started (by this server or another), not lost.
START_GRACE_S = 120.0
# A burst of dispatches starts its workflows this many at a time, in dispatch order: all at once,
# the first runs' workflow tasks queue in Temporal behind the whole burst's starts, and the first
# steps reach a worker late (bench/temporal_scale.py, 200 at once: the 20th step on a worker after
# 1.5-2.0 s, 0.85 s so).
STARTS_AT_ONCE = 8
# The sweep for runs whose workflow closed without recording their end looks back this much further
# than its last pass (Temporal's list of closed workflows may lag behind their close).
SWEEP_OVERLAP = timedelta(minutes=2)
# The steps' heartbeats are read this often by a waiter with a progress listener (each read is a
# call to Temporal).
BEATS_EVERY_S = 1.0
# A read of a run open on Temporal asks whether its workflow still runs; a Temporal that has not
# answered within this long leaves the run as stored (the read must not hang on it).
RECONCILE_READ_S = 2.0
# How much of the reason a run's workflow failed goes into the run's error (Temporal keeps the rest,
# with the stack trace).
FAILURE_CHARS = 600
# doctor's look at Temporal: a frontend on a LAN answers a connect and a namespace lookup in
# milliseconds, Temporal Cloud within a second or two; slower than this counts as not answering.
PROBE_TIMEOUT_S = 5.0


class TemporalUnavailable(CollabError):
    """The Temporal service could not be reached or refused a call; the message names the address,
    ``hint`` (when the cause is known) what to do."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


def _load_sdk() -> None:
    import temporalio.client
    import temporalio.contrib.pydantic  # noqa: F401

    from . import codec  # noqa: F401  (and cryptography)


async def connect(settings: Settings) -> Client:
    # Importing temporalio takes a few hundred milliseconds: off the event loop, which goes on answering.
    await anyio.to_thread.run_sync(_load_sdk)
    from temporalio.client import Client

    from .codec import data_converter

    where = settings.temporal
    try:
        return await Client.connect(
            where.address,
            namespace=where.namespace,
            data_converter=data_converter(where.payload_keys),
            tls=tls_config(settings),
            api_key=where.api_key,
        )
    except RuntimeError as exc:  # the bridge's connection errors
        cause, hint = _connect_cause(exc, settings)
        raise TemporalUnavailable(f"cannot reach Temporal at {shown_temporal(settings)}: {cause}; {hint}") from exc


def tls_config(settings: Settings) -> Any:
    """``Client.connect``'s ``tls``: on or off, or with the files of MCP_COLLAB_TEMPORAL_TLS_*."""
    where, files = settings.temporal, settings.temporal.tls_files
    if files is None:
        return where.tls
    from temporalio.service import TLSConfig

    return TLSConfig(
        server_root_ca_cert=files.server_ca,
        domain=files.server_name,
        client_cert=files.client_cert,
        client_private_key=files.client_key,
    )


def shown_temporal(settings: Settings) -> str:
    """Where Temporal is, as a report may say it (never the API key)."""
    where = settings.temporal
    files = where.tls_files
    how = [
        w
        for w, on in (
            ("TLS", where.tls),
            ("a client certificate", files is not None and files.client_cert is not None),
            ("a private CA", files is not None and files.server_ca is not None),
            ("an API key", where.api_key is not None),
        )
        if on
    ]
    return f"{where.address}, namespace {where.namespace}" + (f" ({' and '.join(how)})" if how else "")


START_TEMPORAL = (
    "start Temporal (a trial: temporal server start-dev) or set MCP_COLLAB_TEMPORAL_ADDRESS and "
    "MCP_COLLAB_TEMPORAL_NAMESPACE; Temporal Cloud also needs MCP_COLLAB_TEMPORAL_API_KEY (TLS follows it)"
)


async def probe(settings: Settings) -> str:
    """Whether Temporal answers at the configured address, serves the namespace and can serve the
    runs' task queue (which takes its matching service too), changing nothing (for doctor);
    TemporalUnavailable saying what is wrong and what to do, within PROBE_TIMEOUT_S."""
    from temporalio.api.enums.v1 import TaskQueueKind, TaskQueueType
    from temporalio.api.taskqueue.v1 import TaskQueue
    from temporalio.api.workflowservice.v1 import (
        DescribeNamespaceRequest,
        DescribeTaskQueueRequest,
        GetSystemInfoRequest,
    )
    from temporalio.client import Client
    from temporalio.service import RPCError, RPCStatusCode

    where, shown = settings.temporal, shown_temporal(settings)
    limit = timedelta(seconds=PROBE_TIMEOUT_S)
    step = "connect"
    try:
        with anyio.fail_after(PROBE_TIMEOUT_S):
            client = await Client.connect(
                where.address,
                namespace=where.namespace,
                tls=tls_config(settings),
                api_key=where.api_key,
                connect_timeout=limit,
            )
            service = client.workflow_service
            info = await service.get_system_info(GetSystemInfoRequest(), timeout=limit)
            await service.describe_namespace(DescribeNamespaceRequest(namespace=where.namespace), timeout=limit)
            step = "queue"
            queue = await service.describe_task_queue(
                DescribeTaskQueueRequest(
                    namespace=where.namespace,
                    task_queue=TaskQueue(name=where.queue, kind=TaskQueueKind.TASK_QUEUE_KIND_NORMAL),
                    task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
                ),
                timeout=limit,
            )
    except TimeoutError:
        raise TemporalUnavailable(
            f"no answer within {PROBE_TIMEOUT_S:g}s from Temporal at {shown}", START_TEMPORAL
        ) from None
    except RPCError as exc:
        said = exc.message or exc.status.name
        if exc.status == RPCStatusCode.NOT_FOUND and step == "connect":
            raise TemporalUnavailable(
                f"Temporal at {where.address} has no namespace {where.namespace}",
                f"create it (a dev server: temporal operator namespace create --namespace {where.namespace}) "
                "or set MCP_COLLAB_TEMPORAL_NAMESPACE",
            ) from None
        if exc.status in (RPCStatusCode.UNAUTHENTICATED, RPCStatusCode.PERMISSION_DENIED):
            raise TemporalUnavailable(
                f"Temporal at {shown} refused: {said}",
                f"check MCP_COLLAB_TEMPORAL_API_KEY, and that it may use the namespace {where.namespace}",
            ) from None
        if step == "queue":
            raise TemporalUnavailable(
                f"Temporal at {shown} answers, but cannot serve the runs' queue {where.queue}: {said}",
                "read the Temporal server's log: its own services do not reach each other (temporal server "
                "start-dev bound with --ip to an address other than 127.0.0.1 or 0.0.0.0 does this)",
            ) from None
        raise TemporalUnavailable(f"Temporal at {shown} refused: {said}", START_TEMPORAL) from None
    except RuntimeError as exc:  # the bridge's connection errors
        cause, hint = _connect_cause(exc, settings)
        raise TemporalUnavailable(f"cannot reach Temporal at {shown}: {cause}", hint) from None
    version = info.server_version or "(version not given)"
    polling = len(queue.pollers)
    return (
        f"Temporal {version} at {shown}: the namespace answers; the runs' queue {where.queue} has "
        f"{polling} poller{'' if polling == 1 else 's'} (workers seen lately)"
    )


def _connect_cause(exc: RuntimeError, settings: Settings) -> tuple[str, str]:
    """What a failed connect means, from the bridge's nested error text, and what to do: for TLS's
    failures, the setting to check; else the OS's words (``message: "Connection refused"``) or the
    text's first line, and how to start Temporal or point at it."""
    text, where = str(exc), settings.temporal
    client_cert = where.tls_files is not None and where.tls_files.client_cert is not None
    # The connection was made, then dropped by the server at the first call: a TLS server that
    # refused the client's certificate (or wants one), or a TLS server spoken to in plain text.
    dropped = re.search(r'after connection: Status \{ code: (Cancelled|Unknown, message: "transport error")', text)
    if not where.tls:
        if dropped:
            return "the server dropped the connection at the first call", (
                "if it speaks TLS, set MCP_COLLAB_TEMPORAL_TLS=1 (and MCP_COLLAB_TEMPORAL_TLS_CERT / "
                "MCP_COLLAB_TEMPORAL_TLS_KEY if it asks for a client certificate)"
            )
    elif "InvalidContentType" in text:  # rustls met a peer that answered in plain text
        return "the TLS handshake failed: the server answers without TLS", (
            "for such a server: no API key, no MCP_COLLAB_TEMPORAL_TLS_* files, and MCP_COLLAB_TEMPORAL_TLS=0"
        )
    elif "UnknownIssuer" in text:
        return "the server's certificate is signed by a CA this client does not trust", (
            "set MCP_COLLAB_TEMPORAL_TLS_CA to the PEM file of the CA that signed it"
        )
    elif "NotValidForName" in text:
        expected = re.search(r'expected: \w+\("?([^")]+)', text)
        return f"the server's certificate is not for {expected[1] if expected else 'the name dialed'}", (
            "set MCP_COLLAB_TEMPORAL_TLS_SERVER_NAME to a name its certificate carries"
        )
    elif dropped or "fatal alert" in text:
        return (
            "the server ended the connection after the TLS handshake: it refused this client's certificate"
            if client_cert
            else "the server ended the connection after the TLS handshake: it asks for a client certificate"
        ), (
            "check MCP_COLLAB_TEMPORAL_TLS_CERT and MCP_COLLAB_TEMPORAL_TLS_KEY: a certificate (and its key) "
            "signed by a CA the server trusts, allowed on this namespace"
        )
    found = re.findall(r'message: "([^"]+)"', text)
    return (found[-1] if found else text.strip().splitlines()[0][:300]), START_TEMPORAL


def worker_lease(queue: str, roots: Sequence[Path], slots: int | None = None) -> Lease:
    from ...runtimes.cli.supervisor import process_start_ticks

    return Lease(
        kind="worker",
        host=socket.gethostname(),
        pid=os.getpid(),
        start_ticks=process_start_ticks(os.getpid()),
        queue=queue,
        roots=[str(r) for r in roots],
        slots=slots,
    )


def within(path: str, roots: Sequence[Path]) -> Path:
    """``path`` checked by its text alone (the steps run on other machines): absolute, no ``..``,
    inside one of ``roots``. Each worker opens and confines it again when a step starts."""
    candidate = Path(path)
    if not candidate.is_absolute() or ".." in candidate.parts:
        raise InvalidRequestError(
            f"workingDirectory {shown(path)} must be an absolute path without '..' on the workers' machines"
        )
    normal = Path(os.path.normpath(candidate))
    if not any(normal == root or normal.is_relative_to(root) for root in roots):
        served = ", ".join(map(str, roots)) or "none (no worker is serving)"
        raise InvalidRequestError(
            f"no live mcp-collab worker has {shown(path)} in its workspace roots; the workers serve: {served}"
        )
    return normal


def route(directories: Sequence[Path], leases: Sequence[Lease]) -> str:
    """The step queue of the workers that have every directory of a run (the deepest root wins)."""
    if not leases:
        raise InvalidRequestError(
            "no mcp-collab worker is serving: start one on a machine with the CLIs and the repositories "
            "(`mcp-collab worker --queue NAME --root DIR`)"
        )
    queues: list[str] = []
    for directory in directories:
        best: tuple[int, str] | None = None
        for lease in leases:
            for root in map(Path, lease.roots):
                if (directory == root or directory.is_relative_to(root)) and lease.queue:
                    depth = len(root.parts)
                    if best is None or depth > best[0]:
                        best = (depth, lease.queue)
        if best is None:
            raise InvalidRequestError(f"no live mcp-collab worker has {directory} in its workspace roots")
        queues.append(best[1])
    if len(set(queues)) > 1:
        pairs = ", ".join(f"{d} on {q}" for d, q in zip(directories, queues, strict=True))
        raise InvalidRequestError(
            f"a run's steps must all run where one worker queue has their directories, but they are spread: {pairs}"
        )
    if queues:
        return queues[0]
    return sorted(leases, key=lambda lease: lease.started_at or datetime.min.replace(tzinfo=UTC))[0].queue or ""


class _Reading(Generic[T]):
    """What ``read`` returns, read again at most once per ``every_s``, or for a caller that needs a
    read begun at or after its ``since``: a burst of dispatches shares one read of the store."""

    def __init__(self, read: Callable[[], Awaitable[T]], every_s: float) -> None:
        self._read, self._every_s = read, every_s
        self._lock = anyio.Lock()
        self._last: tuple[float, T] | None = None  # (when the read began, what it returned)

    async def get(self, since: float | None = None) -> T:
        async with self._lock:
            oldest = time.monotonic() - self._every_s if since is None else since
            if self._last is None or self._last[0] < oldest:
                began = time.monotonic()
                self._last = (began, await self._read())
            return self._last[1]


class TemporalRuns(RunLifecycle):
    """``RunLifecycle`` for runs executed as Temporal workflows by ``mcp-collab worker`` processes."""

    def __init__(
        self,
        settings: Settings,
        store: RunStore,
        recorder: RunRecorder,
        executor: StepExecutor,
        workers: Callable[[], Awaitable[list[Worker]]],
    ) -> None:
        super().__init__(settings, store, recorder, executor, workers)
        self._client: Client | None = None
        self._connecting = anyio.Lock()
        self._leases = _Reading(lambda: anyio.to_thread.run_sync(self.store.live_leases, "worker"), STORE_READ_EVERY_S)
        self._open = _Reading(self._read_open, STORE_READ_EVERY_S)
        # By queue: the runs this server stored (ever), and those it admitted that are not stored yet.
        self._stored: Counter[str] = Counter()
        self._placing: Counter[str] = Counter()
        self._starts = anyio.CapacityLimiter(STARTS_AT_ONCE)

    async def client(self) -> Client:
        async with self._connecting:
            if self._client is None:
                self._client = await connect(self.settings)
            return self._client

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        await anyio.to_thread.run_sync(self.store.check_writable)
        async with anyio.create_task_group() as tg:
            self._tg = tg
            self._starting = anyio.Event()
            tg.start_soon(self._start_up, self._starting)
            tg.start_soon(self._connect_early)
            tg.start_soon(self._sweep_closed)
            try:
                yield
            finally:
                self._tg = None
                tg.cancel_scope.cancel()

    async def _connect_early(self) -> None:
        """Connect while nothing waits for it, so the first dispatch does not pay for it (a failure
        is said by the first call that needs Temporal, which tries again)."""
        try:
            await self.client()
        except Exception as exc:  # said again, with its hint, by the first call that needs Temporal
            log.warning("Temporal is not reachable yet: %s", exc)

    # -- starting ------------------------------------------------------------------------------

    async def dispatch(self, request: DispatchRequest, *, on_progress: ProgressCallback | None = None) -> Run:
        run = await self.start(request)
        return await self.wait(run.id, None, on_progress=on_progress)

    async def start(
        self, request: DispatchRequest, *, on_progress: ProgressCallback | None = None, durable: bool = True
    ) -> Run:
        # The run is stored durably before its workflow starts (``_launch``); progress comes through
        # wait, from the steps' heartbeats.
        del on_progress, durable
        arrived = time.monotonic()
        registered = await self._workers()
        try:
            plan, queue = self._routed(request, registered, await self._leases.get())
        except InvalidRequestError:  # no worker had the directory a moment ago: maybe one has now
            plan, queue = self._routed(request, registered, await self._leases.get(since=arrived))
        cast = [CastEntry(role=role.name, worker=worker, access=role.access) for role, worker in plan.cast]
        return await self._launch(plan, queue, cast=cast, cwd=str(plan.cwd) if plan.cwd is not None else None)

    def _routed(self, request: DispatchRequest, registered: list[Worker], leases: list[Lease]) -> tuple[Plan, str]:
        """The run's plan, and the step queue of the workers that have its directory."""
        roots = tuple(sorted({Path(r) for lease in leases for r in lease.roots}))
        plan = make_plan(self.settings, request, registered, roots=roots, confiner=within, default_cwd=False)
        directories = [plan.cwd] if plan.cwd is not None else []
        directories += [Path(w.working_directory) for _, w in plan.cast if plan.cwd is None and w.working_directory]
        return plan, route(directories, leases)

    async def _launch(
        self,
        plan: Plan,
        queue: str,
        *,
        cast: list[CastEntry],
        cwd: str | None,
        follow_up: ContinueJob | None = None,
    ) -> Run:
        """Store the run, then start its workflow; a run whose workflow could not start ends failed.
        Refused first, with nothing stored, when too many runs wait on ``queue`` (``_make_room``)."""
        run = plan.run
        run.owner = RunOwner(host=socket.gethostname(), pid=os.getpid(), engine="temporal", queue=queue)
        await self._make_room(queue)
        try:
            await self._record_admission(run)
        finally:
            self._placing[queue] -= 1
        self._stored[queue] += 1  # from its place to the count, with nothing awaited in between
        job = RunJob(
            run=run,
            queue=queue,
            task=plan.task,
            cast=cast,
            modes=plan.modes,
            policies=plan.policies,
            cwd=cwd,
            max_rounds=plan.max_rounds,
            run_timeout_s=self.settings.run_timeout_s,
            step_timeout_s=self.settings.step_timeout_s,
            writer_access=self.settings.writer_access,
            continuation=follow_up,
            pickup_s=self.settings.lease_ttl_s,
            heartbeat_timeout_s=self.settings.temporal.heartbeat_timeout_s,
            step_settings=StepSettings.of(self.settings),
            worktrees=self.settings.worktrees,
        )
        try:
            client = await self.client()
            async with self._starts:
                await client.start_workflow(WORKFLOW_NAME, job, id=run.id, task_queue=self.settings.temporal.queue)
        except (TemporalUnavailable, RuntimeError, _rpc_error()) as exc:
            run.status, run.ended_at = "failed", datetime.now(UTC)
            run.error = f"the run could not be started on Temporal at {self.settings.temporal.address}: {exc}"
            await self.recorder.save(run)
            raise TemporalUnavailable(run.error) from exc
        return run.model_copy()

    async def _make_room(self, queue: str) -> None:
        """A place for one more run on ``queue`` (in ``_placing`` until the run is stored), refused
        while the runs open there, every server's, outnumber its live workers' slots by
        MCP_COLLAB_MAX_QUEUED_RUNS: beyond its slots, a queue's runs wait for one."""
        arrived, limit = time.monotonic(), self.settings.max_queued_runs
        opened, slots = await self._open_on(queue)
        if opened - slots >= limit:  # a refusal goes by a count begun since the dispatch arrived
            opened, slots = await self._open_on(queue, since=arrived)
        if opened - slots >= limit:
            raise InvalidRequestError(
                f"{opened - slots} runs already wait for a free slot on worker queue {queue} ({opened} runs are open "
                f"there, its live workers have {slots} slot{'' if slots == 1 else 's'}); the limit is {limit} "
                "(MCP_COLLAB_MAX_QUEUED_RUNS, counting the runs of every server on this store). Wait for some to "
                "finish or cancel them, or give that queue more slots (`mcp-collab worker --slots`, or another "
                "worker on it)"
            )
        self._placing[queue] += 1  # claimed with nothing awaited since the count: no dispatch slips past

    async def _open_on(self, queue: str, since: float | None = None) -> tuple[int, int]:
        """The runs open on ``queue`` (the store's count, with the runs this server stored since that
        count began or is storing now) and the slots of its live workers."""
        leases = await self._leases.get(since)
        counted, stored_then = await self._open.get(since)
        slots = sum(lease.slots or UNANNOUNCED_SLOTS for lease in leases if lease.queue == queue)
        return counted.get(queue, 0) + self._stored[queue] - stored_then[queue] + self._placing[queue], slots

    async def _read_open(self) -> tuple[dict[str, int], Counter[str]]:
        """The store's count of the runs open on each queue, and what this server had stored when it
        began (a run stored while it is read may be counted twice until the next read: never fewer)."""
        stored_then = self._stored.copy()
        return await anyio.to_thread.run_sync(self.store.open_runs_by_queue), stored_then

    async def _record_admission(self, run: Run) -> None:
        """The run durably in the store before its workflow starts. Runs dispatched at once share
        their fsyncs (the recorder's group commit): a burst of dispatches is not one fsync each."""
        outcome: list[StoreError | None] = []
        if await self.recorder.accept(run, outcome.append):
            with anyio.CancelScope(shield=True):  # a caller that gives up must not leave it half done
                await self.recorder.sync()
            if outcome and outcome[0] is not None:
                raise outcome[0]

    async def continue_run(
        self,
        parent_id: str,
        message: str,
        worker: str | None = None,
        *,
        on_progress: ProgressCallback | None = None,
        durable: bool = True,
    ) -> Run:
        """A follow-up on the workers that ran the parent (they hold its worktree and session);
        stored durably, progress through wait, as for ``start``."""
        del on_progress, durable
        parent = await self.get_run(parent_id)
        if not _on_temporal(parent) or parent.owner is None or parent.owner.queue is None:
            raise InvalidRequestError(
                f"run {parent.id} ran on this server's own engine, not on Temporal: its worktree and the "
                "worker's session are on the machine that ran it; continue it with MCP_COLLAB_ENGINE=local there"
            )
        plan = continuation.make_plan(self.settings, parent, message, worker, await self._workers())
        info = plan.continuation
        assert info is not None
        [(role, chosen)] = plan.cast
        step = info.step.model_copy(update={"output": quote(info.step.output, MAX_QUOTED_OUTPUT_CHARS), "diff": ""})
        # What the follow-up's workflow reads of the parent: no diff and no whole answer (its result,
        # stored whole, may weigh more than Temporal carries).
        trees = [w.model_copy(update={"diff": ""}) for w in parent.worktrees]
        lean = parent.model_copy(update={"steps": [step], "worktrees": trees, "result": None})
        return await self._launch(
            plan,
            parent.owner.queue,
            cast=[CastEntry(role=role.name, worker=chosen, access=role.access)],
            cwd=step.directory,
            follow_up=ContinueJob(parent=lean, step=step, message=message, worktree=info.worktree),
        )

    async def deliver(self, run: Run, action: str, label: str | None = None) -> Delivered:
        """On the workers that hold the run's worktrees (a small workflow of one activity)."""
        if not _on_temporal(run) or run.owner is None or run.owner.queue is None:
            return await super().deliver(run, action, label)
        if action == "apply":
            delivery.pick(run, label)  # a refusal that needs no worker is said at once
        # What delivery reads is the run's worktrees, repository and choice: their diffs (a run's
        # writers' together may weigh more than Temporal carries) stay here.
        trees = [w.model_copy(update={"diff": ""}) for w in run.worktrees]
        job = DeliverJob(
            run=run.model_copy(update={"steps": [], "result": None, "worktrees": trees}),
            queue=run.owner.queue,
            action="apply" if action == "apply" else "discard",
            label=label,
        )
        client = await self.client()
        try:
            done = await client.execute_workflow(
                DELIVER_WORKFLOW,
                job,
                id=f"{run.id}-{action}-{secrets.token_hex(4)}",
                task_queue=self.settings.temporal.queue,
                result_type=DeliveredJob,
            )
        except (RuntimeError, _rpc_error(), _workflow_failure()) as exc:
            raise TemporalUnavailable(
                f"the work of run {run.id} could not be {'applied' if action == 'apply' else 'discarded'} on the "
                f"workers of queue {run.owner.queue}: {getattr(exc, 'cause', None) or exc}"
            ) from exc
        if done.refused is not None:
            raise InvalidRequestError(done.refused)
        diffs = [w.diff for w in run.worktrees]
        run.worktrees = [w.model_copy(update={"diff": d}) for w, d in zip(done.worktrees, diffs, strict=True)]
        return Delivered(run, tuple(done.branches), done.applied, tuple(done.files), done.message)

    # -- reading, waiting and cancelling -------------------------------------------------------

    async def get_run(self, run_id: str) -> Run:
        """The run as stored; one open on Temporal is first reconciled with its workflow (a call to
        Temporal, given RECONCILE_READ_S), so a run whose workflow failed or was ended reads so."""
        run = await super().get_run(run_id)
        if _on_temporal(run) and run.status not in TERMINAL_RUN_STATUSES and self._client is not None:
            with anyio.move_on_after(RECONCILE_READ_S):
                run = await self._reconcile(run, self._client.get_workflow_handle(run_id))
        return run

    async def wait(self, run_id: str, timeout_s: float | None, *, on_progress: ProgressCallback | None = None) -> Run:
        run = await self.get_run(run_id)
        if not _on_temporal(run):
            return await super().wait(run_id, timeout_s, on_progress=on_progress)
        if run.status in TERMINAL_RUN_STATUSES:
            return run
        ended = anyio.Event()
        said: dict[int, str] = {s.index: s.status for s in run.steps}
        last_beat: dict[int, str] = {}
        started = time.monotonic()
        handle = (await self.client()).get_workflow_handle(run_id)

        async def until_closed() -> None:
            with contextlib.suppress(Exception):  # any outcome: the store says how the run ended
                await handle.result()
            ended.set()

        poll = POLL_S if on_progress is not None else QUIET_POLL_S
        with anyio.move_on_after(timeout_s if timeout_s is not None else math.inf) as waiting:
            async with anyio.create_task_group() as tg:
                tg.start_soon(until_closed)
                next_heartbeat = started + HEARTBEAT_S
                next_beats = started
                while run.status not in TERMINAL_RUN_STATUSES:
                    with anyio.move_on_after(poll):
                        # Once the workflow closed (or could not be asked), only the poll paces the reads.
                        await (anyio.sleep_forever() if ended.is_set() else ended.wait())
                    run = await super().get_run(run_id)  # reconciled below, once the workflow closed
                    if ended.is_set() and run.status not in TERMINAL_RUN_STATUSES:
                        run = await self._reconcile(run, handle)
                    if on_progress is None:
                        continue
                    for step in run.steps:
                        if said.get(step.index) != step.status:
                            who = f"{step.role} {step.worker_name} via {step.runtime_mode}"
                            if step.index not in said:  # a step that ended between two reads started too
                                on_progress(f"{step_label(step)} started: {who}")
                            said[step.index] = step.status
                            if step.status != "running":
                                on_progress(f"{step_label(step)} {step.status}: {who}")
                    if time.monotonic() < next_beats:
                        continue
                    next_beats = time.monotonic() + BEATS_EVERY_S
                    for index, message in (await self._beats(handle)).items():
                        if message and last_beat.get(index) != message:
                            last_beat[index] = message
                            on_progress(message)
                    if time.monotonic() >= next_heartbeat:
                        next_heartbeat += HEARTBEAT_S
                        waited = time.monotonic() - started
                        on_progress(f"run {run.id} still {run.status}: {where(run)}, {waited:.0f}s waited")
                tg.cancel_scope.cancel()
        if waiting.cancelled_caught and run.status not in TERMINAL_RUN_STATUSES:
            run = await self.get_run(run_id)  # as it stands now, not as the last quiet read saw it
        if on_progress is not None and run.status in TERMINAL_RUN_STATUSES:
            on_progress(f"run {run.id} {run.status}" + (f": {run.error}" if run.error else ""))
        return run

    async def _beats(self, handle: WorkflowHandle[Any, Any]) -> dict[int, str]:
        """The last message of each running step's heartbeat, by the order Temporal lists them."""
        try:
            description = await handle.describe()
        except _rpc_error():
            return {}
        found: dict[int, str] = {}
        converter = (await self.client()).data_converter
        for i, pending in enumerate(description.raw_description.pending_activities):
            payloads = pending.heartbeat_details.payloads
            if payloads:
                try:
                    beats = await converter.decode(payloads, [Beat])
                except _payload_key_error():  # a worker with other keys: its step's run fails, saying why
                    continue
                if beats and isinstance(beats[-1], Beat):
                    found[i] = beats[-1].message
        return found

    async def cancel(self, run_id: str, *, reason: str = "cancelled on request") -> tuple[Run, bool]:
        run = await self.get_run(run_id)
        if run.status in TERMINAL_RUN_STATUSES:
            return run, False
        if not _on_temporal(run):
            return await super().cancel(run_id, reason=reason)
        handle = (await self.client()).get_workflow_handle(run_id)
        try:
            await handle.signal(STOP_SIGNAL, reason)
        except _rpc_error():
            return await self._reconcile(run, handle), True
        run = await self.wait(run_id, CANCEL_WAIT_S)
        return run, True

    # -- reconciling ---------------------------------------------------------------------------

    async def recover(self) -> list[Run]:
        """Runs a dead local server left (as the local engine does), and runs on Temporal whose
        workflow ended without recording the run's end."""
        began = datetime.now(UTC)
        recovered = await super().recover()
        for run in await anyio.to_thread.run_sync(self.store.unfinished_runs):
            # Runs started since recovery began (it runs beside the first requests) were not left
            # behind: their waits reconcile them if need be.
            if _on_temporal(run) and run.created_at < began:
                client = await self.client()
                fixed = await self._reconcile(run, client.get_workflow_handle(run.id))
                if fixed.status in TERMINAL_RUN_STATUSES:
                    recovered.append(fixed)
        return recovered

    async def _sweep_closed(self) -> None:
        """As often as the local engine sweeps for orphans: the runs whose workflow closed without
        recording their end (terminated, failed, timed out) since the last pass are reconciled,
        read by anyone or not, so a list shows them as they ended and they stop counting against
        MCP_COLLAB_MAX_QUEUED_RUNS. One query to Temporal a pass; those closed before this server
        started were reconciled by its recovery."""
        since, said = datetime.now(UTC), None
        while True:
            await anyio.sleep(self.settings.lease_ttl_s / LEASE_RENEWALS_PER_TTL)
            began = datetime.now(UTC)
            try:
                await self._reconcile_closed(since - SWEEP_OVERLAP)
            except (StoreError, TemporalUnavailable, _rpc_error()) as exc:
                if str(exc) != said:  # once per distinct cause, not every pass while Temporal is down
                    log.warning("the sweep for runs whose Temporal workflow closed was not completed: %s", exc)
                said = str(exc)
            else:
                since, said = began, None

    async def _reconcile_closed(self, since: datetime) -> None:
        client = await self.client()
        query = (
            f"WorkflowType = '{WORKFLOW_NAME}' AND ExecutionStatus != 'Running' AND ExecutionStatus != 'Completed' "
            f"AND CloseTime >= '{since.isoformat()}'"
        )
        async for closed in client.list_workflows(query):
            run = await anyio.to_thread.run_sync(self.store.get_run, closed.id)
            if run is not None and _on_temporal(run) and run.status not in TERMINAL_RUN_STATUSES:
                await self._reconcile(run, client.get_workflow_handle(closed.id))

    async def _reconcile(self, run: Run, handle: WorkflowHandle[Any, Any]) -> Run:
        """A run the store shows open whose workflow is closed: failed if the workflow failed, else
        (terminated, timed out, never started) interrupted, saying what Temporal says."""
        from temporalio.client import WorkflowExecutionStatus

        try:
            status = (await handle.describe()).status
        except _rpc_error() as exc:
            if "not found" not in str(exc).lower():
                return run  # Temporal unreachable: nothing can be said yet
            status = None
        if status == WorkflowExecutionStatus.RUNNING:
            return run
        if status is None and (datetime.now(UTC) - run.created_at).total_seconds() < START_GRACE_S:
            return run  # stored, its workflow about to start
        # The workflow may have saved the end meanwhile. Read from the store itself: recovery at
        # start reconciles too, and ``get_run`` waits for recovery to finish.
        latest = await anyio.to_thread.run_sync(self.store.get_run, run.id) or run
        if latest.status in TERMINAL_RUN_STATUSES:
            return latest
        how = "was never started" if status is None else f"ended as {status.name} without recording the run's end"
        ended: RunStatus = "interrupted"
        error = f"interrupted: its Temporal workflow {run.id} {how}"
        if status == WorkflowExecutionStatus.FAILED:  # it raised (see worker.WORKFLOW_FAILURES): say what
            why = preview(self.settings.redact(await _failure(handle)), FAILURE_CHARS)
            log.error("run %s: its workflow failed on Temporal: %s", run.id, why)
            ended, error = "failed", f"failed: its Temporal workflow {run.id} failed: {why}"
        now = datetime.now(UTC)
        stop_open_steps(latest, "interrupted", "its workflow stopped", now)
        latest.status, latest.ended_at, latest.error = ended, now, error
        try:
            await self.recorder.save(latest)
        except StoreError as exc:
            log.error("run %s: %s", run.id, exc)
        return latest


async def _failure(handle: WorkflowHandle[Any, Any]) -> str:
    """Why a failed workflow failed, as Temporal recorded it: each cause, outermost first."""
    try:
        await handle.result()
    except _workflow_failure() as exc:
        said: list[str] = []
        cause = exc.__cause__
        while cause is not None:
            said.append(str(cause))  # an ApplicationError says its type first (for our code's errors, their class)
            cause = cause.__cause__
        return ": ".join(said) or str(exc)
    except _rpc_error() as exc:
        return f"Temporal did not say why ({exc})"
    return "Temporal did not say why"


def _on_temporal(run: Run) -> bool:
    return run.owner is not None and run.owner.engine == "temporal"


def _rpc_error() -> type[Exception]:
    from temporalio.service import RPCError

    return RPCError


def _payload_key_error() -> type[Exception]:
    from .codec import PayloadKeyError

    return PayloadKeyError


def _workflow_failure() -> type[Exception]:
    from temporalio.client import WorkflowFailureError

    return WorkflowFailureError
