"""What crosses Temporal between the server, a run's workflow and the workers' activities.

Plain pydantic models (serialized by temporalio's pydantic converter). A run's state is sent to the
store once per change, and a step's output once: the workflow leaves out the outputs the store
already holds (``SaveRun.carried``), so neither a payload nor the workflow's history grows with the
run's length beyond its new text.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from pydantic import BaseModel, Field

from ...config import DEFAULT_TEMPORAL_HEARTBEAT_TIMEOUT_S, TEMPORAL_HEARTBEAT_EVERY_S, Settings
from ...models import Access, FallbackPolicy, Run, RuntimeMode, RunWorktree, Step, Worker
from ...pricing import BUILTIN_PRICES, Price, PriceTable

# Temporal refuses a payload over 2 MiB: what a step sends back is kept under that (a longer output
# or diff travels cut in the middle; the step's activity stashes it whole in the run store, and the
# run's next save puts it back: activities.save_run). A worktree's diff is stored cut to its limit.
STEP_OUTPUT_BYTES = 1 << 20
STEP_DIFF_BYTES = 512 << 10
# A judging step's findings travel up to this many characters (the rest said in one last entry; its
# output, stored whole, holds them all).
STEP_FINDINGS_CHARS = 64 << 10
# What a run's worktree diffs may weigh together in one result (the commit of a run's worktrees):
# each gets its share; a longer one travels cut and waits whole in the run store, as a step's does.
WORKTREE_DIFFS_BYTES = 1 << 20
# How often a step's activity heartbeats, and the heartbeat timeout of runs dispatched before it was a
# setting (MCP_COLLAB_TEMPORAL_HEARTBEAT_TIMEOUT_S): config.py, where the setting is checked against it.
HEARTBEAT_EVERY_S = TEMPORAL_HEARTBEAT_EVERY_S
HEARTBEAT_TIMEOUT_S = DEFAULT_TEMPORAL_HEARTBEAT_TIMEOUT_S
# Short activities (a worktree, a diff, saving the run) get this long; they retry, being idempotent.
SHORT_ACTIVITY_S = 300.0
# A run's worktrees are committed at its end by whichever worker of its queue takes that job; each
# wait for one lasts this long (or the run's pickup time, the lease TTL, if shorter), and once no
# live worker serves the queue (a dead one's lease lapsed, none came back) the run ends without it
# rather than wait for a machine that is gone.
FINISH_PICKUP_S = 15.0

WORKFLOW_NAME = "mcp-collab-run"
DELIVER_WORKFLOW = "mcp-collab-deliver"
STOP_SIGNAL = "stop"


class CastEntry(BaseModel):
    role: str
    worker: Worker
    access: Access = "read_only"  # a role the strategy does not declare (a follow-up's) takes this


class ContinueJob(BaseModel):
    """A follow-up (continue_worker_run): the parent as far as the follow-up needs it."""

    parent: Run  # its task, worktrees and repository, and only the step continued (output capped)
    step: Step
    message: str
    worktree: RunWorktree | None = None


class StepSettings(BaseModel):
    """The server's settings each step of a run is held to, as at dispatch: MCP_COLLAB_STEP_TIMEOUT,
    MCP_COLLAB_IDLE_TIMEOUT, MCP_COLLAB_MAX_ANSWER_BYTES and the prices MCP_COLLAB_PRICES lays over
    the built-in ones. Whichever worker runs a step applies them, as the local engine applies its own."""

    step_timeout_s: float
    idle_timeout_s: float
    max_answer_bytes: int
    prices: dict[str, Price] = Field(default_factory=dict)

    @classmethod
    def of(cls, settings: Settings) -> StepSettings:
        table = settings.prices.prices
        return cls(
            step_timeout_s=settings.step_timeout_s,
            idle_timeout_s=settings.idle_timeout_s,
            max_answer_bytes=settings.max_answer_bytes,
            prices={model: price for model, price in table.items() if BUILTIN_PRICES.get(model) != price},
        )

    def over(self, settings: Settings) -> Settings:
        """A worker's ``settings`` with these in place of its own."""
        return dataclasses.replace(
            settings,
            step_timeout_s=self.step_timeout_s,
            idle_timeout_s=self.idle_timeout_s,
            max_answer_bytes=self.max_answer_bytes,
            prices=PriceTable({**BUILTIN_PRICES, **self.prices}),
        )


class RunJob(BaseModel):
    """Everything a run's workflow needs, decided at dispatch (the plan)."""

    run: Run
    queue: str  # the task queue of the workers that have the run's directory
    task: str  # as the caller wrote it (the run record keeps it redacted)
    cast: list[CastEntry]
    modes: dict[str, RuntimeMode]
    policies: dict[str, FallbackPolicy]
    cwd: str | None = None
    max_rounds: int | None = None
    run_timeout_s: float
    step_timeout_s: float
    writer_access: Access = "workspace_write"  # the server's; a worker allows no more than its own
    continuation: ContinueJob | None = None
    # A step no worker took within this long is checked against the workers' leases: still served
    # (every slot busy), it is asked for again; not, it never started and the run ends. None: no bound.
    pickup_s: float | None = None
    # A step whose worker sent no heartbeat for this long ends interrupted (the server's setting at
    # dispatch; runs dispatched before it was one were given HEARTBEAT_TIMEOUT_S).
    heartbeat_timeout_s: float = HEARTBEAT_TIMEOUT_S
    # None in runs dispatched before the server's settings travelled: their steps get the worker's.
    step_settings: StepSettings | None = None
    # The server's MCP_COLLAB_WORKTREES: writers get worktrees only where the server and the worker
    # both allow them.
    worktrees: bool = True

    @property
    def finish_pickup_s(self) -> float:
        """How long the commit of the run's worktrees waits for a worker of its queue before the
        workers' leases are read: FINISH_PICKUP_S, or the run's pickup time if that is shorter."""
        return FINISH_PICKUP_S if self.pickup_s is None else min(FINISH_PICKUP_S, self.pickup_s)


class SaveRun(BaseModel):
    run: Run
    # Steps whose output and diff the store already holds: sent empty, kept from the stored record.
    carried: list[int] = Field(default_factory=list)
    # An intermediate state (a step begun or ended while the run goes on) is written without an
    # fsync of its own, as the local engine writes it: it survives the worker's death, and the run's
    # last save, durable, makes it durable too.
    durable: bool = True


class SpaceJob(BaseModel):
    run_id: str
    directory: str | None
    label: str | None = None
    # The repository as the run's first space found it (worktrees.Repo as a dict), so every writer
    # starts from the very same base; None with ``inspected``: not a repository.
    repo: dict[str, object] | None = None
    inspected: bool = False
    worktrees: bool = True  # the server's MCP_COLLAB_WORKTREES (RunJob.worktrees)


class OpenedSpace(BaseModel):
    directory: str | None
    repo: dict[str, object] | None = None
    worktree: RunWorktree | None = None
    repository: str | None = None
    before: str | None = None  # an in-place space: the snapshot its diff is taken against
    notes: list[str] = Field(default_factory=list)


class StepJob(BaseModel):
    run_id: str
    strategy: str
    role: str
    step: Step  # begun by the workflow: index, role, worker, runtime, directory, access
    worker: Worker
    prompt: str
    policy: FallbackPolicy
    resume_session: str | None = None
    resume_message: str | None = None
    choices: list[str] = Field(default_factory=list)
    # The space the step works in, when the workflow has not opened it: the step's activity opens it
    # first (``step_in_space``), so a run's first step costs one activity, not two.
    space: SpaceJob | None = None
    step_settings: StepSettings | None = None  # the run's (RunJob.step_settings)


class Beat(BaseModel):
    """A step's heartbeat: what it last said, for those who wait on the run; and the worktree its
    activity opened, so the workflow hears of it even if the worker dies before the step ends."""

    message: str = ""
    pid: int | None = None
    opened: OpenedSpace | None = None


class ContinueSpaceJob(BaseModel):
    run_id: str
    parent: Run
    step: Step
    worktree: RunWorktree | None = None


class DiffJob(BaseModel):
    run_id: str
    repository: str | None = None
    worktree: RunWorktree | None = None
    directory: str | None = None
    before: str | None = None


class FinishJob(BaseModel):
    run_id: str
    repository: str | None
    worktrees: list[RunWorktree]


class Finished(BaseModel):
    worktrees: list[RunWorktree]
    notes: list[str] = Field(default_factory=list)


class DeliverJob(BaseModel):
    """Apply or discard a finished run's work, on the workers that hold its worktrees."""

    run: Run  # without its steps: what delivery reads is the run's worktrees, repository and choice
    queue: str
    action: Literal["apply", "discard"]
    label: str | None = None


class StepDone(BaseModel):
    """A ``step_in_space`` activity's result: the step as it ended (as it stood when it was stopped:
    its status then is still ``running``, or ``interrupted`` when its worker was shutting down), and
    the space it opened for it."""

    step: Step
    opened: OpenedSpace | None = None


class DeliveredJob(BaseModel):
    worktrees: list[RunWorktree]
    branches: list[str]
    applied: bool
    files: list[str]
    message: str
    refused: str | None = None  # a refusal (the work is in the way, already discarded ...): nothing changed
