"""The JSON store: atomic commits, schema version, two processes' views, paging, refusals."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from mcp_collab.errors import InvalidRequestError, StoreError
from mcp_collab.models import Run, Step, Worker
from mcp_collab.store import STORE_SCHEMA_VERSION, JsonStore, RunFilter


def a_run(i: int, *, status: str = "completed", strategy: str = "single_worker", worker: str = "w1") -> Run:
    return Run(
        id=f"run-{i:05d}",
        task=f"task {i}",
        strategy=strategy,
        status=status,  # type: ignore[arg-type]
        created_at=datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=i),
        workers=[worker],
        steps=[Step(index=0, role="worker", worker_name=worker, worker_model="codex_cli", runtime_mode="cli")],
    )


def test_what_one_store_commits_another_reads(tmp_path: Path) -> None:
    path = tmp_path / "store.json"
    first = JsonStore(path)
    first.add_worker(Worker(name="w1", model="codex_cli"))
    first.save_run(a_run(1))
    doc = json.loads(path.read_text(encoding="utf-8"))
    assert doc["schemaVersion"] == STORE_SCHEMA_VERSION
    assert [w["name"] for w in doc["workers"]] == ["w1"]
    assert doc["worker_runs"][0]["steps"][0]["runtimeMode"] == "cli"
    second = JsonStore(path)
    assert second.get_run("run-00001") == a_run(1)
    assert [w.name for w in second.list_workers()] == ["w1"]


def test_two_stores_on_one_file_lose_no_update(tmp_path: Path) -> None:
    path = tmp_path / "store.json"
    a, b = JsonStore(path), JsonStore(path)
    a.add_worker(Worker(name="from-a", model="codex_cli"))
    b.add_worker(Worker(name="from-b", model="gemini_cli"))
    for i in range(10):
        (a if i % 2 else b).save_run(a_run(i))
    assert {w.name for w in a.list_workers()} == {"from-a", "from-b"}
    assert len(a.all_runs()) == len(b.all_runs()) == 10
    with pytest.raises(InvalidRequestError, match="already exists"):
        a.add_worker(Worker(name="from-b", model="codex_cli"))


def test_a_store_from_a_newer_version_is_refused_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "store.json"
    path.write_text(json.dumps({"schemaVersion": STORE_SCHEMA_VERSION + 1, "workers": [], "worker_runs": []}))
    before = path.read_bytes()
    with pytest.raises(StoreError, match="newer mcp-collab"):
        JsonStore(path).list_workers()
    assert path.read_bytes() == before


@pytest.mark.parametrize(
    "content",
    ['{"workers": [', "not json at all", '{"workers": []}', '{"schemaVersion": 1, "workers": [{"name": 3}]}'],
)
def test_an_unreadable_store_is_refused_and_never_overwritten(tmp_path: Path, content: str) -> None:
    path = tmp_path / "store.json"
    path.write_text(content)
    store = JsonStore(path)
    with pytest.raises(StoreError, match="left untouched"):
        store.add_worker(Worker(name="w", model="codex_cli"))
    assert path.read_text() == content


def test_a_failed_write_keeps_the_old_document_and_stray_temps_are_cleaned(tmp_path: Path) -> None:
    path = tmp_path / "store.json"
    store = JsonStore(path)
    store.save_run(a_run(1))
    dead_writer_tmp = tmp_path / ".store.json.tmp-999999999-1"
    dead_writer_tmp.write_text('{"schemaVersion": 1, "workers": [], "worker_')  # a torn commit
    reopened = JsonStore(path)
    assert not dead_writer_tmp.exists()
    assert reopened.get_run("run-00001") is not None


def test_a_rejected_change_leaves_memory_and_disk_as_they_were(tmp_path: Path) -> None:
    path = tmp_path / "store.json"
    store = JsonStore(path)
    store.add_worker(Worker(name="w1", model="codex_cli"))
    before = path.read_bytes()
    with pytest.raises(InvalidRequestError):
        store.add_worker(Worker(name="w1", model="gemini_cli"))
    assert path.read_bytes() == before
    assert store.get_worker("w1") is not None and store.get_worker("w1").model == "codex_cli"  # type: ignore[union-attr]


def test_runs_page_newest_first_with_filters_and_a_cursor(tmp_path: Path) -> None:
    store = JsonStore(tmp_path / "store.json")
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


def test_the_store_directory_is_created_private_to_its_parent(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "store.json"
    JsonStore(path).save_run(a_run(1))
    assert path.exists() and os.path.exists(path.with_name("store.lock"))
