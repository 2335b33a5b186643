"""The JSON store: appends that survive, two processes' views, paging, outputs, refusals, migration."""

from __future__ import annotations

import fcntl
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from mcp_collab.errors import InvalidRequestError, StoreError
from mcp_collab.models import Run, Step, Worker
from mcp_collab.store import STORE_SCHEMA_VERSION, JsonStore, RunFilter
from mcp_collab.store.json_store import PREVIEW_CHARS


def a_run(
    i: int, *, status: str = "completed", strategy: str = "single_worker", worker: str = "w1", output: str = ""
) -> Run:
    return Run(
        id=f"run-{i:05d}",
        task=f"task {i}",
        strategy=strategy,
        status=status,  # type: ignore[arg-type]
        created_at=datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=i),
        workers=[worker],
        steps=[
            Step(
                index=0, role="worker", worker_name=worker, worker_model="codex_cli", runtime_mode="cli", output=output
            )
        ],
    )


def log_lines(directory: Path) -> list[dict]:
    return [json.loads(line) for line in (directory / "runs.jsonl").read_text(encoding="utf-8").splitlines()]


def test_what_one_store_commits_another_reads(tmp_path: Path) -> None:
    first = JsonStore(tmp_path)
    first.add_worker(Worker(name="w1", model="codex_cli"))
    first.save_run(a_run(1))
    lines = log_lines(tmp_path)
    assert lines[0]["schemaVersion"] == STORE_SCHEMA_VERSION
    assert lines[1]["op"] == "worker" and lines[2]["run"]["steps"][0]["runtimeMode"] == "cli"
    second = JsonStore(tmp_path)
    assert second.get_run("run-00001") == a_run(1)
    assert [w.name for w in second.list_workers()] == ["w1"]


def test_a_step_persist_appends_one_line_and_never_rewrites_history(tmp_path: Path) -> None:
    store = JsonStore(tmp_path)
    for i in range(20):
        store.save_run(a_run(i))
    before = (tmp_path / "runs.jsonl").read_bytes()
    run = a_run(7)
    run.status = "failed"
    store.save_run(run)
    after = (tmp_path / "runs.jsonl").read_bytes()
    assert after.startswith(before) and after[len(before) :].count(b"\n") == 1
    assert store.get_run("run-00007").status == "failed"  # type: ignore[union-attr]


def test_two_stores_on_one_directory_lose_no_update_and_see_each_other(tmp_path: Path) -> None:
    a, b = JsonStore(tmp_path), JsonStore(tmp_path)
    a.add_worker(Worker(name="from-a", model="codex_cli"))
    b.add_worker(Worker(name="from-b", model="gemini_cli"))
    for i in range(10):
        (a if i % 2 else b).save_run(a_run(i))
    assert {w.name for w in a.list_workers()} == {"from-a", "from-b"}
    assert len(a.all_runs()) == len(b.all_runs()) == 10
    with pytest.raises(InvalidRequestError, match="already exists"):
        a.add_worker(Worker(name="from-b", model="codex_cli"))
    assert b.remove_worker("from-a") is not None
    assert [w.name for w in a.list_workers()] == ["from-b"]


def test_a_save_at_once_is_one_append_and_anything_more_is_left_to_a_save_off_the_loop(tmp_path: Path) -> None:
    store, other = JsonStore(tmp_path), JsonStore(tmp_path)
    assert not store.save_runs_now([a_run(1)]), "no log yet: creating one takes an fsync of its own"
    store.save_run(a_run(1))
    before = (tmp_path / "runs.jsonl").read_bytes()

    assert store.save_runs_now([a_run(2, status="queued")])
    after = (tmp_path / "runs.jsonl").read_bytes()
    assert after.startswith(before) and after[len(before) :].count(b"\n") == 1
    store.sync()
    assert other.get_run("run-00002") == a_run(2, status="queued")

    assert not store.save_runs_now([a_run(3, output="x" * (PREVIEW_CHARS + 1))]), "a long output has a file"
    other.save_run(a_run(4))
    assert not store.save_runs_now([a_run(5)]), "another process appended: catching up reads the log"
    store.save_run(a_run(5))
    with open(tmp_path / "store.lock", "rb") as held:
        fcntl.flock(held, fcntl.LOCK_SH)  # another process reading the store
        assert not store.save_runs_now([a_run(6)])
    assert [r.id for r in JsonStore(tmp_path).all_runs()] == ["run-00001", "run-00002", "run-00004", "run-00005"]


def test_long_outputs_live_beside_the_log_and_come_back_whole(tmp_path: Path) -> None:
    store = JsonStore(tmp_path)
    big = "x" * (PREVIEW_CHARS * 5) + "the end"
    store.save_run(a_run(1, output=big))
    store.save_run(a_run(1, output=big))  # a later save of the same run does not rewrite the file
    assert len((tmp_path / "runs.jsonl").read_bytes()) < 3 * PREVIEW_CHARS + 4096
    assert (tmp_path / "outputs" / "run-00001" / "0.txt").read_text(encoding="utf-8") == big
    assert store.get_run("run-00001").steps[0].output == big  # type: ignore[union-attr]
    page = store.list_runs(RunFilter(), 10, None)
    assert page.runs[0].steps[0].output == big[:PREVIEW_CHARS], "lists read previews, not output files"


def test_a_store_from_a_newer_version_is_refused_and_left_untouched(tmp_path: Path) -> None:
    log = tmp_path / "runs.jsonl"
    log.write_text(json.dumps({"schemaVersion": STORE_SCHEMA_VERSION + 1}) + "\n")
    before = log.read_bytes()
    with pytest.raises(StoreError, match="newer mcp-collab"):
        JsonStore(tmp_path)
    assert log.read_bytes() == before


def test_a_torn_tail_is_ignored_and_cut_off_by_the_next_writer(tmp_path: Path) -> None:
    store = JsonStore(tmp_path)
    store.save_run(a_run(1))
    with open(tmp_path / "runs.jsonl", "ab") as fh:
        fh.write(b'{"op":"run","run":{"id":"run-torn","task":')  # a writer died mid-append
    reader = JsonStore(tmp_path)
    assert [r.id for r in reader.all_runs()] == ["run-00001"]
    reader.save_run(a_run(2))
    assert [r.id for r in JsonStore(tmp_path).all_runs()] == ["run-00001", "run-00002"]
    assert b"run-torn" not in (tmp_path / "runs.jsonl").read_bytes()


def test_stray_temp_files_of_dead_writers_are_cleaned(tmp_path: Path) -> None:
    JsonStore(tmp_path).save_run(a_run(1))
    (tmp_path / "runs.jsonl.tmp-999999999").write_text("half a compaction")
    (tmp_path / "outputs" / "run-00001").mkdir(parents=True)
    (tmp_path / "outputs" / "run-00001" / "0.txt.tmp-999999999-1").write_text("half an output")
    JsonStore(tmp_path)
    assert list(tmp_path.rglob("*.tmp-*")) == []
    assert (tmp_path / "outputs" / "run-00001").is_dir()


def test_a_rejected_change_leaves_the_log_as_it_was(tmp_path: Path) -> None:
    store = JsonStore(tmp_path)
    store.add_worker(Worker(name="w1", model="codex_cli"))
    before = (tmp_path / "runs.jsonl").read_bytes()
    with pytest.raises(InvalidRequestError):
        store.add_worker(Worker(name="w1", model="gemini_cli"))
    assert (tmp_path / "runs.jsonl").read_bytes() == before


def test_runs_page_newest_first_with_filters_and_a_cursor(tmp_path: Path) -> None:
    store = JsonStore(tmp_path)
    for i in range(25):
        store.save_run(a_run(i, status="failed" if i % 5 == 0 else "completed", worker="w2" if i >= 20 else "w1"))
    seen: list[str] = []
    cursor = None
    while True:
        page = store.list_runs(RunFilter(), 10, cursor)
        seen += [r.id for r in page.runs]
        cursor = page.next_cursor
        if cursor is None:
            break
    assert seen == [f"run-{i:05d}" for i in reversed(range(25))]
    failed = store.list_runs(RunFilter(status="failed"), 50, None)
    assert [r.id for r in failed.runs] == [f"run-{i:05d}" for i in (20, 15, 10, 5, 0)]
    assert failed.next_cursor is None
    assert len(store.list_runs(RunFilter(worker="w2"), 50, None).runs) == 5
    with pytest.raises(InvalidRequestError, match="nextCursor"):
        store.list_runs(RunFilter(), 10, "%%%garbage")


def test_superseded_records_are_compacted_away(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mcp_collab.store.json_store as js

    monkeypatch.setattr(js, "COMPACT_FLOOR", 10)
    store = JsonStore(tmp_path)
    other = JsonStore(tmp_path)
    for round_ in range(6):
        for i in range(5):
            run = a_run(i)
            run.task = f"task {i} round {round_}"
            store.save_run(run)
    lines = log_lines(tmp_path)
    assert len(lines) <= 1 + 2 * 5 + 1, "the log holds little more than the live runs"
    assert [r.task for r in other.all_runs()] == [f"task {i} round 5" for i in range(5)], "others follow a compaction"


def test_prune_keeps_unfinished_runs_and_removes_outputs(tmp_path: Path) -> None:
    store = JsonStore(tmp_path)
    for i in range(10):
        store.save_run(a_run(i, output="o" * (PREVIEW_CHARS + 1), status="running" if i == 0 else "completed"))
    pruned = store.prune(max_runs=3, max_age_days=None)
    assert pruned == [f"run-{i:05d}" for i in range(1, 7)]
    assert [r.id for r in store.all_runs()] == ["run-00000", "run-00007", "run-00008", "run-00009"]
    assert not (tmp_path / "outputs" / "run-00001").exists() and (tmp_path / "outputs" / "run-00009").exists()
    aged = store.prune(max_runs=None, max_age_days=1, now=datetime(2026, 1, 1, 0, 0, 9, tzinfo=UTC) + timedelta(days=1))
    assert aged == ["run-00007", "run-00008"]
    assert [r.id for r in JsonStore(tmp_path).all_runs()] == ["run-00000", "run-00009"]


def test_a_schema_1_store_migrates_forward_and_keeps_the_original(tmp_path: Path) -> None:
    runs = [a_run(i, output="y" * (PREVIEW_CHARS + 10)).model_dump(mode="json", by_alias=True) for i in range(3)]
    workers = [Worker(name="old", model="gemini_cli").model_dump(mode="json", by_alias=True)]
    original = json.dumps({"schemaVersion": 1, "workers": workers, "worker_runs": runs})
    (tmp_path / "store.json").write_text(original)
    store = JsonStore(tmp_path)
    assert [w.name for w in store.list_workers()] == ["old"]
    assert [r.id for r in store.all_runs()] == ["run-00000", "run-00001", "run-00002"]
    assert store.get_run("run-00002").steps[0].output == "y" * (PREVIEW_CHARS + 10)  # type: ignore[union-attr]
    assert (tmp_path / "store.json.migrated-v1").read_text() == original
    assert not (tmp_path / "store.json").exists()
    assert len(JsonStore(tmp_path).all_runs()) == 3, "migration happens once"


def test_an_unreadable_schema_1_store_is_refused_untouched(tmp_path: Path) -> None:
    (tmp_path / "store.json").write_text('{"schemaVersion": 1, "workers": [{"name": 3}]')
    with pytest.raises(StoreError, match="left untouched"):
        JsonStore(tmp_path)
    assert (tmp_path / "store.json").read_text() == '{"schemaVersion": 1, "workers": [{"name": 3}]'
    assert not (tmp_path / "runs.jsonl").exists()


def test_an_unknown_run_on_a_new_store_is_simply_unknown(tmp_path: Path) -> None:
    store = JsonStore(tmp_path / "new")
    assert store.get_run("run-nope") is None
    assert store.list_runs(RunFilter(), limit=5, cursor=None).runs == []


def test_list_totals_follow_runs_replaced_and_pruned(tmp_path: Path) -> None:
    from mcp_collab.models import Usage

    store = JsonStore(tmp_path)

    def costed(i: int, cost: float, worker: str = "w1", status: str = "completed") -> Run:
        run = a_run(i, worker=worker, status=status)
        run.steps[0].cost_usd = cost
        run.steps[0].usage = Usage(input_tokens=100 * i, output_tokens=10)
        return run

    store.save_runs([costed(1, 0.5), costed(2, 0.25, worker="w2"), costed(3, 1.0, status="running")])
    everything = store.list_runs(RunFilter(), limit=1, cursor=None).totals
    assert everything is not None and (everything.runs, everything.cost_usd) == (3, 1.75)
    assert everything.usage.input_tokens == 600 and everything.usage.cached_input_tokens is None
    store.save_run(costed(1, 2.0))  # the run's new state replaces its old one in the totals
    by_w1 = store.list_runs(RunFilter(worker="w1"), limit=1, cursor=None).totals
    assert by_w1 is not None and (by_w1.runs, by_w1.cost_usd) == (2, 3.0)
    done = store.list_runs(RunFilter(status="completed"), limit=1, cursor=None).totals
    assert done is not None and (done.runs, done.cost_usd) == (2, 2.25)
    store.prune(max_runs=1, max_age_days=None)  # run 1 (completed, oldest) goes
    after = JsonStore(tmp_path).list_runs(RunFilter(), limit=1, cursor=None).totals
    assert after is not None and (after.runs, after.cost_usd, after.usage.input_tokens) == (2, 1.25, 500)
