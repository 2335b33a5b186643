"""Collaboration with real parts: the real codex, gemini and claude CLIs (and the google-genai SDK)
edit files in their run's own git worktree through their own tools, review each other's diffs,
answer at once, and their work comes back to the user's tree through apply.

The loopback stub plays the model: its first reply to a writer calls the CLI's own tool (codex's
``exec_command`` or ``apply_patch``, gemini's ``write_file``, claude's ``Write``); the CLI runs it,
sends the result back, and the stub's second reply is the final message. What changed on disk is
the CLIs' own doing. Where a test says requests ran at once, the stub held each of them until all
had arrived (a ``Rendezvous``): requests made one after another would never meet.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import anyio
import pytest

from mcp_collab.config import Settings
from mcp_collab.models import DispatchRequest, Run, WorkerSpec
from mcp_collab.orchestrator import WorkerOrchestrator
from mcp_collab.runtimes.base import RuntimeResult, StepRequest
from tests.support.git_repo import git, init_repo
from tests.support.vendor_stub import StubReply, StubRequest, ToolCall, VendorStub

pytestmark = [pytest.mark.anyio, pytest.mark.real_cli, pytest.mark.timeout(180)]

# How long the stub holds a request waiting for the others that should be in flight with it: real
# CLIs start in 0.3-1.5 s, several at once on a loaded CI machine take longer; never reached when
# the requests overlap, and a clear failure (not a hang) when they do not.
RENDEZVOUS_TIMEOUT_S = 60.0
# A whole run of real CLIs, bounded so a stuck run fails the test instead of hanging it.
RUN_TIMEOUT_S = 120.0

WORKERS = {
    "codex": WorkerSpec(name="codex", model="codex_cli", cli_model="gpt-5.5"),
    "codex-b": WorkerSpec(name="codex-b", model="codex_cli", cli_model="gpt-5.5"),
    "gemini": WorkerSpec(name="gemini", model="gemini_cli", cli_model="gemini-2.5-flash", sdk_model="gemini-2.5-flash"),
    "claude": WorkerSpec(name="claude", model="claude_cli", cli_model="claude-sonnet-4-5"),
    "claude-synth": WorkerSpec(name="claude-synth", model="claude_cli", cli_model="claude-sonnet-4-5"),
}


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return init_repo(tmp_path / "repo", {"app.py": "def main():\n    return 1\n"})


@pytest.fixture
async def orchestrator_for() -> AsyncIterator[Callable[..., Awaitable[WorkerOrchestrator]]]:
    """Builds orchestrators with the named workers registered; closes them after the test."""
    made: list[WorkerOrchestrator] = []

    async def make(env: dict[str, str], *names: str, **extra: str) -> WorkerOrchestrator:
        orchestrator = WorkerOrchestrator(Settings.from_env({**env, **extra}))
        made.append(orchestrator)
        for name in names:
            await orchestrator.register_worker(WORKERS[name])
        return orchestrator

    yield make
    for orchestrator in made:
        await orchestrator.aclose()


# -- what the stub answers ------------------------------------------------------------------------


def shell(command: str) -> StubReply:
    """Ask codex to run ``command`` with its shell tool."""
    return StubReply(text="", tool_calls=(ToolCall("exec_command", {"cmd": command}),))


def patch(*lines: str) -> StubReply:
    """Ask codex to apply a patch with its freeform apply_patch tool."""
    body = "\n".join(("*** Begin Patch", *lines, "*** End Patch")) + "\n"
    return StubReply(text="", tool_calls=(ToolCall("apply_patch", body),))


def finished(req: StubRequest) -> StubReply:
    """The final message, once the CLI has sent its tool's result back."""
    return StubReply(text=f"done; the tool said: {' '.join(req.tool_outputs[-1].split())[:120]}")


def cwd_of(req: StubRequest) -> Path:
    """The directory codex says it works in (its <environment_context>)."""
    found = re.search(r"<cwd>(.*?)</cwd>", req.prompt)
    assert found, "codex names its working directory in every request"
    return Path(found.group(1))


class Rendezvous:
    """Holds each of ``n`` requests until all ``n`` have arrived: proof they were in flight at once.
    If they never all arrive, the held ones are answered with a 400 that says so, so the run fails
    with that reason instead of the test hanging."""

    def __init__(self, n: int) -> None:
        self.n = n
        self._barrier = threading.Barrier(n, timeout=RENDEZVOUS_TIMEOUT_S)

    def meet(self) -> StubReply | None:
        try:
            self._barrier.wait()
        except threading.BrokenBarrierError:
            return StubReply(
                status=400,
                error_message=f"stub: the {self.n} requests that should overlap were not all in flight at once",
            )
        return None


def snapshot(repo: Path) -> dict[str, bytes]:
    """Every file of the user's working tree and its index, byte for byte."""
    files = {str(p.relative_to(repo)): p.read_bytes() for p in repo.rglob("*") if p.is_file() and ".git" not in p.parts}
    files[".git/index"] = (repo / ".git" / "index").read_bytes()
    return files


async def dispatch(orchestrator: WorkerOrchestrator, request: DispatchRequest) -> Run:
    with anyio.fail_after(RUN_TIMEOUT_S):
        return await orchestrator.dispatch(request)


# -- a real CLI edits files in its own worktree --------------------------------------------------


@pytest.mark.parametrize(
    ("tool", "edit", "expected"),
    [
        ("exec_command", shell("printf 'hello\\n' > hello.txt"), {"hello.txt": "hello\n"}),
        (
            "apply_patch",
            patch("*** Update File: app.py", "@@", " def main():", "-    return 1", "+    return 2", "*** Add File: notes.md", "+why 2"),
            {"app.py": "def main():\n    return 2\n", "notes.md": "why 2\n"},
        ),
    ],
)  # fmt: skip
async def test_codex_edits_files_in_its_worktree_and_apply_brings_them_to_the_user(
    real_env: dict[str, str],
    stub: VendorStub,
    repo: Path,
    orchestrator_for: Callable[..., Awaitable[WorkerOrchestrator]],
    tool: str,
    edit: StubReply,
    expected: dict[str, str],
) -> None:
    stub.responder = lambda req: finished(req) if req.tool_outputs else edit
    orchestrator = await orchestrator_for(real_env, "codex")
    before = snapshot(repo)

    run = await dispatch(
        orchestrator, DispatchRequest(task="make the change", workers=["codex"], working_directory=str(repo))
    )

    assert run.status == "completed", run.error
    [wt] = run.worktrees
    worktree = Path(wt.path)
    assert [cwd_of(r) for r in stub.requests_for("openai")] == [worktree, worktree], "codex worked in the worktree"
    first, second = stub.requests_for("openai")
    assert first.tool_outputs == () and len(second.tool_outputs) == 1, "codex ran the tool and sent its result back"
    assert {name: (worktree / name).read_text(encoding="utf-8") for name in expected} == expected
    assert snapshot(repo) == before, "the user's tree and index were not touched while the run worked"
    for name, text in expected.items():
        assert f"+{text.splitlines()[-1]}" in wt.diff and f"b/{name}" in wt.diff, "the run's diff shows the edit"
    assert run.steps[0].output.startswith("done; the tool said:")

    applied = await orchestrator.apply(run.id)

    assert applied.applied, applied.message
    assert sorted(applied.files) == sorted(expected)
    assert {name: (repo / name).read_text(encoding="utf-8") for name in expected} == expected
    assert git(repo, "diff", "--cached", "--name-only") == "", "apply stages nothing"
    assert git(repo, "log", "--oneline").count("\n") == 1, "apply commits nothing"


@pytest.mark.parametrize(
    ("worker", "call"),
    [
        ("gemini", ToolCall("write_file", {"file_path": "from_gemini.txt", "content": "written by gemini\n"})),
        ("claude", ToolCall("Write", {"file_path": "from_claude.txt", "content": "written by claude\n"})),
    ],
)
async def test_gemini_and_claude_write_files_in_their_worktree(
    real_env: dict[str, str],
    stub: VendorStub,
    repo: Path,
    orchestrator_for: Callable[..., Awaitable[WorkerOrchestrator]],
    worker: str,
    call: ToolCall,
) -> None:
    stub.responder = lambda req: finished(req) if req.tool_outputs else StubReply(text="", tool_calls=(call,))
    orchestrator = await orchestrator_for(real_env, worker)
    name, content = str(call.arguments["file_path"]), str(call.arguments["content"])  # type: ignore[index]

    run = await dispatch(orchestrator, DispatchRequest(task="write it", workers=[worker], working_directory=str(repo)))

    assert run.status == "completed", run.error
    [wt] = run.worktrees
    assert (Path(wt.path) / name).read_text(encoding="utf-8") == content
    assert not (repo / name).exists() and git(repo, "status", "--porcelain") == ""
    assert f"+{content.strip()}" in wt.diff
    assert len(stub.requests) == 2 and stub.requests[1].tool_outputs, "the CLI ran its own tool and reported back"
    applied = await orchestrator.apply(run.id)
    assert applied.applied and applied.files == (name,)
    assert (repo / name).read_text(encoding="utf-8") == content


# -- review loop: real codex writes, real gemini reviews -----------------------------------------


async def test_a_real_reviewer_requests_changes_then_approves_the_revision(
    real_env: dict[str, str],
    stub: VendorStub,
    repo: Path,
    orchestrator_for: Callable[..., Awaitable[WorkerOrchestrator]],
) -> None:
    review = "greeting.txt line 1 says hello; the task asks for goodbye"
    patched: list[StubRequest] = []

    def model(req: StubRequest) -> StubReply:
        if req.api == "gemini":  # the reviewer judges the diff it was given
            if "+goodbye" in req.prompt:
                return StubReply(text="greeting.txt now says goodbye.\nVERDICT: APPROVE")
            return StubReply(text=f"{review}.\nVERDICT: REQUEST_CHANGES")
        # Round 2 resumes codex's own session, so its requests also carry round 1's tool output:
        # what to answer depends on where in the conversation the request is.
        if "revising your own work" in req.last_user_text:
            if not patched:
                patched.append(req)
                return patch("*** Update File: greeting.txt", "@@", "-hello", "+goodbye")
            return finished(req)
        if req.tool_outputs:
            return finished(req)
        return shell("printf 'hello\\n' > greeting.txt")

    stub.responder = model
    orchestrator = await orchestrator_for(real_env, "codex", "gemini")

    run = await dispatch(
        orchestrator,
        DispatchRequest(
            task="write a greeting that says goodbye",
            strategy="review_loop",
            workers=["codex", "gemini"],
            working_directory=str(repo),
        ),
    )

    assert run.status == "completed", run.error
    assert [(s.round, s.role, s.worker_name, s.runtime_mode, s.status, s.verdict) for s in run.steps] == [
        (1, "writer", "codex", "cli", "completed", None),
        (1, "reviewer", "gemini", "cli", "completed", "request_changes"),
        (2, "writer", "codex", "cli", "completed", None),
        (2, "reviewer", "gemini", "cli", "completed", "approve"),
    ]
    assert run.verdict == "approve"
    [revising] = patched
    revision = revising.last_user_text
    assert review in revision and "+hello" in revision, "the writer's round 2 carries the review and its diff"
    assert run.steps[2].continuation == "session", "the revision continued codex's own session"
    assert revising.tool_outputs, "the resumed session brought round 1's turns back to the model"
    [wt] = run.worktrees
    assert (Path(wt.path) / "greeting.txt").read_text(encoding="utf-8") == "goodbye\n", "revised in the same worktree"
    assert "+goodbye" in wt.diff and "hello" not in wt.diff
    assert not (repo / "greeting.txt").exists()


# -- parallel branches with real CLIs and an SDK ------------------------------------------------


async def test_consensus_of_codex_cli_gemini_sdk_and_claude_cli_answering_at_once(
    real_env: dict[str, str],
    stub: VendorStub,
    repo: Path,
    orchestrator_for: Callable[..., Awaitable[WorkerOrchestrator]],
) -> None:
    answers = Rendezvous(3)
    views = {"openai": "use a queue", "gemini": "use a queue", "anthropic": "use an append-only log"}

    def model(req: StubRequest) -> StubReply:
        if "You are the synthesizer" in req.prompt:
            return StubReply(text="All three want durability; codex and gemini say queue, claude says log.")
        assert "Answer the question below on your own" in req.prompt, req.prompt[-300:]
        return answers.meet() or StubReply(text=f"{req.api}: {views[req.api]}")

    stub.responder = model
    orchestrator = await orchestrator_for(real_env, "codex", "gemini", "claude", "claude-synth")

    run = await dispatch(
        orchestrator,
        DispatchRequest(
            task="how should jobs survive a restart?",
            strategy="parallel_consensus",
            workers=["codex", "gemini", "claude", "claude-synth"],
            runtime_modes={"gemini": "google_sdk"},
            working_directory=str(repo),
        ),
    )

    assert run.status == "completed", run.error
    assert [(s.role, s.worker_name, s.runtime_mode, s.fallback_from, s.status) for s in run.steps] == [
        ("answerer", "codex", "cli", None, "completed"),
        ("answerer", "gemini", "google_sdk", None, "completed"),
        ("answerer", "claude", "cli", None, "completed"),
        ("synthesizer", "claude-synth", "cli", None, "completed"),
    ]
    assert [s.output for s in run.steps[:3]] == [f"{api}: {view}" for api, view in views.items()]
    synthesis = stub.requests[-1]
    assert synthesis.api == "anthropic" and "You are the synthesizer" in synthesis.prompt
    assert all(f"{api}: {view}" in synthesis.prompt for api, view in views.items()), "the synthesis sees each answer"
    assert run.result == "All three want durability; codex and gemini say queue, claude says log."
    assert "google-genai" in stub.requests_for("gemini")[0].headers.get("x-goog-api-client", "")
    assert run.worktrees == [] and git(repo, "status", "--porcelain") == "", "answerers work read-only"


async def test_best_of_n_with_two_real_codex_writers_in_two_worktrees(
    real_env: dict[str, str],
    stub: VendorStub,
    repo: Path,
    orchestrator_for: Callable[..., Awaitable[WorkerOrchestrator]],
) -> None:
    writers = Rendezvous(2)

    def model(req: StubRequest) -> StubReply:
        if req.api == "anthropic":
            return StubReply(text="Both work; candidate 2 names its directory more clearly.\nCHOICE: 2")
        if req.tool_outputs:
            return finished(req)
        # Each writer's solution names its own worktree, so which one was applied shows.
        return writers.meet() or shell("printf 'solution from %s\\n' \"${PWD##*/}\" > solution.txt")

    stub.responder = model
    orchestrator = await orchestrator_for(real_env, "codex", "codex-b", "claude")

    run = await dispatch(
        orchestrator,
        DispatchRequest(
            task="solve it", strategy="best_of_n", workers=["codex", "codex-b", "claude"], working_directory=str(repo)
        ),
    )

    assert run.status == "completed", run.error
    assert [(s.role, s.worker_name, s.branch, s.status) for s in run.steps] == [
        ("writer", "codex", "1", "completed"),
        ("writer", "codex-b", "2", "completed"),
        ("judge", "claude", None, "completed"),
    ]
    assert run.chosen == "2"
    trees = {w.label: Path(w.path) for w in run.worktrees}
    assert sorted(trees) == ["1", "2"] and trees["1"] != trees["2"]
    assert {cwd_of(r) for r in stub.requests_for("openai")} == set(trees.values()), "each writer in its own worktree"
    solutions = {label: (path / "solution.txt").read_text(encoding="utf-8") for label, path in trees.items()}
    assert solutions == {label: f"solution from {path.name}\n" for label, path in trees.items()}
    judged = stub.requests_for("anthropic")[0].prompt
    assert all(f"+{text.strip()}" in judged for text in solutions.values()), "the judge compares both diffs"
    assert git(repo, "status", "--porcelain") == ""

    applied = await orchestrator.apply(run.id)

    assert applied.applied and applied.files == ("solution.txt",)
    assert (repo / "solution.txt").read_text(encoding="utf-8") == solutions["2"], "the judge's choice is applied"


# -- apply with and without conflicts; five runs at once -----------------------------------------

EDIT_APP = patch("*** Update File: app.py", "@@", " def main():", "-    return 1", "+    return 2")


async def test_apply_refuses_a_local_change_in_the_way_and_applies_once_it_is_gone(
    real_env: dict[str, str],
    stub: VendorStub,
    repo: Path,
    orchestrator_for: Callable[..., Awaitable[WorkerOrchestrator]],
) -> None:
    stub.responder = lambda req: finished(req) if req.tool_outputs else EDIT_APP
    orchestrator = await orchestrator_for(real_env, "codex")
    run = await dispatch(orchestrator, DispatchRequest(task="return 2", workers=["codex"], working_directory=str(repo)))
    assert run.status == "completed", run.error
    (repo / "app.py").write_text("def main():\n    return 'mine'\n", encoding="utf-8")  # typed while the run worked
    (repo / "README").write_text("unrelated\n", encoding="utf-8")
    before = snapshot(repo)

    refused = await orchestrator.apply(run.id)

    assert not refused.applied and refused.files == ("app.py",)
    assert "nothing was applied" in refused.message and "app.py" in refused.message
    assert snapshot(repo) == before, "no user change is lost"

    git(repo, "checkout", "--", "app.py")
    applied = await orchestrator.apply(run.id)

    assert applied.applied and applied.files == ("app.py",)
    assert (repo / "app.py").read_text(encoding="utf-8") == "def main():\n    return 2\n"
    assert (repo / "README").read_text(encoding="utf-8") == "unrelated\n", "a change out of the way stays"


async def test_apply_refuses_when_a_commit_since_dispatch_conflicts(
    real_env: dict[str, str],
    stub: VendorStub,
    repo: Path,
    orchestrator_for: Callable[..., Awaitable[WorkerOrchestrator]],
) -> None:
    stub.responder = lambda req: finished(req) if req.tool_outputs else EDIT_APP
    orchestrator = await orchestrator_for(real_env, "codex")
    run = await dispatch(orchestrator, DispatchRequest(task="return 2", workers=["codex"], working_directory=str(repo)))
    assert run.status == "completed", run.error
    (repo / "app.py").write_text("def main():\n    return 3\n", encoding="utf-8")
    git(repo, "commit", "-qam", "the user's own fix")
    head, before = git(repo, "rev-parse", "HEAD"), snapshot(repo)

    refused = await orchestrator.apply(run.id)

    assert not refused.applied and refused.files == ("app.py",)
    assert "commits made since the run started" in refused.message
    assert snapshot(repo) == before and git(repo, "rev-parse", "HEAD") == head
    assert git(repo, "diff", run.worktrees[0].base_commit, run.worktrees[0].branch, "--", "app.py").count(
        "+    return 2"
    )


async def test_five_concurrent_runs_of_real_codex_each_end_with_only_their_own_change(
    real_env: dict[str, str],
    stub: VendorStub,
    repo: Path,
    orchestrator_for: Callable[..., Awaitable[WorkerOrchestrator]],
) -> None:
    everyone = Rendezvous(5)

    def model(req: StubRequest) -> StubReply:
        if req.tool_outputs:
            return finished(req)
        job = re.search(r"create (job\d\.txt)", req.last_user_text)
        assert job, req.last_user_text
        return everyone.meet() or shell(f"printf '%s\\n' {job.group(1)} > {job.group(1)}")

    stub.responder = model
    orchestrator = await orchestrator_for(real_env, "codex", MCP_COLLAB_MAX_CONCURRENT_RUNS="5")
    async with orchestrator.running():
        started = [
            await orchestrator.start(DispatchRequest(task=f"create job{i}.txt", workers=["codex"], working_directory=str(repo)))
            for i in range(5)
        ]  # fmt: skip
        with anyio.fail_after(RUN_TIMEOUT_S):
            runs = [await orchestrator.wait(r.id, None) for r in started]

    assert git(repo, "status", "--porcelain") == "", "the user's tree was never touched"
    for i, run in enumerate(runs):
        assert run.status == "completed", run.error
        [wt] = run.worktrees
        assert git(repo, "diff", "--name-only", wt.base_commit, wt.branch).split() == [f"job{i}.txt"]
        assert git(repo, "show", f"{wt.branch}:job{i}.txt") == f"job{i}.txt\n"
    assert len({r.worktrees[0].branch for r in runs}) == 5
    for run in runs:
        assert (await orchestrator.apply(run.id)).applied
    assert sorted(p.name for p in repo.glob("job*.txt")) == [f"job{i}.txt" for i in range(5)]


# -- a same-size edit in the second the worktree was filled -------------------------------------


# Where a git index (version 2 to 4) keeps its first entry's stat data: ctime, mtime (seconds and
# nanoseconds each), dev, ino, mode, uid, gid, size, as 32-bit big-endian numbers after a 12-byte header.
INDEX_ENTRY_STAT = struct.Struct(">10I")
INDEX_HEADER_BYTES = 12


class InPlaceRewriter:
    """A cli runtime that edits app.py (same size) and leaves the worktree's index as git leaves it
    when the edit falls in the second the index was written: the entry's stat data is the file's,
    and the index is as new as the file ("racily clean"). Only reading the file tells the edit apart;
    codex's apply_patch above hits this by chance, here it is certain."""

    mode = "cli"

    async def aclose(self) -> None:  # the WorkerRuntime seam: nothing held
        return None

    async def run(self, request: StepRequest) -> RuntimeResult:
        assert request.working_directory is not None
        app = request.working_directory / "app.py"
        index = (
            Path((request.working_directory / ".git").read_text(encoding="utf-8").split(":", 1)[1].strip()) / "index"
        )
        app.write_text("def main():\n    return 2\n", encoding="utf-8")
        # A past second (not now): a copy of the index dated now would then no longer look racy.
        past = os.stat(app).st_mtime_ns - 10 * 10**9
        os.utime(app, ns=(past, past))
        now = os.stat(app)
        raw = bytearray(index.read_bytes())
        assert raw[:4] == b"DIRC" and int.from_bytes(raw[8:12], "big") == 1, "one entry: app.py"
        fields = list(INDEX_ENTRY_STAT.unpack_from(raw, INDEX_HEADER_BYTES))
        fields[:6] = [int(now.st_ctime), now.st_ctime_ns % 10**9, int(now.st_mtime), now.st_mtime_ns % 10**9,
                      now.st_dev & 0xFFFFFFFF, now.st_ino & 0xFFFFFFFF]  # fmt: skip
        fields[9] = now.st_size
        INDEX_ENTRY_STAT.pack_into(raw, INDEX_HEADER_BYTES, *fields)
        raw[-20:] = hashlib.sha1(raw[:-20]).digest()
        index.write_bytes(bytes(raw))
        os.utime(index, ns=(past, past))
        return RuntimeResult(text="return 2 now", exit_code=0)


async def test_a_same_size_edit_in_the_second_of_the_fill_is_in_the_diff_and_is_applied(
    make_settings: Callable[..., Settings], repo: Path
) -> None:
    orchestrator = WorkerOrchestrator(make_settings(), runtimes={"cli": InPlaceRewriter()})  # type: ignore[dict-item]
    await orchestrator.register_worker(WorkerSpec(name="w", model="codex_cli"))

    run = await dispatch(orchestrator, DispatchRequest(task="return 2", workers=["w"], working_directory=str(repo)))

    assert run.status == "completed", run.error
    [wt] = run.worktrees
    assert "-    return 1\n+    return 2" in wt.diff, "git re-read the racily clean file instead of trusting its stat"
    assert wt.tip != wt.base_commit, "the edit was committed on the run's branch"
    applied = await orchestrator.apply(run.id)
    assert applied.applied and applied.files == ("app.py",)
    assert (repo / "app.py").read_text(encoding="utf-8") == "def main():\n    return 2\n"
