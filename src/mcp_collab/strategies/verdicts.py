"""Verdicts of judging steps: read from the last VERDICT line, only in the judge's own words."""

from __future__ import annotations

import re
from collections.abc import Sequence

from ..models import Verdict

# A verdict line: "VERDICT: APPROVE", "**Verdict:** request changes", "`VERDICT: PASS`". The words after
# the separator are kept whole, so the last verdict line decides even when it says something else.
_VERDICT = re.compile(r"^[\W_]*verdict[\W_]*[:=-][\W_]*(.*)$", re.I | re.M)
_VERDICT_WORD = re.compile(r"(approve|request[ _-]?changes|pass|fail)(?![\w-])", re.I)
_FINDING = re.compile(r"^[\W_]*finding[\W_]*:\s*(.+?)\s*$", re.I | re.M)
# The verdicts that let work through; any other (a failing one, or unknown) should stop it.
PASSING_VERDICTS: frozenset[Verdict] = frozenset({"approve", "pass"})
REVIEW_VERDICTS: tuple[Verdict, ...] = ("approve", "request_changes")
REDTEAM_VERDICTS: tuple[Verdict, ...] = ("pass", "fail")


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


_CHOICE = re.compile(r"^[\W_]*choice[\W_]*[:=-][\W_]*([A-Za-z0-9._-]+)", re.I | re.M)


def parse_choice(text: str, labels: Sequence[str]) -> str | None:
    """The label of the last CHOICE line, if it names one of ``labels``."""
    found = _CHOICE.findall(text)
    if not found:
        return None
    said = found[-1].strip("`*.")
    return said if said in labels else None
