"""The strategies that ship with mcp-collab, each a short program over the engine."""

from __future__ import annotations

import functools

from ..models import Step
from . import prompts
from .base import Role, RunContext, strategy
from .verdicts import REDTEAM_VERDICTS, REVIEW_VERDICTS

# How many rounds a review loop runs when the dispatch does not say.
DEFAULT_MAX_ROUNDS = 3
# A consensus needs at least this many answers to compare.
MIN_ANSWERS = 2

WORKER = Role("worker", None, "workspace_write")
WRITER = Role("writer", ("codex_cli",), "workspace_write")
REVIEWER = Role("reviewer", ("gemini_cli",), "read_only", verdicts=REVIEW_VERDICTS)
REDTEAM = Role("redteam", None, "read_only", verdicts=REDTEAM_VERDICTS, findings=True, distinct_from_previous=True)


@strategy(
    "single_worker",
    summary="One worker does the task. Use for a self-contained job that needs no second opinion.",
    roles=(WORKER,),
)
async def single_worker(run: RunContext) -> None:
    [worker] = run.cast(WORKER)
    run.require(await run.step(worker, WORKER, run.task, space=await run.space()))


@strategy(
    "codex_writes_gemini_reviews",
    summary="A codex worker writes; a gemini worker reviews the diff (approve / request_changes). The "
    "reviewer reads the writer's output and git diff read-only and gives a verdict. Use for code changes "
    "that deserve a second pair of eyes.",
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
    summary="A worker does the task; another attacks the result (findings, pass / fail). The red-teamer "
    "works read-only and records each vulnerability as a finding and a verdict. Use for anything "
    "touching input handling, auth, secrets, files or processes.",
    roles=(WORKER, REDTEAM),
)
async def security_redteam_pass(run: RunContext) -> None:
    [doer], [attacker] = run.cast(WORKER), run.cast(REDTEAM)
    space = await run.space()
    done = run.require(await run.step(doer, WORKER, run.task, space=space))
    diff = await space.diff()
    run.require(await run.step(attacker, REDTEAM, prompts.redteam(run.task, done, diff), space=space))


LOOP_WRITER = Role("writer", None, "workspace_write")
LOOP_REVIEWER = Role("reviewer", None, "read_only", verdicts=REVIEW_VERDICTS, distinct_from_previous=True)


@strategy(
    "review_loop",
    summary="A writer revises until a reviewer approves, up to maxRounds (default 3). The reviewer reads "
    "the diff read-only; while it requests changes, the writer revises in the same place with the review "
    "in hand and a fresh review follows. Every round's verdict is recorded; the run's is the last. Use "
    "when the change must pass review, not just get one.",
    roles=(LOOP_WRITER, LOOP_REVIEWER),
    loops=True,
)
async def review_loop(run: RunContext) -> None:
    [writer], [reviewer] = run.cast(LOOP_WRITER), run.cast(LOOP_REVIEWER)
    space = await run.space()
    review = wrote = None
    for round in range(1, (run.max_rounds or DEFAULT_MAX_ROUNDS) + 1):
        prompt = prompts.writer(run.task) if review is None else prompts.revise(run.task, review, await space.diff())
        # A revision continues the writer's own session where its runtime can resume it.
        wrote = run.require(await run.step(writer, LOOP_WRITER, prompt, space=space, round=round, continues=wrote))
        diff = await space.diff()
        review = run.require(
            await run.step(reviewer, LOOP_REVIEWER, prompts.reviewer(run.task, wrote, diff), space=space, round=round)
        )
        if review.verdict == "approve":
            break


ANSWERER = Role("answerer", None, "read_only", count=(MIN_ANSWERS, 5))
SYNTHESIZER = Role("synthesizer", None, "read_only")


@strategy(
    "parallel_consensus",
    summary="2 to 5 workers answer at once; a synthesizer merges the answers. They work read-only; "
    "different vendors are the point, and the synthesis names where they agree and disagree. A "
    "failed answer is recorded and the synthesis goes on while two remain. workers: the answerers, then "
    "the synthesizer last when more than two are named (else the first registered worker). Use for "
    "design questions, reviews of a plan, diagnoses.",
    roles=(ANSWERER, SYNTHESIZER),
)
async def parallel_consensus(run: RunContext) -> None:
    answerers, [synthesizer] = run.cast(ANSWERER), run.cast(SYNTHESIZER)
    question = prompts.answerer(run.task)
    answers = await run.parallel(
        [
            functools.partial(run.step, worker, ANSWERER, question, branch=f"{i + 1}:{worker.name}")
            for i, worker in enumerate(answerers)
        ]
    )
    good = [a for a in answers if a.status == "completed"]
    if len(good) < MIN_ANSWERS:
        failed = "; ".join(f"{a.worker_name}: {a.error}" for a in answers if a.status != "completed")
        run.fail(f"only {len(good)} of {len(answers)} answers came back (a consensus needs {MIN_ANSWERS}): {failed}")
    run.require(await run.step(synthesizer, SYNTHESIZER, prompts.synthesis(run.task, good)))


CONTENDER = Role("writer", None, "workspace_write", count=(2, 5))
JUDGE = Role("judge", None, "read_only", distinct_from_previous=True)


@strategy(
    "best_of_n",
    summary="2 to 5 writers work at once in their own worktrees; a judge picks one. "
    "The judge compares the diffs read-only and gives its reasons; the run's result is the winning branch "
    "(apply_worker_run applies it). Needs a git repository. workers: the writers, then the judge last "
    "when more than two are named. Use when the best approach is unclear.",
    roles=(CONTENDER, JUDGE),
    needs_repository=True,
)
async def best_of_n(run: RunContext) -> None:
    writers, [judge] = run.cast(CONTENDER), run.cast(JUDGE)
    labels = [str(i + 1) for i in range(len(writers))]
    spaces = await run.parallel([functools.partial(run.space, label) for label in labels])

    async def contend(i: int) -> tuple[Step, str | None]:
        step = await run.step(writers[i], CONTENDER, prompts.contender(run.task), space=spaces[i], branch=labels[i])
        return step, (await spaces[i].diff() if step.status == "completed" else None)

    results = await run.parallel([functools.partial(contend, i) for i in range(len(writers))])
    candidates = [(label, step, diff) for label, (step, diff) in zip(labels, results, strict=True) if diff]
    if not candidates:
        why = "; ".join(f"{s.worker_name}: {s.error or 'no change'}" for s, _ in results)
        run.fail(f"no writer left a change to choose from ({why})")
    if len(candidates) == 1:
        run.finish(chosen=candidates[0][0], result=f"only writer {candidates[0][0]} left a change; it is the result")
        return
    labels = [label for label, _, _ in candidates]
    verdict = run.require(await run.step(judge, JUDGE, prompts.judge(run.task, candidates), choices=labels))
    choice = verdict.choice
    if choice is None:
        run.fail(
            f"the judge named no candidate (expected a line CHOICE: one of {', '.join(c[0] for c in candidates)}); "
            "every branch is kept: apply one by its label"
        )
    run.finish(chosen=choice)
