"""A damaged run log costs the damaged lines, never the history, and never gets written over.

Damage done while a server has the store open (a log cut mid-line, garbage appended or inserted)
is found before the next append; damage found at start is repaired the same way. Each time the
original is kept aside byte for byte and the operator hears of it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from mcp_collab.config import Settings
from mcp_collab.errors import StoreError
from mcp_collab.models import Worker
from mcp_collab.readiness import check
from mcp_collab.store import JsonStore, RunFilter
from tests.conftest import quick_vendor_clis
from tests.test_store import a_run

LOG = "runs.jsonl"


def ids(store: JsonStore) -> list[str]:
    return [r.id for r in store.all_runs()]


def damaged_copies(directory: Path) -> list[Path]:
    return sorted(directory.glob(f"{LOG}.damaged-*"))


def a_store_with_runs(directory: Path, count: int = 5) -> JsonStore:
    store = JsonStore(directory)
    store.add_worker(Worker(name="w1", model="codex_cli"))
    for i in range(1, count + 1):
        store.save_run(a_run(i, output="x" * (3000 if i == 2 else 10)))
    return store


def line_offsets(path: Path) -> list[int]:
    data, offsets, at = path.read_bytes(), [], 0
    for line in data.split(b"\n")[:-1]:
        offsets.append(at)
        at += len(line) + 1
    return offsets


@pytest.mark.parametrize(
    "garbage",
    [b"not json at all", b'{"op": "run", "ru', b'{"op": "explode"}', b"\x00\x00\x00\x00", b'{"op":"run","run":{}}'],
    ids=["text", "half-record", "unknown-op", "nul-bytes", "record-without-fields"],
)
def test_one_bad_line_at_start_costs_that_line_and_keeps_everything_around_it(
    tmp_path: Path, garbage: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    a_store_with_runs(tmp_path)
    log_path = tmp_path / LOG
    lines = log_path.read_bytes().split(b"\n")
    lines.insert(4, garbage)  # after run 2, before run 3
    damaged = b"\n".join(lines)
    log_path.write_bytes(damaged)

    with caplog.at_level(logging.ERROR, logger="mcp_collab.store"):
        store = JsonStore(tmp_path)

    assert ids(store) == [f"run-{i:05d}" for i in range(1, 6)], "records before and after the bad line stay"
    assert store.get_run("run-00002").steps[0].output == "x" * 3000, "outputs kept apart stay readable"
    assert [w.name for w in store.list_workers()] == ["w1"]
    [aside] = damaged_copies(tmp_path)
    assert aside.read_bytes() == damaged, "the damaged file is kept aside untouched"
    assert "1 unreadable line(s) were dropped" in caplog.text and aside.name in caplog.text
    assert aside.name in store.notices[0]
    assert garbage not in log_path.read_bytes()
    store.save_run(a_run(6))
    assert ids(JsonStore(tmp_path))[-1] == "run-00006"


def test_a_log_cut_mid_line_under_a_live_store_is_never_grown_back(tmp_path: Path) -> None:
    live = a_store_with_runs(tmp_path)
    log_path = tmp_path / LOG
    offsets = line_offsets(log_path)
    cut_at = offsets[4] + 7  # inside the record of run 3
    with open(log_path, "r+b") as fh:
        fh.truncate(cut_at)
    kept_prefix = log_path.read_bytes()

    live.save_run(a_run(7))  # the next append finds the damage first

    data = log_path.read_bytes()
    assert b"\x00" not in data, "the log was not padded back to its old length"
    assert ids(live) == ["run-00001", "run-00002", "run-00007"]
    [aside] = damaged_copies(tmp_path)
    assert aside.read_bytes() == kept_prefix
    assert "shorter than the" in live.notices[0]
    assert ids(JsonStore(tmp_path)) == ["run-00001", "run-00002", "run-00007"], "the next start keeps it all"
    assert len(damaged_copies(tmp_path)) == 1, "the next start found nothing more to repair"


@pytest.mark.parametrize("newline", [True, False], ids=["whole-line", "no-newline"])
def test_garbage_appended_under_a_live_store_is_dropped_and_nothing_committed_is_lost(
    tmp_path: Path, newline: bool
) -> None:
    live = a_store_with_runs(tmp_path)
    with open(tmp_path / LOG, "ab") as fh:
        fh.write(b"\x1b[2J garbage {{{" + (b"\n" if newline else b""))

    assert ids(live) == [f"run-{i:05d}" for i in range(1, 6)]
    live.save_run(a_run(8))
    assert ids(JsonStore(tmp_path)) == [*(f"run-{i:05d}" for i in range(1, 6)), "run-00008"]
    assert b"garbage" not in (tmp_path / LOG).read_bytes()


def test_a_line_inserted_under_a_live_store_is_found_before_the_next_append(tmp_path: Path) -> None:
    live = a_store_with_runs(tmp_path)
    log_path = tmp_path / LOG
    lines = log_path.read_bytes().split(b"\n")
    lines.insert(2, b'{"op":"worker","worker":{"name":"planted","model":"codex_cli"}} trailing')
    log_path.write_bytes(b"\n".join(lines))

    live.save_run(a_run(9))

    survivor = JsonStore(tmp_path)
    assert ids(survivor) == [*(f"run-{i:05d}" for i in range(1, 6)), "run-00009"]
    assert [w.name for w in survivor.list_workers()] == ["w1"]
    assert len(damaged_copies(tmp_path)) == 1
    assert "moved or changed" in live.notices[0]


def test_a_record_overwritten_in_place_is_repaired_when_it_is_read(tmp_path: Path) -> None:
    live = a_store_with_runs(tmp_path)
    log_path = tmp_path / LOG
    offsets = line_offsets(log_path)
    data = bytearray(log_path.read_bytes())
    data[offsets[3] : offsets[3] + 6] = b"######"  # run 2's record, same length: only a read can tell
    log_path.write_bytes(bytes(data))

    page = live.list_runs(RunFilter(), limit=10, cursor=None)

    assert [r.id for r in page.runs] == ["run-00005", "run-00004", "run-00003", "run-00001"]
    assert len(damaged_copies(tmp_path)) == 1


def test_a_damaged_header_costs_only_the_header(tmp_path: Path) -> None:
    a_store_with_runs(tmp_path)
    log_path = tmp_path / LOG
    data = log_path.read_bytes()
    log_path.write_bytes(b"garbage" + data[data.index(b"\n") :])
    assert ids(JsonStore(tmp_path)) == [f"run-{i:05d}" for i in range(1, 6)]
    assert json.loads(log_path.read_text(encoding="utf-8").splitlines()[0])["schemaVersion"] == 2


@pytest.mark.anyio
async def test_doctor_and_check_runtimes_name_the_damaged_copy(tmp_path: Path) -> None:
    a_store_with_runs(tmp_path)
    with open(tmp_path / LOG, "ab") as fh:
        fh.write(b"garbage\n")
    JsonStore(tmp_path)
    [aside] = damaged_copies(tmp_path)
    report = await check(
        Settings.from_env({"HOME": str(tmp_path), "MCP_COLLAB_STATE_DIR": str(tmp_path), **quick_vendor_clis()})
    )
    [damage] = [c for c in report.checks if c.name == "store:damage"]
    assert not damage.ok and aside.name in damage.detail and damage.hint
    assert not damage.required, "a repaired store does not stop the server"


def test_a_record_from_a_newer_version_with_unknown_fields_is_read(tmp_path: Path) -> None:
    store = a_store_with_runs(tmp_path, count=1)
    record = {"op": "run", "run": a_run(2).model_dump(mode="json", by_alias=True)}
    record["run"]["carbonGrams"] = 0.12
    record["run"]["steps"][0]["diffRef"] = {"blob": "abc"}
    with open(tmp_path / LOG, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")
    assert store.get_run("run-00002") == a_run(2)
    assert damaged_copies(tmp_path) == []


def test_a_record_this_version_cannot_read_is_a_store_problem_not_the_callers(tmp_path: Path) -> None:
    store = a_store_with_runs(tmp_path, count=1)
    record = {"op": "run", "run": a_run(2).model_dump(mode="json", by_alias=True)}
    record["run"]["status"] = "paused"  # a status of a newer version
    with open(tmp_path / LOG, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")
    with pytest.raises(StoreError, match=r"run-00002 in the store .* cannot be read by this version"):
        store.get_run("run-00002")
    page = store.list_runs(RunFilter(), limit=10, cursor=None)
    assert [r.id for r in page.runs] == ["run-00001"], "a list leaves out what it cannot read"


def test_a_log_that_is_a_directory_is_refused_in_one_line(tmp_path: Path) -> None:
    (tmp_path / LOG).mkdir()
    with pytest.raises(StoreError) as refused:
        JsonStore(tmp_path)
    assert "is not a regular file" in str(refused.value) and "\n" not in str(refused.value)


# A completed run as the version before costs and per-step diffs stored it (its exact shape).
PREVIOUS_SHAPE_RUN = {
    "id": "run-old",
    "task": "write it",
    "strategy": "single_worker",
    "status": "completed",
    "createdAt": "2026-01-01T00:00:00Z",
    "startedAt": "2026-01-01T00:00:01Z",
    "endedAt": "2026-01-01T00:00:09Z",
    "workers": ["w"],
    "steps": [
        {
            "index": 0, "role": "worker", "directory": "/wt/run-old", "access": "workspace_write",
            "workerName": "w", "workerModel": "codex_cli", "runtimeMode": "cli", "status": "completed",
            "attempts": [], "startedAt": "2026-01-01T00:00:01Z", "endedAt": "2026-01-01T00:00:09Z",
            "durationMs": 8000, "exitCode": 0,
            "usage": {"inputTokens": 12, "outputTokens": 5, "totalTokens": 17},
            "sessionId": "s-1", "output": "done", "outputTruncated": False, "findings": [],
        }
    ],
    "result": "done",
    "findings": [],
    "worktrees": [
        {
            "path": "/wt/run-old", "branch": "mcp-collab/run-old", "entry": "run-old", "gitDir": "/repo/.git",
            "baseCommit": "0" * 40, "diff": "diff --git a/x b/x\n+x\n", "state": "active",
        }
    ],
    "notes": [],
}  # fmt: skip


def test_a_run_stored_by_the_previous_version_reads_and_lists_with_its_cost_unknown(tmp_path: Path) -> None:
    from mcp_collab.server import output_page

    store = a_store_with_runs(tmp_path, count=1)
    with open(tmp_path / LOG, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"op": "run", "run": PREVIOUS_SHAPE_RUN}) + "\n")
    run = JsonStore(tmp_path).get_run("run-old")
    assert run is not None and run.status == "completed" and run.result == "done"
    [step] = run.steps
    assert step.usage is not None and step.usage.input_tokens == 12 and step.usage.cached_input_tokens is None
    assert step.cost_usd is None and step.cost_source is None and step.model is None and step.diff == ""
    assert run.cost_usd is None and run.duration_ms is None
    page = store.list_runs(RunFilter(worker="w"), limit=10, cursor=None)
    assert [r.id for r in page.runs] == ["run-old"]
    assert page.totals is not None and page.totals.uncosted_steps == 1 and page.totals.usage.input_tokens == 12
    # Its step has no diff of its own: the worktree's is what it changed.
    assert output_page(run, 0, 0, 1000, diff=True).text == "diff --git a/x b/x\n+x\n"
    assert damaged_copies(tmp_path) == []
