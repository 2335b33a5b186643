"""The vendor parsers read the real outputs recorded from each CLI version (fixtures/cli_outputs)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mcp_collab.runtimes.cli.vendors import VENDORS, Parsed

RECORDED = Path(__file__).parent.parent / "fixtures" / "cli_outputs"


def parse(model: str, path: Path) -> tuple[Parsed, list[str]]:
    parser = VENDORS[model].parser()
    progress = []
    for line in path.read_text(encoding="utf-8").splitlines():
        message = parser.feed(line.strip())
        if message:
            progress.append(message)
    return parser.parsed, progress


@pytest.mark.parametrize(
    ("model", "recording", "text"),
    [
        (
            "codex_cli",
            "codex/0.169.0/exec_json_happy.jsonl",
            "stub reply from openai model gpt-5.5: Say hello. --version please",
        ),
        (
            "gemini_cli",
            "gemini/0.61.0/stream_json_happy.jsonl",
            "stub reply from gemini model gemini-2.5-flash: Say hello. --version please",
        ),
        (
            "claude_cli",
            "claude/2.1.330/stream_json_happy.jsonl",
            "stub reply from anthropic model claude-sonnet-4-5: Say hello. --version please",
        ),
    ],
)
def test_a_recorded_happy_run_yields_text_usage_and_session(model: str, recording: str, text: str) -> None:
    parsed, progress = parse(model, RECORDED / recording)
    assert parsed.finished and parsed.error is None
    assert parsed.text == text
    assert parsed.usage is not None and parsed.usage.input_tokens == 12 and parsed.usage.output_tokens == 5
    assert parsed.session_id and len(parsed.session_id) >= 16
    assert progress and progress[0].endswith("session started")


@pytest.mark.parametrize(
    ("model", "recording", "fragment"),
    [
        ("codex_cli", "codex/0.169.0/exec_json_500.jsonl", "high demand"),
        ("gemini_cli", "gemini/0.61.0/stream_json_500.jsonl", "stub says 500"),
        ("claude_cli", "claude/2.1.330/stream_json_500.jsonl", "API Error: 500"),
    ],
)
def test_a_recorded_failed_run_yields_the_vendor_error(model: str, recording: str, fragment: str) -> None:
    parsed, _ = parse(model, RECORDED / recording)
    assert parsed.error is not None and fragment in parsed.error


def test_unknown_events_and_non_json_lines_are_ignored() -> None:
    parser = VENDORS["codex_cli"].parser()
    for line in ("warning: something", '{"type":"brand.new.event","x":1}', "[1,2]", "{not json"):
        assert parser.feed(line) is None
    assert not parser.parsed.finished and parser.parsed.events == 1
