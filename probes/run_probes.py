#!/usr/bin/env python3
"""Readiness probes: what this machine can run, written as evidence JSON.

    python probes/run_probes.py                  # non-destructive checks -> fixtures/probes/readiness.json
    python probes/run_probes.py --live           # plus one tiny real call per runtime -> live.json
    python probes/run_probes.py --out DIR        # write the evidence elsewhere

Checks never print or store a credential's value. ``--live`` spends a few tokens per runtime: it
asks each ready runtime to answer "OK" through the same code path a dispatched step takes. Exit
status: 0 when every required check (and every live call made) passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio

from mcp_collab import __version__
from mcp_collab.config import Settings
from mcp_collab.errors import RuntimeFailure
from mcp_collab.models import Worker
from mcp_collab.orchestrator import default_runtimes
from mcp_collab.readiness import ReadinessReport, check
from mcp_collab.runtimes.base import StepRequest

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "fixtures" / "probes"
LIVE_PROMPT = "Reply with the single word OK."
LIVE_TIMEOUT_S = 120.0


def _header() -> dict[str, Any]:
    return {
        "probedAt": datetime.now(UTC).isoformat(timespec="seconds"),
        "mcpCollab": __version__,
        "python": platform.python_version(),
        "platform": platform.system(),
    }


async def live_calls(settings: Settings, report: ReadinessReport) -> list[dict[str, Any]]:
    runtimes = default_runtimes(settings)
    results = []
    with tempfile.TemporaryDirectory(prefix="mcp-collab-probe-") as scratch:
        for readiness in report.runtimes:
            entry: dict[str, Any] = {"runtimeMode": readiness.mode, "workerModel": readiness.worker_model}
            if not readiness.ready:
                entry.update(ok=None, skipped=readiness.reason)
                results.append(entry)
                continue
            worker = Worker(name=f"probe-{readiness.worker_model}", model=readiness.worker_model)  # type: ignore[arg-type]
            request = StepRequest(
                worker=worker, prompt=LIVE_PROMPT, instructions="", access="read_only",
                timeout_s=LIVE_TIMEOUT_S, idle_timeout_s=LIVE_TIMEOUT_S, working_directory=Path(scratch),
            )  # fmt: skip
            try:
                result = await runtimes[readiness.mode].run(request)
            except RuntimeFailure as exc:
                entry.update(ok=False, errorKind=exc.kind, errorCode=exc.code, error=exc.message[:500])
            else:
                entry.update(
                    ok=True,
                    durationMs=result.duration_ms,
                    answer=result.text[:200],
                    usage=result.usage.model_dump(by_alias=True) if result.usage else None,
                )
            results.append(entry)
    for runtime in runtimes.values():
        await runtime.aclose()
    return results


async def main_async(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    report = await check(settings)
    args.out.mkdir(parents=True, exist_ok=True)
    evidence = {**_header(), "report": report.model_dump(mode="json", by_alias=True), "ok": report.ok}
    (args.out / "readiness.json").write_text(json.dumps(evidence, indent=2) + "\n", encoding="utf-8")
    ok = report.ok
    for c in report.checks:
        mark = "ok  " if c.ok else ("FAIL" if c.required else "warn")
        print(f"{mark}  {c.name}: {c.detail}" + (f"  -> {c.hint}" if c.hint and not c.ok else ""))
    if args.live:
        calls = await live_calls(settings, report)
        live = {**_header(), "prompt": LIVE_PROMPT, "calls": calls}
        (args.out / "live.json").write_text(json.dumps(live, indent=2) + "\n", encoding="utf-8")
        for call in calls:
            state = "skip" if call["ok"] is None else ("ok  " if call["ok"] else "FAIL")
            detail = call.get("skipped") or call.get("error") or call.get("answer", "")
            print(f"{state}  live {call['runtimeMode']}/{call['workerModel']}: {detail}")
        ok = ok and all(call["ok"] is not False for call in calls)
    print(f"evidence written to {args.out}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--live", action="store_true", help="make one tiny real call per ready runtime")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"evidence directory (default {DEFAULT_OUT})")
    return anyio.run(main_async, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
