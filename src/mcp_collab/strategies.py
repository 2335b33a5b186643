"""Collaboration strategies: a name, the roles it needs, and the prompt each role gets.

A strategy is data plus prompt builders; the orchestrator runs its roles in order, each step
seeing the steps before it. Worker choice per role: the dispatch's ``workers`` list in role order
first, else the first registered worker whose model fits the role.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .errors import InvalidRequestError, NoFittingWorkerError, UnknownWorkerError, listing, shown
from .models import Access, Step, Verdict, Worker, WorkerModel

# How much of a previous step's output and of a diff goes into the next prompt.
MAX_QUOTED_OUTPUT_CHARS = 60_000
MAX_QUOTED_DIFF_CHARS = 120_000


@dataclass(frozen=True)
class PromptContext:
    task: str
    previous: Sequence[Step]
    diff: str | None = None


@dataclass(frozen=True)
class Role:
    name: str
    models: tuple[WorkerModel, ...] | None  # None: any worker
    access: Access
    prompt: Callable[[PromptContext], str]
    # The verdicts a judging role may give, passing one first; empty: the role does not judge.
    verdicts: tuple[Verdict, ...] = ()
    distinct_from_previous: bool = False  # prefer a worker other than the previous role's

    @property
    def judges(self) -> bool:
        """Its output carries a verdict."""
        return bool(self.verdicts)


@dataclass(frozen=True)
class Strategy:
    name: str
    summary: str
    roles: tuple[Role, ...]
    wants_diff: bool = False


def _task_prompt(ctx: PromptContext) -> str:
    return ctx.task


def _writer_prompt(ctx: PromptContext) -> str:
    return (
        "You are the writer in a write-then-review collaboration. Carry out the task below in the "
        "working directory. Finish with a short summary of what you changed and why; a reviewer "
        "will read it together with your diff.\n\n"
        f"<task>\n{ctx.task}\n</task>"
    )


def _quote(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[:limit] + f"\n[... {len(text) - limit} characters omitted ...]"


def _reviewer_prompt(ctx: PromptContext) -> str:
    writer = ctx.previous[-1]
    diff = (
        f"<diff>\n{_quote(ctx.diff, MAX_QUOTED_DIFF_CHARS)}\n</diff>"
        if ctx.diff
        else "<diff>(no changes in a git working tree were found)</diff>"
    )
    return (
        "You are the reviewer in a write-then-review collaboration. Do not modify any file. Review "
        f"the work of {writer.worker_name} on the task below for correctness, completeness, tests and "
        "risk. Point to specific lines. End with exactly one line, either `VERDICT: APPROVE` or "
        "`VERDICT: REQUEST_CHANGES`.\n\n"
        f"<task>\n{ctx.task}\n</task>\n\n"
        f"<writer_output>\n{_quote(writer.output, MAX_QUOTED_OUTPUT_CHARS)}\n</writer_output>\n\n{diff}"
    )


def _redteam_prompt(ctx: PromptContext) -> str:
    doer = ctx.previous[-1]
    diff = f"\n\n<diff>\n{_quote(ctx.diff, MAX_QUOTED_DIFF_CHARS)}\n</diff>" if ctx.diff else ""
    return (
        "You are a security red-teamer. Do not modify any file. Attack the result below as an "
        "adversary would: injection, authentication and authorization flaws, secrets, unsafe "
        "deserialization, path traversal, command execution, denial of service, supply chain. "
        "Report each vulnerability on its own line as `FINDING: <severity>: <description>` "
        "(severity: critical, high, medium or low). End with exactly one line, either "
        "`VERDICT: PASS` (nothing exploitable found) or `VERDICT: FAIL`.\n\n"
        f"<task>\n{ctx.task}\n</task>\n\n"
        f'<result author="{doer.worker_name}">\n{_quote(doer.output, MAX_QUOTED_OUTPUT_CHARS)}\n</result>{diff}'
    )


STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy(
            name="single_worker",
            summary="One worker does the task. Use for a self-contained job that needs no second opinion.",
            roles=(Role("worker", None, "workspace_write", _task_prompt),),
        ),
        Strategy(
            name="codex_writes_gemini_reviews",
            summary="A codex worker writes the change; a gemini worker reviews its output and git diff "
            "read-only and gives a verdict (approve / request_changes). Use for code changes that "
            "deserve a second pair of eyes.",
            roles=(
                Role("writer", ("codex_cli",), "workspace_write", _writer_prompt),
                Role(
                    "reviewer", ("gemini_cli",), "read_only", _reviewer_prompt, verdicts=("approve", "request_changes")
                ),
            ),
            wants_diff=True,
        ),
        Strategy(
            name="security_redteam_pass",
            summary="A worker does the task; a second worker attacks the result read-only for "
            "vulnerabilities and records findings and a verdict (pass / fail). Use for anything "
            "touching input handling, auth, secrets, files or processes.",
            roles=(
                Role("worker", None, "workspace_write", _task_prompt),
                Role(
                    "redteam",
                    None,
                    "read_only",
                    _redteam_prompt,
                    verdicts=("pass", "fail"),
                    distinct_from_previous=True,
                ),
            ),
            wants_diff=True,
        ),
    )
}


def get_strategy(name: str) -> Strategy:
    strategy = STRATEGIES.get(name)
    if strategy is None:
        raise InvalidRequestError(f"unknown strategy {shown(name)}; accepted: {', '.join(STRATEGIES)}")
    return strategy


def assign_workers(strategy: Strategy, registered: Sequence[Worker], named: Sequence[str] | None) -> list[Worker]:
    """One worker per role, deterministically; a clear error when none fits."""
    by_name = {w.name: w for w in registered}
    named = list(named or [])
    if len(named) > len(strategy.roles):
        raise InvalidRequestError(
            f"strategy {strategy.name!r} has {len(strategy.roles)} role(s) "
            f"({', '.join(r.name for r in strategy.roles)}) but {len(named)} workers were named"
        )
    chosen: list[Worker] = []
    for i, role in enumerate(strategy.roles):
        fits = "any model" if role.models is None else " or ".join(role.models)
        if i < len(named):
            worker = by_name.get(named[i])
            if worker is None:
                known = listing(sorted(by_name), empty="none registered")
                raise UnknownWorkerError(f"unknown worker {shown(named[i])}; registered workers: {known}")
            if role.models is not None and worker.model not in role.models:
                raise InvalidRequestError(
                    f"worker {worker.name!r} is a {worker.model} worker, but the {role.name} role of "
                    f"{strategy.name!r} needs {fits}"
                )
            chosen.append(worker)
            continue
        candidates = [w for w in registered if role.models is None or w.model in role.models]
        if role.distinct_from_previous and chosen:
            others = [w for w in candidates if w.name != chosen[-1].name]
            candidates = others or candidates
        if not candidates:
            # How to register or name one is the surface's to say (a tool, or a command option).
            raise NoFittingWorkerError(
                f"no registered worker can take the {role.name} role of {strategy.name!r} (needs {fits})"
            )
        chosen.append(candidates[0])
    return chosen


# A verdict line: "VERDICT: APPROVE", "**Verdict:** request changes", "`VERDICT: PASS`". The words after
# the separator are kept whole, so the last verdict line decides even when it says something else.
_VERDICT = re.compile(r"^[\W_]*verdict[\W_]*[:=-][\W_]*(.*)$", re.I | re.M)
_VERDICT_WORD = re.compile(r"(approve|request[ _-]?changes|pass|fail)(?![\w-])", re.I)
_FINDING = re.compile(r"^[\W_]*finding[\W_]*:\s*(.+?)\s*$", re.I | re.M)
# The verdicts that let work through; any other (a failing one, or unknown) should stop it.
PASSING_VERDICTS: frozenset[Verdict] = frozenset({"approve", "pass"})


def parse_verdict(text: str, accepted: Sequence[Verdict]) -> tuple[Verdict, list[str]]:
    """The verdict of the last VERDICT line and every FINDING line of a judging step's output.

    Only the verdicts the role may give count (a reviewer approves or requests changes; a red-teamer
    passes or fails): a reviewer saying PASS, a line with another word, or no verdict line at all is
    ``unknown``, never read as a verdict the judge did not give."""
    lines = _VERDICT.findall(text)
    verdict: Verdict = "unknown"
    if lines:
        word = _VERDICT_WORD.match(lines[-1].strip())
        if word is not None:
            said = re.sub(r"[ -]", "_", word.group(1).lower()).replace("requestchanges", "request_changes")
            if said in accepted:
                verdict = said  # type: ignore[assignment]  # checked against the role's Verdict values
    findings = [f.strip("`* ") for f in _FINDING.findall(text)]
    return verdict, findings
