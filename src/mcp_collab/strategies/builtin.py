"""The strategies that ship with mcp-collab, each a short program over the engine."""

from __future__ import annotations

from . import prompts
from .base import Role, RunContext, strategy
from .verdicts import REDTEAM_VERDICTS, REVIEW_VERDICTS

WORKER = Role("worker", None, "workspace_write")
WRITER = Role("writer", ("codex_cli",), "workspace_write")
REVIEWER = Role("reviewer", ("gemini_cli",), "read_only", verdicts=REVIEW_VERDICTS)
REDTEAM = Role("redteam", None, "read_only", verdicts=REDTEAM_VERDICTS, distinct_from_previous=True)


@strategy(
    "single_worker",
    summary="One worker does the task. Use for a self-contained job that needs no second opinion.",
    roles=(WORKER,),
)
async def single_worker(run: RunContext) -> None:
    [worker] = run.cast(WORKER)
    run.require(await run.step(worker, WORKER, run.task))


@strategy(
    "codex_writes_gemini_reviews",
    summary="A codex worker writes the change; a gemini worker reviews its output and git diff "
    "read-only and gives a verdict (approve / request_changes). Use for code changes that "
    "deserve a second pair of eyes.",
    roles=(WRITER, REVIEWER),
)
async def codex_writes_gemini_reviews(run: RunContext) -> None:
    [writer], [reviewer] = run.cast(WRITER), run.cast(REVIEWER)
    space = await run.space()
    wrote = run.require(await run.step(writer, WRITER, prompts.writer(run.task), space=space))
    diff = await space.diff()
    run.require(await run.step(reviewer, REVIEWER, prompts.reviewer(run.task, wrote, diff), space=space))


@strategy(
    "security_redteam_pass",
    summary="A worker does the task; a second worker attacks the result read-only for "
    "vulnerabilities and records findings and a verdict (pass / fail). Use for anything "
    "touching input handling, auth, secrets, files or processes.",
    roles=(WORKER, REDTEAM),
)
async def security_redteam_pass(run: RunContext) -> None:
    [doer], [attacker] = run.cast(WORKER), run.cast(REDTEAM)
    space = await run.space()
    done = run.require(await run.step(doer, WORKER, run.task, space=space))
    diff = await space.diff()
    run.require(await run.step(attacker, REDTEAM, prompts.redteam(run.task, done, diff), space=space))
