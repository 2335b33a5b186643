"""The prompts each role gets. Plain functions of what came before; the task is quoted, not mixed in."""

from __future__ import annotations

from ..models import Step

# How much of a previous step's output and of a diff goes into the next prompt.
MAX_QUOTED_OUTPUT_CHARS = 60_000
MAX_QUOTED_DIFF_CHARS = 120_000


def quote(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[:limit] + f"\n[... {len(text) - limit} characters omitted ...]"


def diff_block(diff: str | None, *, missing: str | None = "(no changes in a git working tree were found)") -> str:
    if diff:
        return f"<diff>\n{quote(diff, MAX_QUOTED_DIFF_CHARS)}\n</diff>"
    return f"<diff>{missing}</diff>" if missing else ""


def writer(task: str) -> str:
    return (
        "You are the writer in a write-then-review collaboration. Carry out the task below in the "
        "working directory. Finish with a short summary of what you changed and why; a reviewer "
        "will read it together with your diff.\n\n"
        f"<task>\n{task}\n</task>"
    )


def reviewer(task: str, wrote: Step, diff: str | None) -> str:
    return (
        "You are the reviewer in a write-then-review collaboration. Do not modify any file. Review "
        f"the work of {wrote.worker_name} on the task below for correctness, completeness, tests and "
        "risk. Point to specific lines. End with exactly one line, either `VERDICT: APPROVE` or "
        "`VERDICT: REQUEST_CHANGES`.\n\n"
        f"<task>\n{task}\n</task>\n\n"
        f"<writer_output>\n{quote(wrote.output, MAX_QUOTED_OUTPUT_CHARS)}\n</writer_output>\n\n{diff_block(diff)}"
    )


def redteam(task: str, done: Step, diff: str | None) -> str:
    block = diff_block(diff, missing=None)
    return (
        "You are a security red-teamer. Do not modify any file. Attack the result below as an "
        "adversary would: injection, authentication and authorization flaws, secrets, unsafe "
        "deserialization, path traversal, command execution, denial of service, supply chain. "
        "Report each vulnerability on its own line as `FINDING: <severity>: <description>` "
        "(severity: critical, high, medium or low). End with exactly one line, either "
        "`VERDICT: PASS` (nothing exploitable found) or `VERDICT: FAIL`.\n\n"
        f"<task>\n{task}\n</task>\n\n"
        f'<result author="{done.worker_name}">\n{quote(done.output, MAX_QUOTED_OUTPUT_CHARS)}\n</result>'
        + (f"\n\n{block}" if block else "")
    )


def revise(task: str, review: Step, diff: str | None) -> str:
    return (
        "You are the writer in a write-then-review collaboration, revising your own work. A reviewer "
        "read your change and asked for changes. Address each point in the working directory (your "
        "previous edits are still there), then finish with a short summary of what you changed in "
        "this round and why.\n\n"
        f"<task>\n{task}\n</task>\n\n"
        f'<review author="{review.worker_name}">\n{quote(review.output, MAX_QUOTED_OUTPUT_CHARS)}\n</review>\n\n'
        f"{diff_block(diff)}"
    )


def answerer(task: str) -> str:
    return (
        "Answer the question below on your own; other engineers answer it independently and a "
        "synthesizer will compare the answers. Do not modify any file. Be concrete: name files, "
        "functions and trade-offs, and say how sure you are.\n\n"
        f"<question>\n{task}\n</question>"
    )


def synthesis(task: str, answers: list[Step]) -> str:
    quoted = "\n\n".join(
        f'<answer author="{a.worker_name}" model="{a.worker_model}">\n'
        f"{quote(a.output, MAX_QUOTED_OUTPUT_CHARS // max(1, len(answers)))}\n</answer>"
        for a in answers
    )
    return (
        f"You are the synthesizer. {len(answers)} engineers answered the question below independently. "
        "Do not modify any file. Write one answer that is better than each: start with where they "
        "agree, then where they disagree (name who said what and which view you take, and why), then "
        "the combined answer.\n\n"
        f"<question>\n{task}\n</question>\n\n{quoted}"
    )


def contender(task: str) -> str:
    return (
        "Carry out the task below in the working directory. Other engineers do the same task "
        "independently, each in their own copy; a judge will compare the results and keep one. "
        "Finish with a short summary of what you changed and why.\n\n"
        f"<task>\n{task}\n</task>"
    )


def judge(task: str, candidates: list[tuple[str, Step, str]]) -> str:
    share = MAX_QUOTED_DIFF_CHARS // max(1, len(candidates))
    quoted = "\n\n".join(
        f'<candidate label="{label}" author="{step.worker_name}">\n<summary>\n'
        f"{quote(step.output, MAX_QUOTED_OUTPUT_CHARS // max(1, len(candidates)))}\n</summary>\n"
        f"<diff>\n{quote(diff, share)}\n</diff>\n</candidate>"
        for label, step, diff in candidates
    )
    labels = ", ".join(label for label, _, _ in candidates)
    return (
        f"You are the judge. {len(candidates)} engineers did the task below independently; their "
        "changes follow as diffs. Do not modify any file. Compare them for correctness, completeness, "
        "tests, risk and clarity, say what is better and worse in each, and pick the one to keep. End "
        f"with exactly one line `CHOICE: <label>`, where label is one of: {labels}.\n\n"
        f"<task>\n{task}\n</task>\n\n{quoted}"
    )
