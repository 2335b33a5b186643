"""What a worker runs for a run's workflow: steps, spaces, diffs, and saving the run.

A step runs through the same ``StepExecutor`` as on the local engine (the runtime, its fallback,
confinement of its directory, process trees, redaction), reporting through heartbeats instead of a
local run's listeners. Temporal cancels a step by cancelling its activity's task; the supervisor
then kills the step's process tree, as a local cancel does.

A step's output or diff too long to travel through Temporal is cut for the journey, and its whole
texts are stashed in the run store by the step's activity; the run's next save (``save_run``) puts
them back into the run's record, so the store keeps what the local engine keeps.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
from temporalio import activity

from ... import worktrees
from ...config import Settings
from ...errors import CollabError, StoreError
from ...models import Run, Step
from ...runtimes.base import PartialOutput, Resume
from ...store import RunStore, StepTexts
from ...strategies import MAX_QUOTED_DIFF_CHARS, STRATEGIES, Role
from .. import delivery
from ..delivery import rebuild
from ..executor import StepExecutor, answer_bytes, cap_text
from ..plan import default_directory
from ..recorder import RunRecorder
from ..spaces import InPlaceSpace, Spaces
from .jobs import (
    HEARTBEAT_EVERY_S,
    STEP_DIFF_BYTES,
    STEP_FINDINGS_CHARS,
    STEP_OUTPUT_BYTES,
    WORKTREE_DIFFS_BYTES,
    Beat,
    ContinueSpaceJob,
    DeliveredJob,
    DeliverJob,
    DiffJob,
    Finished,
    FinishJob,
    OpenedSpace,
    SaveRun,
    SpaceJob,
    StepDone,
    StepJob,
)

log = logging.getLogger("mcp_collab.worker")

# What a worker's operator allows writers, from least to most; a step gets no more than both allow.
_ACCESS_ORDER = ("read_only", "workspace_write", "bypass")


def repo_to_dict(repo: worktrees.Repo | None) -> dict[str, object] | None:
    if repo is None:
        return None
    return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(repo).items()}


def repo_from_dict(data: dict[str, Any] | None) -> worktrees.Repo | None:
    if data is None:
        return None
    paths = {"top", "git_dir", "common_dir"}
    fields: dict[str, Any] = {k: Path(v) if k in paths else v for k, v in data.items()}
    return worktrees.Repo(**fields)


def fit(text: str, limit: int) -> tuple[str, bool]:
    """``text`` cut in the middle to at most ``limit`` bytes of UTF-8."""
    if answer_bytes(text) <= limit:
        return text, False
    return cap_text(text, limit if text.isascii() else limit // 4)


def texts_of(step: Step) -> StepTexts:
    return StepTexts(step.index, step.output, step.diff, step.output_truncated)


def maybe_cut(text: str | None, limit: int) -> bool:
    """Could ``text`` be what ``fit`` made of a longer one? Only then may its whole form wait in a
    stash or in the stored record: ``fit`` leaves more than a quarter of its limit."""
    return len(text or "") > limit // 4


def may_have_stash(step: Step) -> bool:
    """A step cut for the journey, or interrupted (its worker may have died after stashing); one that
    ended short, nearly every step, costs its save no lookup."""
    cut = maybe_cut(step.output, STEP_OUTPUT_BYTES) or maybe_cut(step.diff, STEP_DIFF_BYTES)
    return cut or step.status == "interrupted"


def fit_findings(findings: list[str], limit: int = STEP_FINDINGS_CHARS) -> list[str]:
    """As many of ``findings`` as fit in ``limit`` characters; the rest said in one last entry."""
    used = 0
    for i, finding in enumerate(findings):
        used += len(finding)
        if used > limit:
            return [*findings[:i], f"[... {len(findings) - i} more findings: the step's output has them all ...]"]
    return findings


def worktree_key(i: int) -> int:
    """The stash of a run's worktree ``i``'s whole diff (steps are stashed by their index, from 0)."""
    return -1 - i


def diff_share(run: Run) -> int:
    """What each of ``run``'s worktree diffs may weigh on its way through Temporal."""
    return WORKTREE_DIFFS_BYTES // max(1, len(run.worktrees))


def travelled(whole: StepTexts, step: Step) -> bool:
    """Is ``step``, as it reached the workflow, the one whose whole texts are ``whole``?"""
    return fit(whole.output, STEP_OUTPUT_BYTES)[0] == step.output and fit(whole.diff, STEP_DIFF_BYTES)[0] == step.diff


class _ActivitySite:
    """A step's reports, as heartbeats: its last message, for those who wait.

    A message goes out with the next beat, not on its own: Temporal holds heartbeats to one per
    HEARTBEAT_EVERY_S anyway, and each one sent is a call to Temporal's server and a write of its
    database; a step that ends within the first beat sends none."""

    def __init__(self) -> None:
        self.partials: dict[int, PartialOutput] = {}
        self.beat = Beat()

    def emit(self, message: str) -> None:
        self.beat = self.beat.model_copy(update={"message": message})

    async def changed(self) -> None:
        """Nothing to send: the step's state reaches the store with the activity's result."""

    async def keep_beating(self) -> None:
        """Heartbeats while the step works: how Temporal knows the worker lives, and how a cancel
        reaches the step."""
        while True:
            await anyio.sleep(HEARTBEAT_EVERY_S)
            activity.heartbeat(self.beat)


class Activities:
    def __init__(self, settings: Settings, store: RunStore, executor: StepExecutor) -> None:
        self.settings = settings
        self.store = store
        self.executor = executor
        self.recorder = RunRecorder(store, settings.redact)

    def all(self) -> list[Any]:
        return [
            self.run_step,
            self.step_in_space,
            self.open_space,
            self.inspect_repository,
            self.space_diff,
            self.finish_spaces,
            self.default_directory,
            self.continue_space,
            self.deliver,
        ]

    @activity.defn(name="run_step")
    async def run_step(self, job: StepJob) -> Step:
        """A step of a run started before ``step_in_space`` (its workflow opened its space)."""
        return await self._perform(job, _ActivitySite())

    @activity.defn(name="step_in_space")
    async def step_in_space(self, job: StepJob) -> StepDone:
        """A step, in the space the workflow asks it to open first (``job.space``). A worktree it
        opens is also sent at once in a heartbeat: a worker that dies mid-step leaves it recorded
        (the workflow reads the last heartbeat). A step stopped by a cancel or by this worker's
        shutdown comes back as it stood, with its space, rather than as a bare cancellation."""
        site = _ActivitySite()
        opened = None
        if job.space is not None:
            opened = await self._open(job.space)
            if opened.directory is not None:
                job.step.directory = opened.directory
            if opened.worktree is not None:
                site.beat = Beat(opened=opened)
                activity.heartbeat(site.beat)  # the first heartbeat goes out at once
        try:
            step = await self._perform(job, site)
        except asyncio.CancelledError:
            if not (activity.is_cancelled() or activity.is_worker_shutdown()):
                raise
            step = job.step  # still running: the workflow records why it ended
            if activity.is_worker_shutdown():
                step.status = "interrupted"  # the workflow says so in its words, as for a dead worker
            self.settings.redact.scrub(step)
        return StepDone(step=step, opened=opened)

    async def _perform(self, job: StepJob, site: _ActivitySite) -> Step:
        step = job.step
        declared = STRATEGIES.get(job.strategy)
        role = next((r for r in declared.roles if r.name == job.role), None) if declared is not None else None
        role = role or Role(job.role, None, step.access or "read_only")
        if step.access is not None and step.access != "read_only":
            # The server's operator chose the writers' access; this worker's operator may allow less.
            mine = self.settings.writer_access
            step.access = min(step.access, mine, key=_ACCESS_ORDER.index)
        resume = Resume(job.resume_session, job.resume_message or job.prompt) if job.resume_session else None
        executor = self.executor
        if job.step_settings is not None:  # the server's, not this worker's own
            executor = executor.under(job.step_settings.over(self.settings))
        async with anyio.create_task_group() as beating:
            beating.start_soon(site.keep_beating)
            try:
                await executor.perform(
                    site, step, job.worker, role, job.prompt, policy=job.policy, resume=resume, choices=job.choices
                )
            finally:
                beating.cancel_scope.cancel()
        self.settings.redact.scrub(step)
        await self._fit(job.run_id, step)
        return step

    async def _fit(self, run_id: str, step: Step) -> None:
        """Cut ``step``'s output and diff to what a result may carry through Temporal; their whole
        texts, when cut, wait in the run store for the run's next save (``save_run``)."""
        step.findings = fit_findings(step.findings)
        output, cut = fit(step.output, STEP_OUTPUT_BYTES)
        diff, diff_cut = fit(step.diff, STEP_DIFF_BYTES)
        if not (cut or diff_cut):
            return
        await self._stash(run_id, texts_of(step), f"step {step.index}")
        step.output, step.diff = output, diff
        step.output_truncated = step.output_truncated or cut

    async def _stash(self, run_id: str, texts: StepTexts, what: str) -> None:
        """Keep whole texts in the run store for the run's next save; what could not be kept stays
        cut (nothing else is lost for it)."""
        try:
            if not await anyio.to_thread.run_sync(self.store.stash_texts, run_id, texts):
                log.warning("run %s is not in the run store: its %s keeps its texts cut", run_id, what)
        except StoreError as exc:
            log.warning("the %s of run %s keeps its texts cut: %s", what, run_id, exc)

    @activity.defn(name="save_run")
    async def save_run(self, job: SaveRun) -> None:
        """The workflow's state of a run into the store: the outputs it left out kept from there,
        and the texts cut for the journey (a step's output and diff, a worktree's diff) given whole,
        from their stash (then dropped, once the run's record holds them durably) or, when this
        save is a retry of one that did that, from the stored record."""
        run = job.run
        ended = [
            s.index
            for s in run.steps
            if s.index not in job.carried and s.status not in ("running", "pending") and may_have_stash(s)
        ]
        trees = [i for i, w in enumerate(run.worktrees) if maybe_cut(w.diff, diff_share(run))]
        stored = None
        if job.carried or ended or trees:
            stored = await anyio.to_thread.run_sync(self.store.get_run, run.id)
        keys = ended + [worktree_key(i) for i in trees]
        stashes = await anyio.to_thread.run_sync(self.store.stashed_texts, run.id, keys) if keys else []
        kept = stored.steps if stored is not None else []
        for i in job.carried:
            if i < len(kept) and i < len(run.steps):
                run.steps[i].output, run.steps[i].diff = kept[i].output, kept[i].diff
                run.steps[i].output_truncated = kept[i].output_truncated
        stashed = {t.step: t for t in stashes}
        for i in ended:
            step = run.steps[i]
            earlier = kept[i] if i < len(kept) and kept[i].status not in ("running", "pending") else None
            for whole in (stashed.get(i), texts_of(earlier) if earlier is not None else None):
                if whole is not None and travelled(whole, step):
                    step.output, step.diff, step.output_truncated = whole.output, whole.diff, whole.output_truncated
                    break
        kept_trees = stored.worktrees if stored is not None else []
        for i in trees:
            record = run.worktrees[i]
            held = kept_trees[i].diff if i < len(kept_trees) else ""  # a retried save's, once its stash went
            for text in (stashed[k].diff if (k := worktree_key(i)) in stashed else "", held):
                if text and fit(text, diff_share(run))[0] == record.diff:
                    record.diff = text
                    break
        # A run's result is its last completed step's output (``settle``), cut as the workflow saw it.
        last = next((s for s in reversed(run.steps) if s.status == "completed"), None)
        cut_result = maybe_cut(run.result, STEP_OUTPUT_BYTES)
        if cut_result and last is not None and run.result == fit(last.output, STEP_OUTPUT_BYTES)[0]:
            run.result = last.output
        await self.recorder.save(run, durable=job.durable or bool(stashes))
        if stashes:  # one that fits no step too: its step ended without it (the worker died after stashing)
            await anyio.to_thread.run_sync(self.store.drop_stashes, run.id, [t.step for t in stashes])

    @activity.defn(name="queue_served")
    async def queue_served(self, queue: str) -> bool:
        """Whether a live worker serves the step queue ``queue`` (by the workers' leases in the store)."""
        leases = await anyio.to_thread.run_sync(self.store.live_leases, "worker")
        return any(lease.queue == queue for lease in leases)

    def _spaces(self, run: Run, directory: str | None, *, worktrees: bool = True) -> Spaces:
        """A run's spaces here: worktrees where both the run (its server) and this worker allow them."""
        return Spaces(
            run,
            directory=Path(directory) if directory else None,
            roots=self.settings.workspace_roots,
            base_dir=self.settings.worktrees_dir,
            enabled=self.settings.worktrees and worktrees,
        )

    @activity.defn(name="inspect_repository")
    async def inspect_repository(self, job: SpaceJob) -> dict[str, object] | None:
        spaces = self._spaces(Run(id=job.run_id, task="", strategy=""), job.directory, worktrees=job.worktrees)
        return repo_to_dict(await spaces.repository())

    @activity.defn(name="open_space")
    async def open_space(self, job: SpaceJob) -> OpenedSpace:
        return await self._open(job)

    async def _open(self, job: SpaceJob) -> OpenedSpace:
        scratch = Run(id=job.run_id, task="", strategy="")
        spaces = self._spaces(scratch, job.directory, worktrees=job.worktrees)
        if job.inspected:
            spaces.seed(repo_from_dict(job.repo))
        space = await spaces.make(job.label)
        return OpenedSpace(
            directory=str(space.directory) if space.directory is not None else None,
            repo=repo_to_dict(await spaces.repository()),
            worktree=scratch.worktrees[-1] if scratch.worktrees else None,
            repository=scratch.repository,
            before=space.before if isinstance(space, InPlaceSpace) else None,
            notes=scratch.notes,
        )

    @activity.defn(name="continue_space")
    async def continue_space(self, job: ContinueSpaceJob) -> OpenedSpace | None:
        """Where a follow-up works: the parent's worktree while it is active, else a new one, else
        the step's directory (``Spaces.continue_in``)."""
        scratch = Run(id=job.run_id, task="", strategy="")
        spaces = self._spaces(scratch, None)
        space = await spaces.continue_in(job.parent, job.worktree, job.step)
        if space is None:
            return None
        return OpenedSpace(
            directory=str(space.directory) if space.directory is not None else None,
            worktree=scratch.worktrees[-1] if scratch.worktrees else None,
            repository=scratch.repository,
            before=space.before if isinstance(space, InPlaceSpace) else None,
            notes=scratch.notes,
        )

    @activity.defn(name="space_diff")
    async def space_diff(self, job: DiffJob) -> str | None:
        if job.worktree is not None and job.repository is not None:
            owner = Run(id=job.run_id, task="", strategy="", repository=job.repository)
            text = await worktrees.diff(rebuild(owner, job.worktree), max_bytes=MAX_QUOTED_DIFF_CHARS)
            return text or None
        directory = Path(job.directory) if job.directory else None
        return await InPlaceSpace.resumed(directory, self.settings.workspace_roots, job.before).diff()

    @activity.defn(name="finish_spaces")
    async def finish_spaces(self, job: FinishJob) -> Finished:
        """Each worktree's work as a commit on its branch, and its diff against the base."""
        scratch = Run(id=job.run_id, task="", strategy="", repository=job.repository)
        scratch.worktrees = [w.model_copy() for w in job.worktrees]
        spaces = self._spaces(scratch, None)
        spaces.trees = [rebuild(scratch, w) for w in scratch.worktrees]
        await spaces.finish()  # each diff up to what the local engine keeps
        share = diff_share(scratch)
        for i, record in enumerate(scratch.worktrees):
            cut, too_long = fit(record.diff, share)
            if too_long:
                await self._stash(job.run_id, StepTexts(worktree_key(i), "", record.diff, False), f"worktree {i}")
                record.diff = cut
        return Finished(worktrees=scratch.worktrees, notes=scratch.notes)

    @activity.defn(name="deliver")
    async def deliver(self, job: DeliverJob) -> DeliveredJob:
        """Apply a run's branch to the user's working tree here, or remove its worktrees."""
        try:
            if job.action == "apply":
                done = await delivery.apply(self.settings, job.run, job.label)
            else:
                done = await delivery.discard(job.run)
        except CollabError as exc:
            return DeliveredJob(worktrees=job.run.worktrees, branches=[], applied=False, files=[], message="",
                                refused=str(exc))  # fmt: skip
        return DeliveredJob(
            worktrees=done.run.worktrees,
            branches=list(done.branches),
            applied=done.applied,
            files=list(done.files),
            message=done.message,
        )

    @activity.defn(name="default_directory")
    async def default_directory(self, run_id: str) -> str:
        """Where this worker runs a step that names no directory."""
        return str(await anyio.to_thread.run_sync(functools.partial(default_directory, self.settings)))
