"""Record the Temporal histories of a few runs, for ``tests/test_temporal_replay.py``.

    .venv/bin/python -m tests.support.record_temporal_histories NAME

A workflow that is running when the workers are upgraded is replayed on the new code: its history
must take the same course there (a change of course is guarded by ``workflow.patched``). The
histories in ``tests/fixtures/temporal_histories`` were recorded by this script on the workflow code
of their day and stay as they are; record a new set beside them when the workflow changes its course
(the replay test replays every file): ``v1`` before coalesced saves and steps that open their
own space, ``v2`` with them. Each is a run of one shape: one step in a plain directory, a
review loop and best of n in worktrees, a follow-up, a cancelled run. The host's name is replaced.
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
from pathlib import Path

import anyio

from mcp_collab.config import Settings
from mcp_collab.models import DispatchRequest, Run, WorkerSpec
from mcp_collab.orchestrator import WorkerOrchestrator
from tests.conftest import FAKE_CLIS
from tests.support.git_repo import init_repo
from tests.support.temporal import TemporalDev, WorkerProcess

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "temporal_histories"


async def record(tmp: Path, address: str, into: Path) -> None:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp / "home"),
        "LANG": "C.UTF-8",
        "MCP_COLLAB_STATE_DIR": str(tmp / "state"),
        "MCP_COLLAB_WORKSPACE_ROOTS": str(tmp),
        "MCP_COLLAB_ENGINE": "temporal",
        "MCP_COLLAB_TEMPORAL_ADDRESS": address,
        "MCP_COLLAB_TEMPORAL_QUEUE": "runs",
        "MCP_COLLAB_CODEX_BIN": str(FAKE_CLIS / "write"),
    }
    (tmp / "home").mkdir()
    (tmp / "plain").mkdir()
    (tmp / "hangs").mkdir()
    repo = init_repo(tmp / "repo", {"README.md": "hello\n"})
    worker = WorkerProcess(env, "steps", [tmp], slots=4).start()
    hangs = WorkerProcess({**env, "MCP_COLLAB_CODEX_BIN": str(FAKE_CLIS / "hang")}, "hangs", [tmp / "hangs"]).start()
    orchestrator = WorkerOrchestrator(Settings.from_env(env), runtimes={})
    recorded: dict[str, Run] = {}
    try:
        async with orchestrator, orchestrator.running():
            for name in ("coder", "second", "judge"):
                await orchestrator.register_worker(WorkerSpec(name=name, model="codex_cli"))
            recorded["single_worker"] = await orchestrator.dispatch(
                DispatchRequest(task="one step", working_directory=str(tmp / "plain"))
            )
            recorded["review_loop"] = await orchestrator.dispatch(
                DispatchRequest(
                    task="improve", strategy="review_loop", workers=["coder", "second"],
                    working_directory=str(repo), max_rounds=2,
                )
            )  # fmt: skip
            recorded["best_of_n"] = await orchestrator.dispatch(
                DispatchRequest(
                    task="contend", strategy="best_of_n", workers=["coder", "second", "judge"],
                    working_directory=str(repo),
                )
            )  # fmt: skip
            follow = await orchestrator.continue_run(recorded["review_loop"].id, "now the tests")
            recorded["follow_up"] = await orchestrator.wait(follow.id, 60)
            slow = await orchestrator.start(DispatchRequest(task="cancel me", working_directory=str(tmp / "hangs")))
            with anyio.fail_after(60):  # the step is on the worker before the cancel
                while not (await orchestrator.get_run(slow.id)).steps:
                    await anyio.sleep(0.05)
            await anyio.sleep(1)
            recorded["cancelled"], _ = await orchestrator.cancel(slow.id)
            client = await orchestrator.runs.client()  # type: ignore[attr-defined]
            into.mkdir(parents=True, exist_ok=True)
            for name, run in recorded.items():
                history = await client.get_workflow_handle(run.id).fetch_history()
                text = history.to_json().replace(socket.gethostname(), "recorded-host")
                (into / f"{name}.json").write_text(text, encoding="utf-8")
                print(f"{name}: {run.status}, {len(history.events)} events")
    finally:
        worker.stop()
        hangs.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", help=f"the new set's directory under {FIXTURES.relative_to(Path.cwd())}")
    args = parser.parse_args()
    into = FIXTURES / args.name
    if into.exists():
        parser.error(f"{into} exists: recorded histories stay as they are; name a new set")
    with tempfile.TemporaryDirectory(prefix="mcp-collab-histories-") as name:
        tmp = Path(name)
        server = TemporalDev(tmp / "temporal").start()
        try:
            anyio.run(record, tmp, server.address, into)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
