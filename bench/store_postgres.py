"""The PostgreSQL store against the JSON store: persisting a step, persisting a status change (which
moves the list totals both stores keep up to date), a page of 50 with its totals (plain and
filtered), one run by id, at 100 runs and at 100,000.

    .venv/bin/python bench/store_postgres.py [--runs 100000]

It starts a throwaway PostgreSQL cluster on loopback (as the tests do: initdb and pg_ctl, run as the
``postgres`` user when we are root) with fsync on, since the JSON store fsyncs every append. The big
history (runs and their steps' cost rows) is loaded with COPY in one transaction, as a long-lived database looks after its runs.
Targets: a page of 50 at 100,000 runs takes at most 20 ms on either store; persisting a step at
100,000 runs costs at most 2x what it costs at 100 on PostgreSQL (an index lookup, not a scan).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import median, ms, private_dir, ratio
from store_scale import SAVES, T0, a_run, build, measure
from tests.support.postgres import PostgresCluster, missing_reason

from mcp_collab.store import RunStore
from mcp_collab.store.postgres import PostgresStore, _recount_totals, _split


def build_postgres(cluster: PostgresCluster, count: int) -> PostgresStore:
    url = cluster.create_database()
    store = PostgresStore(url)  # migrates the empty database
    template, _ = _split(a_run(0))
    t = time.perf_counter()
    with store._pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
        with cur.copy("COPY runs (id, created_at, status, strategy, workers, record) FROM STDIN") as copy:
            for i in range(count):
                at = T0 + timedelta(seconds=i)
                record = dict(template, id=f"run-{i:07d}", createdAt=at.isoformat().replace("+00:00", "Z"))
                status = "completed" if i % 7 else "failed"
                record["status"] = status
                copy.write_row(
                    (
                        record["id"],
                        at,
                        status,
                        record["strategy"],
                        record["workers"],
                        json.dumps(record, separators=(",", ":")),
                    )
                )
        steps = a_run(0).steps
        columns = "run_id, idx, worker, cost_usd, has_usage, input_tokens, output_tokens, total_tokens"
        with cur.copy(f"COPY run_steps ({columns}) FROM STDIN") as copy:
            for i in range(count):
                for k, step in enumerate(steps):
                    u = step.usage
                    assert u is not None
                    copy.write_row(
                        (
                            f"run-{i:07d}",
                            k,
                            step.worker_name,
                            0.01,
                            True,
                            u.input_tokens,
                            u.output_tokens,
                            u.total_tokens,
                        )
                    )
        _recount_totals(cur)  # the rows went in behind the store's back: count the list totals once
        cur.execute("ANALYZE runs")
        cur.execute("ANALYZE run_steps")
    print(f"PostgreSQL: {count} runs loaded with COPY in {time.perf_counter() - t:.2f} s")
    return store


def measure_ends(store: RunStore, count: int) -> float:
    """Median cost of saves that move the list totals (a run's status flips), not only its record."""
    run = a_run(count + 2)
    saves = []
    for k in range(SAVES):
        run.status = "completed" if k % 2 else "running"
        t = time.perf_counter()
        store.save_run(run)
        saves.append(time.perf_counter() - t)
    return median(saves)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100_000)
    args = parser.parse_args()
    reason = missing_reason()
    if reason is not None:
        print(f"SKIP: {reason}")
        return 2
    with private_dir("store-postgres") as tmp, PostgresCluster(durable=True) as cluster:
        json_small_store = build(tmp / "small", 100)
        json_small = measure(json_small_store, 100) | {"end": measure_ends(json_small_store, 100)}
        json_big_store = build(tmp / "big", args.runs)
        json_big = measure(json_big_store, args.runs) | {"end": measure_ends(json_big_store, args.runs)}
        pg_small_store = build_postgres(cluster, 100)
        pg_small = measure(pg_small_store, 100) | {"end": measure_ends(pg_small_store, 100)}  # type: ignore[arg-type]
        pg_big_store = build_postgres(cluster, args.runs)
        pg_big = measure(pg_big_store, args.runs) | {"end": measure_ends(pg_big_store, args.runs)}  # type: ignore[arg-type]
        pg_small_store.close()
        pg_big_store.close()
    print(f"{'':24}{'JSON 100':>12}{'PG 100':>12}{f'JSON {args.runs}':>14}{f'PG {args.runs}':>14}{'PG/JSON':>10}")
    for key, label in (
        ("save", "persist a step"),
        ("end", "persist a status change"),
        ("page", "page of 50"),
        ("filtered", "page of 50, filtered"),
        ("get", "one run by id"),
    ):
        print(
            f"{label:24}{ms(json_small[key]):>12}{ms(pg_small[key]):>12}{ms(json_big[key]):>14}"
            f"{ms(pg_big[key]):>14}{ratio(pg_big[key], json_big[key]):>10}"
        )
    checks = [
        (pg_big["page"] <= 0.020, f"PostgreSQL page of 50 at {args.runs} runs: {ms(pg_big['page'])} (target <= 20 ms)"),
        (json_big["page"] <= 0.020, f"JSON page of 50 at {args.runs} runs: {ms(json_big['page'])} (target <= 20 ms)"),
        (
            pg_big["save"] <= 2 * pg_small["save"],
            f"PostgreSQL persist at {args.runs} runs: {ratio(pg_big['save'], pg_small['save'])} of at 100 (target <= 2x)",
        ),
    ]
    for ok, what in checks:
        print(f"{'PASS' if ok else 'FAIL'}: {what}")
    return 0 if all(ok for ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
