"""What every run store promises, the same tests over each backend: the JSON log and PostgreSQL.

Workers, runs, paging newest first with cursors, filters, retention that never touches unfinished
runs, long outputs kept whole, a step's stashed texts (kept until dropped, pruned with the run),
records from a newer version tolerated, concurrent writers in several processes losing no update,
and leases: taken, renewed, lapsed for good, fencing the saves of a run its owner lost, and exactly
one of several processes recovering one run.
"""

from __future__ import annotations

import json
import multiprocessing
import queue as queue_mod
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from mcp_collab.config import Settings
from mcp_collab.errors import InvalidRequestError, LeaseLostError, RunTakenOverError, StoreError
from mcp_collab.models import Lease, Run, RunOwner, RunWorktree, Usage, Worker
from mcp_collab.store import JsonStore, RunFilter, RunStore, StepTexts, cursor_after, describe_store, open_store
from mcp_collab.store.postgres import PostgresStore
from tests.conftest import quick_vendor_clis
from tests.test_store import a_run

LONG = 2_000  # the preview both stores keep in a run's record; longer texts are stored apart
# Runs each writer process saves in the concurrency test: enough that their writes interleave.
WRITES_PER_PROCESS = 40
# Seconds a writer process may take before the test gives up on it (a hang, not a timing).
PROCESS_DEADLINE_S = 90

StoreMaker = Callable[[], RunStore]


@pytest.fixture(params=["json", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """(kind, where): a JSON state directory or a fresh PostgreSQL database."""
    if request.param == "json":
        yield ("json", str(tmp_path / "state"))
    else:
        yield ("postgres", request.getfixturevalue("postgres_url"))


def open_backend(kind: str, where: str) -> RunStore:
    if kind == "json":
        return JsonStore(Path(where))
    return open_store(Settings.from_env({"MCP_COLLAB_STATE_DIR": "/nonexistent", "MCP_COLLAB_STORE_URL": where}))


@pytest.fixture
def new_store(backend: tuple[str, str]) -> Iterator[StoreMaker]:
    """Opens another store object over the same history (as a second server process would)."""
    opened: list[RunStore] = []

    def make() -> RunStore:
        store = open_backend(*backend)
        opened.append(store)
        return store

    yield make
    for store in opened:
        close = getattr(store, "close", None)
        if close is not None:
            close()


def every_run(store: RunStore, filter: RunFilter | None = None, limit: int = 7) -> list[str]:
    ids: list[str] = []
    cursor = None
    while True:
        page = store.list_runs(filter or RunFilter(), limit, cursor)
        ids += [r.id for r in page.runs]
        cursor = page.next_cursor
        if cursor is None:
            return ids


def test_a_run_and_a_worker_come_back_as_saved_through_another_store(new_store: StoreMaker) -> None:
    first = new_store()
    first.check_writable()
    first.add_worker(Worker(name="w1", model="codex_cli"))
    run = a_run(1)
    run.findings = ["one", "two"]
    first.save_run(run)
    second = new_store()
    assert second.get_run("run-00001") == run
    assert second.get_worker("w1") == first.get_worker("w1")
    assert [w.name for w in second.list_workers()] == ["w1"]
    assert second.get_run("run-nope") is None and second.get_worker("nobody") is None


def test_a_later_save_replaces_the_run(new_store: StoreMaker) -> None:
    store = new_store()
    store.save_run(a_run(7, status="running"))
    done = a_run(7)
    done.result = "finished"
    store.save_run(done)
    assert store.get_run("run-00007") == done
    assert every_run(new_store()) == ["run-00007"]


def test_workers_are_listed_in_the_order_added_and_a_taken_name_is_refused(new_store: StoreMaker) -> None:
    store = new_store()
    for name in ("b", "a", "c"):
        store.add_worker(Worker(name=name, model="codex_cli"))
    with pytest.raises(InvalidRequestError, match="already exists"):
        new_store().add_worker(Worker(name="a", model="gemini_cli"))
    assert [(w.name, w.model) for w in store.list_workers()] == [
        ("b", "codex_cli"),
        ("a", "codex_cli"),
        ("c", "codex_cli"),
    ]
    removed = store.remove_worker("a")
    assert removed is not None and removed.name == "a"
    assert store.remove_worker("a") is None
    assert [w.name for w in new_store().list_workers()] == ["b", "c"]
    store.add_worker(Worker(name="a", model="gemini_cli"))  # a removed name is free again
    assert store.get_worker("a").model == "gemini_cli"  # type: ignore[union-attr]


def test_runs_page_newest_first_across_pages_with_cursors(new_store: StoreMaker) -> None:
    store = new_store()
    store.save_runs([a_run(i) for i in range(23)])
    same_time = [a_run(100 + i) for i in range(3)]
    for run in same_time:  # runs created in the same microsecond page by id, none skipped or repeated
        run.created_at = datetime(2027, 1, 1, tzinfo=UTC)
    store.save_runs(same_time)
    newest = ["run-00102", "run-00101", "run-00100"] + [f"run-{i:05d}" for i in reversed(range(23))]
    assert every_run(store, limit=5) == newest
    assert every_run(new_store(), limit=100) == newest
    first = store.list_runs(RunFilter(), 10, None)
    assert first.next_cursor == cursor_after(first.runs[-1]), "cursors are the same whichever store issued them"
    assert store.list_runs(RunFilter(), 26, None).next_cursor is None
    with pytest.raises(InvalidRequestError, match="nextCursor"):
        store.list_runs(RunFilter(), 10, "%%%garbage")
    with pytest.raises(InvalidRequestError, match="nextCursor"):
        store.list_runs(RunFilter(), 10, "bm90IGEgdGltZXxydW4tMQ")  # base64 of "not a time|run-1"


def test_filters_by_status_strategy_and_worker_page_too(new_store: StoreMaker) -> None:
    store = new_store()
    for i in range(30):
        store.save_run(
            a_run(
                i,
                status="failed" if i % 5 == 0 else "completed",
                strategy="consensus" if i % 3 == 0 else "single_worker",
                worker="w2" if i >= 20 else "w1",
            )
        )
    assert every_run(store, RunFilter(status="failed"), limit=2) == [f"run-{i:05d}" for i in (25, 20, 15, 10, 5, 0)]
    assert every_run(store, RunFilter(strategy="consensus"), limit=3) == [
        f"run-{i:05d}" for i in reversed(range(0, 30, 3))
    ]
    assert every_run(store, RunFilter(worker="w2"), limit=4) == [f"run-{i:05d}" for i in reversed(range(20, 30))]
    both = RunFilter(status="failed", strategy="consensus", worker="w1")
    assert every_run(store, both) == ["run-00015", "run-00000"]
    assert store.list_runs(RunFilter(worker="nobody"), 10, None).runs == []


def test_unfinished_runs_are_the_queued_and_running_ones(new_store: StoreMaker) -> None:
    store = new_store()
    store.save_runs([a_run(1, status="queued"), a_run(2, status="running"), a_run(3), a_run(4, status="cancelled")])
    assert sorted(r.id for r in new_store().unfinished_runs()) == ["run-00001", "run-00002"]
    store.save_run(a_run(2, status="interrupted"))
    assert [r.id for r in store.unfinished_runs()] == ["run-00001"]


def test_the_open_runs_on_temporal_are_counted_by_their_workers_queue(new_store: StoreMaker) -> None:
    def on(queue: str, i: int, status: str) -> Run:
        run = a_run(i, status=status, output="a raw \x00 NUL in the record")
        run.owner = RunOwner(host="h", pid=1, engine="temporal", queue=queue)
        return run

    store = new_store()
    store.save_runs([on("alpha", 1, "queued"), on("alpha", 2, "running"), on("beta", 3, "queued")])
    store.save_runs([on("alpha", 4, "completed"), a_run(5, status="queued")])  # ended; on this server's engine
    assert new_store().open_runs_by_queue() == {"alpha": 2, "beta": 1}
    store.save_run(on("alpha", 2, "failed"))
    new_store().save_run(on("beta", 3, "running"))
    assert store.open_runs_by_queue() == {"alpha": 1, "beta": 1}
    store.save_run(on("alpha", 1, "cancelled"))
    assert store.open_runs_by_queue() == {"beta": 1}


def test_prune_by_count_and_age_never_touches_unfinished_runs(new_store: StoreMaker) -> None:
    store = new_store()
    for i in range(10):
        store.save_run(a_run(i, status="running" if i in (0, 4) else "completed", output="o" * (LONG + 1)))
    pruned = store.prune(max_runs=3, max_age_days=None)
    assert pruned == ["run-00001", "run-00002", "run-00003", "run-00005", "run-00006"]
    assert every_run(store) == ["run-00009", "run-00008", "run-00007", "run-00004", "run-00000"]
    assert store.get_run("run-00001") is None
    now = datetime(2026, 1, 1, 0, 0, 9, tzinfo=UTC) + timedelta(days=1)
    aged = store.prune(max_runs=None, max_age_days=1, now=now)  # type: ignore[call-arg]
    assert aged == ["run-00007", "run-00008"]
    assert every_run(new_store()) == ["run-00009", "run-00004", "run-00000"]
    assert store.prune(max_runs=0, max_age_days=None) == ["run-00009"]
    assert sorted(r.id for r in store.unfinished_runs()) == ["run-00000", "run-00004"]
    assert store.get_run("run-00000").steps[0].output == "o" * (LONG + 1)  # type: ignore[union-attr]
    assert store.prune(max_runs=None, max_age_days=None) == []


def test_long_outputs_and_diffs_come_back_whole_and_pages_carry_previews(new_store: StoreMaker) -> None:
    store = new_store()
    big = "x" * (LONG * 5) + "the end \u00e9\u4e2d\0 nul"
    run = a_run(1, output=big)
    run.worktrees = [
        RunWorktree(path="/w/a", branch="b", entry="a", git_dir="/r/.git", base_commit="0" * 40, diff="d" * (LONG * 3))
    ]
    store.save_run(run)
    store.save_run(run)  # a later save keeps it whole too
    again = new_store().get_run("run-00001")
    assert again is not None and again.steps[0].output == big and again.worktrees[0].diff == "d" * (LONG * 3)
    listed = store.list_runs(RunFilter(), 10, None).runs[0]
    assert listed.steps[0].output == big[:LONG], "a page carries previews, not whole outputs"
    shorter = a_run(1, output="short now")
    store.save_run(shorter)
    assert store.get_run("run-00001") == shorter, "a text that is short again is not replaced by the old long one"


def test_a_stash_is_kept_whole_until_dropped_and_goes_with_its_run(new_store: StoreMaker) -> None:
    """What a Temporal worker keeps of a step too long to travel, until the run's save takes it."""
    store = new_store()
    big = StepTexts(0, "x" * (LONG * 5) + "the end \u00e9\u4e2d\0 nul", "d" * (LONG * 3), False)
    assert not store.stash_texts("run-00001", big), "no such run: nothing is kept"
    store.save_runs([a_run(1, status="running"), a_run(2), a_run(3, status="running")])
    assert store.stash_texts("run-00001", StepTexts(0, "a first try", "", True))
    assert store.stash_texts("run-00001", big), "a stash of the same step replaces the first"
    assert store.stash_texts("run-00001", StepTexts(2, "two", "", True))
    assert store.stash_texts("run-00002", StepTexts(0, "of another run", "", False))
    assert store.stash_texts("run-00003", StepTexts(0, "of a run still going", "", False))
    other = new_store()
    assert other.stashed_texts("run-00001", [2, 1, 0]) == [big, StepTexts(2, "two", "", True)]
    assert other.stashed_texts("run-00001", []) == [] and other.stashed_texts("run-nope", [0]) == []
    assert other.get_run("run-00001") == a_run(1, status="running"), "a stash is not part of its run"
    other.drop_stashes("run-00001", [0, 1])
    other.drop_stashes("run-00001", [0])  # gone already: nothing happens
    assert store.stashed_texts("run-00001", [0, 2]) == [StepTexts(2, "two", "", True)]
    store.save_run(a_run(1))
    assert store.prune(max_runs=0, max_age_days=None) == ["run-00001", "run-00002"]
    assert store.stashed_texts("run-00001", [2]) == [] and store.stashed_texts("run-00002", [0]) == []
    assert [t.output for t in store.stashed_texts("run-00003", [0])] == ["of a run still going"]
    store.save_run(a_run(1, status="running"))
    assert store.stashed_texts("run-00001", [0, 2]) == [], "a run saved again under a pruned id has no stash"


def write_as_a_newer_version(kind: str, where: str, run: Run) -> None:
    """Store ``run`` as a newer mcp-collab would: its record carries fields this version does not know."""
    record = {**run.model_dump(mode="json", by_alias=True), "someFutureField": {"x": 1}}
    record["steps"][0]["futureStepField"] = True
    if kind == "json":
        with open(Path(where) / "runs.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"op": "run", "run": record, "outputs": []}) + "\n")
    else:
        import psycopg

        with psycopg.connect(where, autocommit=True) as conn:
            conn.execute("UPDATE runs SET record = %s WHERE id = %s", (json.dumps(record), run.id))


def test_a_field_from_a_newer_version_is_tolerated(backend: tuple[str, str], new_store: StoreMaker) -> None:
    store = new_store()
    store.save_run(a_run(1, status="running"))
    write_as_a_newer_version(*backend, a_run(1))
    reader = new_store()
    assert reader.get_run("run-00001") == a_run(1)
    assert [r.id for r in reader.list_runs(RunFilter(), 5, None).runs] == ["run-00001"]


def test_a_batch_lands_whole(new_store: StoreMaker) -> None:
    store = new_store()
    store.save_runs([a_run(i) for i in range(5)])
    batch = [a_run(i, status="failed") for i in range(5)]
    store.save_runs(batch)
    assert [r.status for r in new_store().list_runs(RunFilter(), 10, None).runs] == ["failed"] * 5
    store.save_runs([a_run(i, status="running") for i in range(2)], durable=False)  # intermediate states
    assert [r.status for r in new_store().list_runs(RunFilter(), 10, None).runs] == ["failed"] * 3 + ["running"] * 2


def test_a_run_saved_at_once_reads_like_any_and_a_sync_makes_every_save_durable(new_store: StoreMaker) -> None:
    store = new_store()
    store.save_run(a_run(1))
    queued = a_run(2, status="queued")
    if not store.save_runs_now([queued]):  # not at once: nothing was written, and the caller saves it off the loop
        assert new_store().get_run("run-00002") is None
        store.save_runs([queued], durable=False)
    store.save_runs([a_run(3, status="running")], durable=False)
    store.sync()
    reader = new_store()
    assert reader.get_run("run-00002") == queued and reader.get_run("run-00003") == a_run(3, status="running")


def _writer(kind: str, where: str, name: str, start: Any, results: Any) -> None:
    """One process: waits for the start, then adds its worker, tries the shared name, and saves its runs."""
    store = open_backend(kind, where)
    start.wait(PROCESS_DEADLINE_S)
    store.add_worker(Worker(name=name, model="codex_cli"))
    try:
        store.add_worker(Worker(name="shared", model="codex_cli"))
        won = True
    except InvalidRequestError:
        won = False
    offset = 0 if name == "a" else 1
    for i in range(WRITES_PER_PROCESS):
        run = a_run(2 * i + offset, worker=name)
        store.save_run(run)
        if i % 10 == 0:  # each also keeps re-saving the common run: a batch with one of its own
            common = a_run(99_999, worker=name)
            store.save_runs([common, a_run(2 * i + offset, status="failed", worker=name)])
    results.put((name, won))


def test_two_processes_writing_at_once_lose_no_update(backend: tuple[str, str], new_store: StoreMaker) -> None:
    new_store().check_writable()  # created (and migrated) before the writers race
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    results = ctx.Queue()
    writers = [ctx.Process(target=_writer, args=(*backend, name, start, results)) for name in ("a", "b")]
    for process in writers:
        process.start()
    start.set()
    outcomes = {}
    try:
        for _ in writers:
            name, won = results.get(timeout=PROCESS_DEADLINE_S)
            outcomes[name] = won
    except queue_mod.Empty:
        pytest.fail(f"a writer process did not finish: exit codes {[p.exitcode for p in writers]}")
    finally:
        for process in writers:
            process.join(PROCESS_DEADLINE_S)
    assert sorted(outcomes.values()) == [False, True], "exactly one process got the shared worker name"
    for filter in (RunFilter(), RunFilter(worker="a"), RunFilter(status="failed", worker="b")):
        assert listed_totals(new_store(), filter) == reference_totals(new_store(), filter), "the totals kept up"
    store = new_store()
    assert sorted(w.name for w in store.list_workers()) == ["a", "b", "shared"]
    ids = every_run(store, limit=50)
    assert len(ids) == 2 * WRITES_PER_PROCESS + 1 and len(set(ids)) == len(ids)
    for i in range(2 * WRITES_PER_PROCESS):
        run = store.get_run(f"run-{i:05d}")
        assert run is not None and run.workers == ["a" if i % 2 == 0 else "b"]
        last_saved = "failed" if (i // 2) % 10 == 0 else "completed"
        assert run.status == last_saved, "each process's last save of a run is the one kept"


def test_doctor_names_the_backend_and_never_the_password(postgres_url: str, tmp_path: Path) -> None:
    import anyio

    from mcp_collab import readiness

    secret_url = postgres_url.replace("postgres@", "postgres:s3cret-pw@")
    quick = quick_vendor_clis()  # doctor's CLI rows are not the point (the real gemini takes 2 s to answer)
    settings = Settings.from_env({"MCP_COLLAB_STATE_DIR": str(tmp_path), "MCP_COLLAB_STORE_URL": secret_url, **quick})
    assert "s3cret-pw" not in repr(settings)
    assert describe_store(settings).startswith("PostgreSQL at postgresql://postgres@127.0.0.1:")
    report = anyio.run(readiness.check, settings)
    [check] = [c for c in report.checks if c.name == "store"]
    assert check.ok and "reachable" in check.detail and "s3cret-pw" not in check.detail
    down = "postgresql://postgres:s3cret-pw@127.0.0.1:1/nowhere"
    settings = Settings.from_env({"MCP_COLLAB_STATE_DIR": str(tmp_path), "MCP_COLLAB_STORE_URL": down, **quick})
    [check] = [c for c in anyio.run(readiness.check, settings).checks if c.name == "store"]
    assert not check.ok and "127.0.0.1:1/nowhere" in check.detail and "s3cret-pw" not in check.detail
    with pytest.raises(
        StoreError, match=r"cannot open the run store postgresql://postgres@127\.0\.0\.1:1/nowhere"
    ) as err:
        open_store(settings)
    assert "s3cret-pw" not in str(err.value) and "\n" not in str(err.value)


def test_the_command_keeps_runs_in_the_database_the_url_names(
    base_env: dict[str, str], postgres_url: str, tmp_path: Path
) -> None:
    from tests.conftest import fake_cli
    from tests.test_cli import mc

    env = {
        **base_env,
        "MCP_COLLAB_CODEX_BIN": fake_cli("slow"),
        "CODEX_FAKE_SECONDS": "0.1",
        "MCP_COLLAB_STORE_URL": postgres_url,
    }
    assert mc(env, "workers", "add", "w", "--model", "codex_cli").returncode == 0
    done = mc(env, "dispatch", "write the parser", "--json")
    assert done.returncode == 0, done.stderr
    run_id = json.loads(done.stdout)["id"]
    assert not (tmp_path / "state" / "runs.jsonl").exists(), "nothing went to the JSON store"
    with PostgresStore(postgres_url) as store:  # what another host would read
        stored = store.get_run(run_id)
    assert stored is not None and stored.status == "completed" and stored.workers == ["w"]
    assert run_id in mc(env, "runs").stdout
    # The real gemini CLI takes 2 s to say its version: the fake answers for it.
    doctor = mc({**env, "MCP_COLLAB_GEMINI_BIN": fake_cli("ok")}, "doctor")
    assert "store" in doctor.stdout and "PostgreSQL" in doctor.stdout


def test_a_bad_store_url_is_refused_without_echoing_it(base_env: dict[str, str]) -> None:
    from tests.test_cli import mc, one_line_refusal

    for bad in ("mysql://u:hunter2pw@h/db", "postgresql://u:hunter2pw@h:99999/db", "postgresql://u:hunter2pw@h"):
        refusal = one_line_refusal(mc({**base_env, "MCP_COLLAB_STORE_URL": bad}, "runs"))
        assert "MCP_COLLAB_STORE_URL" in refusal and "postgresql://user:password@host:5432/dbname" in refusal
        assert "hunter2pw" not in refusal
    unreachable = {**base_env, "MCP_COLLAB_STORE_URL": "postgresql://u:hunter2pw@127.0.0.1:1/db"}
    refusal = mc(unreachable, "runs")
    assert refusal.returncode != 0 and "Traceback" not in refusal.stderr
    assert "postgresql://u@127.0.0.1:1/db" in refusal.stderr and "hunter2pw" not in refusal.stderr


def test_a_list_totals_tokens_and_dollars_over_every_matching_run(new_store: StoreMaker) -> None:
    store = new_store()
    for i in range(6):
        run = a_run(i, worker="w2" if i % 2 else "w1", status="failed" if i == 5 else "completed")
        run.steps[0].usage = Usage(input_tokens=100, output_tokens=10 * i)
        run.steps[0].cost_usd = None if i == 4 else 0.25
        run.steps[0].diff = "+" * (LONG * 2) if i == 0 else ""
        store.save_run(run)
    whole = store.list_runs(RunFilter(), 2, None).totals
    assert whole is not None and whole.runs == 6 and whole.cost_usd == 1.25 and whole.uncosted_steps == 1
    assert whole.usage.input_tokens == 600 and whole.usage.output_tokens == 150 and whole.usage.reasoning_tokens is None
    of_w2 = new_store().list_runs(RunFilter(worker="w2"), 1, None).totals
    assert of_w2 is not None and (of_w2.runs, of_w2.cost_usd, of_w2.usage.output_tokens) == (3, 0.75, 90)
    failed = store.list_runs(RunFilter(status="failed"), 1, None).totals
    assert failed is not None and failed.runs == 1 and failed.usage.output_tokens == 50
    assert store.get_run("run-00000").steps[0].diff == "+" * (LONG * 2)  # type: ignore[union-attr]


# -- leases: which server processes are alive, and who may write a run ----------------------------

# Seconds a lease lives in these tests when it must outlive the test.
LONG_TTL_S = 600.0
# Processes racing to recover one run.
RECOVERERS = 4


def a_lease(kind: str = "server", **fields: Any) -> Lease:
    return Lease(kind=kind, host="host-a", pid=4242, start_ticks=7, **fields)  # type: ignore[arg-type]


def owned(run: Run, lease: str | None, pid: int = 4242) -> Run:
    run.owner = RunOwner(host="host-a", pid=pid, start_ticks=7, lease=lease)
    return run


def test_a_lease_is_taken_renewed_seen_by_others_and_dropped(new_store: StoreMaker) -> None:
    store, other = new_store(), new_store()
    taken = store.renew_lease(a_lease(), LONG_TTL_S)
    assert taken.started_at is not None and taken.expires_at is not None and taken.expires_at > taken.started_at
    worker = store.renew_lease(a_lease("worker", queue="gpu", roots=["/srv/repos", "/home/x"], slots=3), LONG_TTL_S)
    assert other.lease_alive(taken.id) and other.lease_alive(worker.id)
    assert [lease.id for lease in other.live_leases("server")] == [taken.id]
    [seen] = other.live_leases("worker")
    assert (seen.queue, seen.roots, seen.slots) == ("gpu", ["/srv/repos", "/home/x"], 3)
    assert (seen.pid, seen.start_ticks) == (4242, 7)
    assert {lease.id for lease in other.live_leases()} == {taken.id, worker.id}
    renewed = store.renew_lease(taken, LONG_TTL_S)
    assert renewed.id == taken.id and renewed.started_at == taken.started_at
    assert renewed.expires_at is not None and renewed.expires_at > taken.expires_at
    other.drop_lease(taken.id)
    other.drop_lease(taken.id)  # gone already: nothing happens
    assert not store.lease_alive(taken.id) and [v.id for v in store.live_leases()] == [worker.id]
    with pytest.raises(LeaseLostError, match="lapsed"):
        store.renew_lease(renewed, LONG_TTL_S)  # a dropped lease is not taken back
    assert not store.lease_alive("no-such-lease")


def test_a_lapsed_lease_is_dead_to_everyone_and_never_taken_back(new_store: StoreMaker) -> None:
    store = new_store()
    # A TTL of 0 lapses the moment it is granted, by the store's own clock: no waiting on time.
    lapsed = store.renew_lease(a_lease(), 0)
    alive = store.renew_lease(a_lease(), LONG_TTL_S)
    reader = new_store()
    assert not reader.lease_alive(lapsed.id) and reader.lease_alive(alive.id)
    assert [lease.id for lease in reader.live_leases()] == [alive.id]
    with pytest.raises(LeaseLostError, match=f"{lapsed.id}.*lapsed before it was renewed"):
        reader.renew_lease(lapsed, LONG_TTL_S)
    assert not store.lease_alive(lapsed.id), "the refused renewal did not bring it back"
    assert store.renew_lease(alive, LONG_TTL_S).id == alive.id, "a live one is still renewed"


def test_a_recovered_run_is_never_written_again_by_the_owner_that_lost_it(new_store: StoreMaker) -> None:
    owner, recoverer = new_store(), new_store()
    owner.save_run(owned(a_run(1, status="running"), "lease-a"))
    owner.save_run(owned(a_run(2, status="running"), "lease-a"))
    recovered = owned(a_run(1, status="interrupted"), "lease-b", pid=5151)
    assert not recoverer.take_over_run(recovered, "lease-other"), "only from the lease it was orphaned under"
    assert recoverer.take_over_run(recovered, "lease-a")
    late = owned(a_run(1, status="interrupted"), "lease-c", pid=6161)
    assert not new_store().take_over_run(late, "lease-a"), "it was recovered already"
    with pytest.raises(RunTakenOverError, match="run-00001 was recovered by another server"):
        owner.save_runs([owned(a_run(1), "lease-a"), owned(a_run(2), "lease-a")])  # the owner, resumed
    reader = new_store()
    assert reader.get_run("run-00001") == recovered, "the recovered state stands"
    assert reader.get_run("run-00002") == owned(a_run(2), "lease-a"), "the rest of the batch landed"
    with pytest.raises(RunTakenOverError):
        owner.save_run(owned(a_run(1, status="running"), "lease-a"))
    assert reader.get_run("run-00001") == recovered
    assert [r.id for r in reader.unfinished_runs()] == []
    again = owned(a_run(1), "lease-b", pid=5151)
    again.result = "applied by whoever reads it now"
    new_store().save_run(again)  # its new owner's lease is the one stored: saved
    assert reader.get_run("run-00001") == again


def test_a_run_stored_before_leases_is_recovered_from_its_leaseless_owner(new_store: StoreMaker) -> None:
    store = new_store()
    store.save_run(owned(a_run(1, status="queued"), None))
    store.save_run(owned(a_run(1, status="running"), None))  # an old owner saves as before
    assert not store.take_over_run(owned(a_run(1, status="interrupted"), "lease-b"), "lease-a")
    assert new_store().take_over_run(owned(a_run(1, status="interrupted"), "lease-b"), None)
    stored = store.get_run("run-00001")
    assert stored is not None and stored.status == "interrupted" and stored.owner is not None
    assert stored.owner.lease == "lease-b"


def _recoverer(kind: str, where: str, pid: int, start: Any, results: Any) -> None:
    store = open_backend(kind, where)
    start.wait(PROCESS_DEADLINE_S)
    won = store.take_over_run(owned(a_run(1, status="interrupted"), f"lease-{pid}", pid=pid), "lease-a")
    results.put((pid, won))


def test_of_processes_recovering_one_run_at_once_exactly_one_does(
    backend: tuple[str, str], new_store: StoreMaker
) -> None:
    new_store().save_run(owned(a_run(1, status="running"), "lease-a"))
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    results = ctx.Queue()
    racers = [ctx.Process(target=_recoverer, args=(*backend, 100 + i, start, results)) for i in range(RECOVERERS)]
    for process in racers:
        process.start()
    start.set()
    outcomes = {}
    try:
        for _ in racers:
            pid, won = results.get(timeout=PROCESS_DEADLINE_S)
            outcomes[pid] = won
    except queue_mod.Empty:
        pytest.fail(f"a recovering process did not finish: exit codes {[p.exitcode for p in racers]}")
    finally:
        for process in racers:
            process.join(PROCESS_DEADLINE_S)
    [winner] = [pid for pid, won in outcomes.items() if won]
    stored = new_store().get_run("run-00001")
    assert stored is not None and stored.owner is not None
    assert (stored.status, stored.owner.pid, stored.owner.lease) == ("interrupted", winner, f"lease-{winner}")


def test_a_database_of_an_earlier_schema_is_migrated_at_open_keeping_its_runs(postgres_url: str) -> None:
    import psycopg

    from mcp_collab.store import postgres

    run = owned(a_run(1, status="running"), None)
    run.steps[0].cost_usd, run.steps[0].usage = 0.5, Usage(input_tokens=10)
    with psycopg.connect(postgres_url, autocommit=True) as conn, conn.transaction():  # as the first release left it
        conn.execute(
            "CREATE TABLE schema_migrations (version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for statement in postgres.MIGRATIONS[0]:
            conn.execute(statement)  # type: ignore[arg-type]  # our own constant SQL
        conn.execute("INSERT INTO schema_migrations (version) VALUES (1)")
        conn.execute(
            "INSERT INTO runs (id, created_at, status, strategy, workers, record) VALUES (%s, %s, %s, %s, %s, %s)",
            (run.id, run.created_at, run.status, run.strategy, run.workers, run.model_dump_json(by_alias=True)),
        )
        conn.execute(
            "INSERT INTO run_steps (run_id, idx, worker, cost_usd, has_usage, input_tokens) "
            "VALUES (%s, 0, %s, 0.5, true, 10)",
            (run.id, run.workers[0]),
        )
    with PostgresStore(postgres_url) as store:
        assert store.get_run(run.id) == run
        totals = store.list_runs(RunFilter(), 5, None).totals
        assert totals is not None and (totals.runs, totals.cost_usd, totals.usage.input_tokens) == (1, 0.5, 10)
        assert store.take_over_run(owned(a_run(1, status="interrupted"), "lease-b"), None), "an owner without a lease"
        with psycopg.connect(postgres_url) as conn:
            versions = [v for (v,) in conn.execute("SELECT version FROM schema_migrations ORDER BY version")]
        assert versions == list(range(1, postgres.SCHEMA_VERSION + 1))
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("INSERT INTO schema_migrations VALUES (%s, now())", (postgres.SCHEMA_VERSION + 1,))
    with pytest.raises(StoreError, match="migrated by a newer mcp-collab"):
        PostgresStore(postgres_url)


def reference_totals(store: RunStore, filter: RunFilter) -> tuple[Any, ...]:
    """A list's totals worked out from the matching runs themselves, read one by one."""
    runs = [store.get_run(run_id) for run_id in every_run(store, filter, limit=50)]
    counted, cost, uncosted = 0, 0.0, 0
    tokens: dict[str, int | None] = dict.fromkeys(Usage.model_fields)
    for run in runs:
        assert run is not None
        steps = [s for s in run.steps if filter.worker is None or s.worker_name == filter.worker]
        if filter.worker is not None and not steps:
            continue
        counted += 1
        for step in steps:
            cost += step.cost_usd or 0.0
            uncosted += step.cost_usd is None and step.usage is not None
            for name in tokens:
                value = getattr(step.usage, name) if step.usage else None
                if value is not None:
                    tokens[name] = (tokens[name] or 0) + value
    return (counted, round(cost, 9), uncosted, tokens)


def listed_totals(store: RunStore, filter: RunFilter) -> tuple[Any, ...]:
    totals = store.list_runs(filter, 1, None).totals
    assert totals is not None
    return (totals.runs, totals.cost_usd, totals.uncosted_steps, totals.usage.model_dump())


def costed(i: int, *, status: str = "completed", workers: tuple[str, ...] = ("w1",), cost: float | None = 0.25) -> Run:
    run = a_run(i, status=status, worker=workers[0])
    run.workers = list(dict.fromkeys(workers))
    run.steps = [
        run.steps[0].model_copy(
            update={
                "index": k,
                "worker_name": name,
                "cost_usd": cost,
                "usage": Usage(input_tokens=100 + i, output_tokens=10 * k, reasoning_tokens=i if i % 2 else None),
            }
        )
        for k, name in enumerate(workers)
    ]
    return run


def every_kind_of_change(store: RunStore, other: RunStore) -> None:
    """Saves, replacements from another store object, intermediate states, a recovery, a refused
    save and a prune, over runs with several workers, unpriced steps and no steps."""
    store.save_runs([costed(i, workers=("w1", "w2") if i % 3 else ("w2",)) for i in range(12)])
    store.save_run(costed(20, status="running", workers=("w1",), cost=None))  # a step with usage, no price
    store.save_run(costed(21, status="queued").model_copy(update={"steps": []}))  # a run with no step yet
    other.save_run(costed(3, status="failed", workers=("w1", "w1", "w3"), cost=0.125))  # replaced elsewhere
    other.save_runs([costed(4, status="running", workers=("w2",)), costed(5, workers=("w1",))], durable=False)
    store.save_run(owned(costed(30, status="running", workers=("w3",)), "lease-a"))
    assert store.take_over_run(owned(costed(30, status="interrupted", workers=("w3", "w1")), "lease-b"), "lease-a")
    with pytest.raises(RunTakenOverError):  # refused: the totals do not move
        other.save_run(owned(costed(30, workers=("w2", "w2", "w2"), cost=9.0), "lease-a"))
    assert store.prune(max_runs=9, max_age_days=None) == ["run-00000", "run-00001", "run-00002"]


def test_list_totals_stay_exact_through_every_kind_of_change(new_store: StoreMaker) -> None:
    store = new_store()
    every_kind_of_change(store, new_store())
    filters = [
        RunFilter(),
        RunFilter(worker="w1"),
        RunFilter(worker="w2"),
        RunFilter(worker="w3"),
        RunFilter(status="failed"),
        RunFilter(status="running", worker="w1"),
        RunFilter(strategy="single_worker", status="completed", worker="w2"),
        RunFilter(strategy="consensus"),
        RunFilter(worker="nobody"),
    ]
    for filter in filters:
        assert listed_totals(new_store(), filter) == reference_totals(store, filter), filter
    assert listed_totals(store, RunFilter())[:3] == (12, 3.875, 1)


def test_the_databases_running_totals_agree_with_a_recount_of_its_history(postgres_url: str) -> None:
    import psycopg

    from mcp_collab.store.postgres import _recount_totals

    with PostgresStore(postgres_url) as store, PostgresStore(postgres_url) as other:
        every_kind_of_change(store, other)

    def table() -> dict[tuple[str, str, str], tuple[Any, ...]]:
        with psycopg.connect(postgres_url) as conn:
            rows = conn.execute("SELECT * FROM run_totals").fetchall()
        assert all(not any(row[3:]) for row in rows if row[3] == 0), "a key with no run left adds nothing"
        return {row[:3]: row[3:] for row in rows if row[3] != 0}

    kept = table()
    with psycopg.connect(postgres_url) as conn, conn.cursor() as cur:
        _recount_totals(cur)
    assert len(kept) > 5 and table() == kept


# Processes saving the same few runs over and over, and the saves each makes: enough that their
# transactions overlap, first inserts of the same new run included.
SAME_RUN_WRITERS = 4
SAME_RUN_SAVES = 60


def _same_runs_writer(kind: str, where: str, n: int, start: Any, results: Any) -> None:
    store = open_backend(kind, where)
    start.wait(PROCESS_DEADLINE_S)
    for k in range(SAME_RUN_SAVES):
        i = k % 3
        workers = tuple(f"w{(n + k + j) % 3}" for j in range(1 + (k + n) % 3))
        store.save_run(costed(i, status=("running", "completed", "failed")[(n + k) % 3], workers=workers))
    results.put(n)


def test_writers_saving_the_same_runs_at_once_keep_the_totals_exact(
    backend: tuple[str, str], new_store: StoreMaker
) -> None:
    new_store().check_writable()
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    results = ctx.Queue()
    writers = [
        ctx.Process(target=_same_runs_writer, args=(*backend, n, start, results)) for n in range(SAME_RUN_WRITERS)
    ]
    for process in writers:
        process.start()
    start.set()
    try:
        done = sorted(results.get(timeout=PROCESS_DEADLINE_S) for _ in writers)
    except queue_mod.Empty:
        pytest.fail(f"a writer process did not finish: exit codes {[p.exitcode for p in writers]}")
    finally:
        for process in writers:
            process.join(PROCESS_DEADLINE_S)
    assert done == list(range(SAME_RUN_WRITERS))
    store = new_store()
    for filter in (RunFilter(), RunFilter(worker="w0"), RunFilter(worker="w1"), RunFilter(status="failed")):
        assert listed_totals(store, filter) == reference_totals(store, filter), filter
