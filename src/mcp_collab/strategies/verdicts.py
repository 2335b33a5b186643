"""Verdicts of judging steps: asked for as a schema-shaped answer where the runtime can give one,
else read from the last VERDICT (or CHOICE) line, only in the judge's own words.

``Judgement`` is what a judging step is asked for (its verdicts, whether it lists findings, the
labels a judge picks from): the JSON Schema a runtime hands its vendor, the check of what came back
against it, and the text a structured answer reads as (the same VERDICT / FINDING / CHOICE lines
the prompts ask for, so a reader, the next prompt and the text parser all see one answer).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, create_model

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


@dataclass(frozen=True)
class Reading:
    """What a judging step said: its verdict, findings and choice (each where it was asked for)."""

    reasons: str = ""
    verdict: Verdict | None = None
    findings: list[str] = field(default_factory=list)
    choice: str | None = None


class _Strict(BaseModel):
    # Exactly the schema: no other keys, no coercion ("1" is not 1, a list is not a string).
    model_config = ConfigDict(extra="forbid", strict=True)


@dataclass(frozen=True)
class Judgement:
    """What a judging step is asked for; see the module docstring."""

    verdicts: tuple[Verdict, ...] = ()
    findings: bool = False
    choices: tuple[str, ...] = ()

    def schema(self) -> dict[str, Any]:
        """The JSON Schema of the answer. Every property is required and no other is allowed (the
        Responses API's strict mode requires both); ``reasons`` comes first so that a model writing
        the object in order reasons before it decides."""
        props: dict[str, Any] = {
            "reasons": {
                "type": "string",
                "description": "Your full answer in prose: what you checked, what is right and what is "
                "wrong (name files and lines), and why you decide as you do.",
            }
        }
        if self.findings:
            props["findings"] = {
                "type": "array",
                "items": {"type": "string"},
                "description": "Each vulnerability as '<severity>: <description>' (severity: critical, high, "
                "medium or low); empty when none was found.",
            }
        if self.choices:
            props["choice"] = {
                "type": "string",
                "enum": list(self.choices),
                "description": "The label of the candidate to keep.",
            }
        if self.verdicts:
            props["verdict"] = {"type": "string", "enum": list(self.verdicts), "description": "Your verdict."}
        return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}

    def read(self, value: Any) -> tuple[Reading | None, str | None]:
        """``value`` checked against the schema: the reading and None, or None and what was wrong."""
        if not isinstance(value, dict):
            return None, "the structured answer is not a JSON object"
        try:
            answer = _model(self).model_validate(value).model_dump()
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'the answer'}: {err['msg']}" for err in exc.errors()
            )
            return None, f"the structured answer does not match the schema ({problems})"
        return (
            Reading(
                reasons=answer["reasons"],
                verdict=answer.get("verdict"),
                findings=[f.strip() for f in answer.get("findings", []) if f.strip()],
                choice=answer.get("choice"),
            ),
            None,
        )

    def read_text(self, text: str) -> Reading:
        """The text parser: the last VERDICT and CHOICE lines and every FINDING line of ``text``."""
        verdict: Verdict | None = None
        findings: list[str] = []
        if self.verdicts:
            verdict, findings = parse_verdict(text, self.verdicts)
        choice = parse_choice(text, self.choices) if self.choices else None
        return Reading(reasons=text, verdict=verdict, findings=findings, choice=choice)

    @staticmethod
    def render(reading: Reading) -> str:
        """A structured answer as the text the prompts ask for: the reasons, then one line per finding
        and the CHOICE and VERDICT lines (which the text parser reads back the same)."""
        lines = [f"FINDING: {f}" for f in reading.findings]
        if reading.choice is not None:
            lines.append(f"CHOICE: {reading.choice}")
        if reading.verdict is not None:
            lines.append(f"VERDICT: {reading.verdict.upper()}")
        return "\n\n".join(part for part in (reading.reasons.strip(), "\n".join(lines)) if part)


@functools.cache
def _model(judgement: Judgement) -> type[BaseModel]:
    """The pydantic model that checks an answer against ``judgement.schema()``."""
    fields: dict[str, Any] = {"reasons": (str, ...)}
    if judgement.findings:
        fields["findings"] = (list[str], ...)
    if judgement.choices:
        fields["choice"] = (Literal[judgement.choices], ...)
    if judgement.verdicts:
        fields["verdict"] = (Literal[judgement.verdicts], ...)
    return create_model("StructuredAnswer", __base__=_Strict, **fields)
