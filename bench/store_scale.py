"""Store cost at scale: persisting a step with 100 runs vs 100,000; a page of 50; one run by id.

    .venv/bin/python bench/store_scale.py [--runs 100000]

Targets: persisting a step at 100,000 runs costs at most 2x what it costs at 100 (median of
repeated saves); a page of 50 from list_runs at 100,000 runs takes at most 20 ms; reading one run by
id takes about the same at both sizes (it does not scan the history). The big store is written
directly in the log format (one line per run), as a long-lived store looks after compaction.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median, ms, private_dir, ratio

from mcp_collab.models import Attempt, Run, Step, Usage
from mcp_collab.store import STORE_SCHEMA_VERSION, JsonStore, RunFilter
from mcp_collab.store.json_store import _record

SAVES = 300
PAGES = 50
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def a_run(i: int) -> Run:
    at = T0 + timedelta(seconds=i)
    steps = [
        Step(
            index=k, role=role, worker_name=name, worker_model=model, runtime_mode="cli", status="completed",  # type: ignore[arg-type]
            attempts=[Attempt(runtime_mode="cli", status="completed", started_at=at, ended_at=at, duration_ms=900)],
            usage=Usage(input_tokens=1200, output_tokens=300, total_tokens=1500), session_id=f"s-{i}-{k}",
            output=f"step {k} of run {i}: " + "all done. " * 40, exit_code=0,
        )
        for k, (role, name, model) in enumerate([("writer", "codex-writer", "codex_cli"), ("reviewer", "gemini-review", "gemini_cli")])
    ]  # fmt: skip
    return Run(
        id=f"run-{i:07d}", task=f"task number {i}: make the parser accept empty input", strategy="codex_writes_gemini_reviews",
        status="completed" if i % 7 else "failed", created_at=at, started_at=at, ended_at=at,
        workers=["codex-writer", "gemini-review"], steps=steps, result=steps[-1].output, verdict="approve",
    )  # fmt: skip


def build(directory: Path, count: int) -> JsonStore:
    directory.mkdir(parents=True)
    with open(directory / "runs.jsonl", "w", encoding="utf-8") as fh:
        fh.write(json.dumps({"schemaVersion": STORE_SCHEMA_VERSION, "kind": "mcp-collab-store"}) + "\n")
        template = _record(a_run(0))
        for i in range(count):
            record = dict(
                template, id=f"run-{i:07d}", createdAt=(T0 + timedelta(seconds=i)).isoformat().replace("+00:00", "Z")
            )
            fh.write(json.dumps({"op": "run", "run": record, "outputs": []}, separators=(",", ":")) + "\n")
    return JsonStore(directory)


def measure(store: JsonStore, count: int) -> dict[str, float]:
    run = a_run(count + 1)
    saves = []
    for k in range(SAVES):
        run.steps[0].session_id = f"save-{k}"  # a step's new state, persisted
        t = time.perf_counter()
        store.save_run(run)
        saves.append(time.perf_counter() - t)
    pages = []
    for _ in range(PAGES):
        t = time.perf_counter()
        page = store.list_runs(RunFilter(), 50, None)
        pages.append(time.perf_counter() - t)
        assert len(page.runs) == 50
    filtered = []
    for _ in range(PAGES):
        t = time.perf_counter()
        store.list_runs(RunFilter(status="failed"), 50, None)
        filtered.append(time.perf_counter() - t)
    gets = []
    for k in range(PAGES):
        t = time.perf_counter()
        assert store.get_run(f"run-{(k * 7919) % count:07d}") is not None
        gets.append(time.perf_counter() - t)
    return {"save": median(saves), "page": median(pages), "filtered": median(filtered), "get": median(gets)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100_000)
    args = parser.parse_args()
    with private_dir("store-scale") as tmp:
        small = measure(build(tmp / "small", 100), 100)
        t = time.perf_counter()
        big_store = build(tmp / "big", args.runs)
        load = time.perf_counter() - t
        big = measure(big_store, args.runs)
        size = (tmp / "big" / "runs.jsonl").stat().st_size
    print(f"store of {args.runs} runs: {size / 1e6:.0f} MB log, written and indexed in {load:.2f} s")
    print(f"{'':24}{'100 runs':>12}{f'{args.runs} runs':>16}{'ratio':>10}")
    for key, label in (
        ("save", "persist a step"),
        ("page", "page of 50"),
        ("filtered", "page of 50, filtered"),
        ("get", "one run by id"),
    ):
        print(f"{label:24}{ms(small[key]):>12}{ms(big[key]):>16}{ratio(big[key], small[key]):>10}")
    checks = [
        (
            big["save"] <= 2 * small["save"],
            f"persist a step at {args.runs} runs: {ratio(big['save'], small['save'])} of at 100 (target <= 2x)",
        ),
        (big["page"] <= 0.020, f"page of 50 at {args.runs} runs: {ms(big['page'])} (target <= 20 ms)"),
        (
            big["get"] <= 2 * small["get"] + 0.001,
            f"one run by id at {args.runs} runs: {ratio(big['get'], small['get'])} of at 100",
        ),
    ]
    for ok, what in checks:
        print(f"{'PASS' if ok else 'FAIL'}: {what}")
    return 0 if all(ok for ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
