"""A run's writer gets a git worktree of its own, made from what the user had checked out (their
uncommitted changes included), without touching the user's working tree, index or branches; its work
comes back through a clean apply or a clear refusal; discarding and retention remove it. Real git in a
temporary directory throughout; no git operation runs a program the repository names.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest

from mcp_collab import worktrees
from mcp_collab.errors import InvalidRequestError, WorktreeError
from mcp_collab.worktrees import Worktree

# Generous: every operation here takes milliseconds on a handful of files.
DEADLINE_S = 60.0
ORIGINAL = "def parse(s):\n    return s.split()\n"
EDITED = "def parse(s):\n    if not s:\n        return []\n    return s.split()\n"
# A few bytes that are not text: git shows and applies them as a binary patch.
PNG = bytes(range(256)) * 4


def git(cwd: Path, *args: str, env: dict[str, str] | None = None, check: bool = True) -> str:
    done = subprocess.run(
        ["git", "-c", "user.email=t@t", "-c", "user.name=t", *args],
        cwd=cwd, env=env, capture_output=True, text=True, check=False, timeout=DEADLINE_S,
    )  # fmt: skip
    if check:
        assert done.returncode == 0, f"git {' '.join(args)}: {done.stderr}"
    return done.stdout


def files_of(top: Path) -> dict[str, bytes]:
    """Every file of a working tree (tracked, untracked and ignored), by path, outside .git."""
    found = {}
    for path in sorted(top.rglob("*")):
        rel = path.relative_to(top)
        if rel.parts[0] == ".git" or path.is_dir():
            continue
        found[str(rel)] = path.read_bytes()
    return found


@dataclass
class UserState:
    files: dict[str, bytes]
    index: bytes
    head: str
    branches: str
    stash: str

    @classmethod
    def of(cls, top: Path) -> UserState:
        return cls(
            files=files_of(top),
            index=(top / ".git" / "index").read_bytes() if (top / ".git" / "index").exists() else b"",
            head=(top / ".git" / "HEAD").read_bytes().decode(),
            branches=git(top, "for-each-ref", "--format=%(refname) %(objectname)", "refs/heads/", "refs/tags/"),
            stash=git(top, "stash", "list"),
        )

    def without_runs(self) -> UserState:
        kept = "".join(line + "\n" for line in self.branches.splitlines() if "refs/heads/mcp-collab/" not in line)
        return UserState(self.files, self.index, self.head, kept, self.stash)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    top = tmp_path / "repo"
    top.mkdir()
    git(top, "init", "-q", "-b", "main")
    (top / "parse.py").write_text(ORIGINAL, encoding="utf-8")
    (top / "notes.txt").write_text("notes\n", encoding="utf-8")
    (top / "old_name.txt").write_text("a file the writer renames\n" * 5, encoding="utf-8")
    (top / "doomed.txt").write_text("a file the writer deletes\n", encoding="utf-8")
    (top / ".gitignore").write_text("build/\n", encoding="utf-8")
    (top / "icon.bin").write_bytes(bytes(range(255, -1, -1)))
    git(top, "add", ".")
    git(top, "commit", "-qm", "init")
    return top


@pytest.fixture
def base_dir(tmp_path: Path) -> Path:
    return tmp_path / "state" / "worktrees"


async def start(top: Path, tmp_path: Path, base_dir: Path, run_id: str = "run-1", label: str | None = None) -> Worktree:
    with anyio.fail_after(DEADLINE_S):
        repo = await worktrees.inspect(top, (tmp_path,))
        assert repo is not None
        return await worktrees.create(repo, run_id=run_id, label=label, base_dir=base_dir)


def listed(top: Path) -> str:
    return git(top, "worktree", "list", "--porcelain")


def runs_of(top: Path) -> list[str]:
    return git(top, "for-each-ref", "--format=%(refname:short)", "refs/heads/mcp-collab/").split()


def changed_on_branch(top: Path, wt: Worktree) -> list[str]:
    return git(top, "diff", "--name-only", wt.base_commit, wt.branch).split()


# ---------------------------------------------------------------------------------------------
# Creating


@pytest.mark.anyio
async def test_a_clean_repository_gives_a_worktree_at_head_on_a_branch_of_its_own(
    repo: Path, tmp_path: Path, base_dir: Path
) -> None:
    head = git(repo, "rev-parse", "HEAD").strip()
    before = UserState.of(repo)

    wt = await start(repo, tmp_path, base_dir)

    assert wt.path == (base_dir / "run-1").resolve() and wt.branch == "mcp-collab/run-1"
    assert wt.head_commit == wt.base_commit == head and not wt.carried_changes
    assert f"worktree {wt.path}\nHEAD {head}\nbranch refs/heads/mcp-collab/run-1\n" in listed(repo)
    assert files_of(wt.path) == files_of(repo)
    assert (wt.path / ".git").read_text(encoding="utf-8") == f"gitdir: {repo / '.git' / 'worktrees' / 'run-1'}\n"
    # The user's own git works in it: a clean status, the branch checked out.
    assert git(wt.path, "status", "--porcelain") == ""
    assert git(wt.path, "rev-parse", "--abbrev-ref", "HEAD").strip() == "mcp-collab/run-1"
    assert UserState.of(repo).without_runs() == before


@pytest.mark.anyio
async def test_uncommitted_tracked_and_untracked_changes_are_carried_over_and_the_users_tree_is_untouched(
    repo: Path, tmp_path: Path, base_dir: Path
) -> None:
    head = git(repo, "rev-parse", "HEAD").strip()
    (repo / "parse.py").write_text(EDITED, encoding="utf-8")  # modified, not staged
    (repo / "staged.txt").write_text("staged\n", encoding="utf-8")
    git(repo, "add", "staged.txt")  # staged
    (repo / "draft.txt").write_text("untracked draft\n", encoding="utf-8")  # untracked
    (repo / "notes.txt").unlink()  # deleted
    (repo / "build").mkdir()
    (repo / "build" / "out.bin").write_bytes(b"ignored build output")  # ignored
    before = UserState.of(repo)

    with anyio.fail_after(DEADLINE_S):
        inspected = await worktrees.inspect(repo, (tmp_path,))
        assert inspected is not None and inspected.dirty and inspected.head_commit == head
        assert inspected.branch == "main"
        wt = await worktrees.create(inspected, run_id="run-2", label=None, base_dir=base_dir)

    assert wt.carried_changes and wt.head_commit == head and wt.base_commit != head
    assert git(repo, "rev-parse", f"{wt.base_commit}^").strip() == head
    assert "uncommitted changes at dispatch of run-2" in git(repo, "log", "-1", "--format=%s", wt.base_commit)
    seen = files_of(wt.path)
    assert seen["parse.py"] == EDITED.encode() and seen["staged.txt"] == b"staged\n"
    assert seen["draft.txt"] == b"untracked draft\n"
    assert "notes.txt" not in seen and "build/out.bin" not in seen, "deleted and ignored files stay out"
    assert git(wt.path, "status", "--porcelain") == "", "the writer starts from a clean tree"
    after = UserState.of(repo)
    assert after.without_runs() == before, "working tree, index, HEAD, branches and stash as they were"
    assert after.branches.count("refs/heads/mcp-collab/") == 1


@pytest.mark.anyio
async def test_writers_of_one_run_start_from_the_same_carried_over_commit(
    repo: Path, tmp_path: Path, base_dir: Path
) -> None:
    (repo / "draft.txt").write_text("untracked draft\n", encoding="utf-8")
    with anyio.fail_after(DEADLINE_S):
        inspected = await worktrees.inspect(repo, (tmp_path,))
        assert inspected is not None
        a = await worktrees.create(inspected, run_id="run-3", label="a", base_dir=base_dir)
        b = await worktrees.create(inspected, run_id="run-3", label="b", base_dir=base_dir)
    assert a.base_commit == b.base_commit and a.carried_changes
    assert (a.branch, b.branch) == ("mcp-collab/run-3-a", "mcp-collab/run-3-b")
    assert (a.path.name, b.path.name) == ("run-3-a", "run-3-b")


@pytest.mark.anyio
async def test_an_unborn_branch_starts_the_run_from_a_root_commit_of_the_users_files(tmp_path: Path) -> None:
    top = tmp_path / "fresh"
    top.mkdir()
    git(top, "init", "-q", "-b", "main")
    (top / "idea.md").write_text("what to build\n", encoding="utf-8")
    base_dir = tmp_path / "wts"

    with anyio.fail_after(DEADLINE_S):
        inspected = await worktrees.inspect(top, (tmp_path,))
        assert inspected is not None
        assert inspected.head_commit is None and inspected.branch == "main" and inspected.dirty
        wt = await worktrees.create(inspected, run_id="run-4", label=None, base_dir=base_dir)
        assert wt.head_commit is None and wt.carried_changes
        assert git(top, "rev-list", "--parents", "-1", wt.base_commit).split() == [wt.base_commit], "no parent"
        assert (wt.path / "idea.md").read_text(encoding="utf-8") == "what to build\n"
        (wt.path / "main.py").write_text("print('built')\n", encoding="utf-8")
        assert await worktrees.commit(wt, "build it") is not None
        result = await worktrees.apply(top, wt, roots=(tmp_path,))

    assert result.applied and result.files == ("main.py",)
    assert (top / "main.py").read_text(encoding="utf-8") == "print('built')\n"
    assert git(top, "status", "--porcelain", "-uall").splitlines() == ["?? idea.md", "?? main.py"]
    with pytest.raises(subprocess.CalledProcessError):
        subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=top, check=True, capture_output=True)


@pytest.mark.anyio
async def test_an_empty_unborn_repository_still_gets_a_worktree(tmp_path: Path) -> None:
    top = tmp_path / "empty"
    top.mkdir()
    git(top, "init", "-q", "-b", "main")
    with anyio.fail_after(DEADLINE_S):
        inspected = await worktrees.inspect(top, (tmp_path,))
        assert inspected is not None and not inspected.dirty and inspected.head_commit is None
        wt = await worktrees.create(inspected, run_id="run-5", label=None, base_dir=tmp_path / "wts")
    assert git(top, "ls-tree", wt.base_commit) == "" and files_of(wt.path) == {}
    assert git(wt.path, "status", "--porcelain") == ""


@pytest.mark.anyio
async def test_outside_a_repository_there_is_no_repo_to_isolate(tmp_path: Path) -> None:
    with anyio.fail_after(DEADLINE_S):
        assert await worktrees.inspect(tmp_path, (tmp_path,)) is None


@pytest.mark.anyio
async def test_five_concurrent_writers_each_end_with_only_their_own_change_on_their_own_branch(
    repo: Path, tmp_path: Path, base_dir: Path
) -> None:
    made: dict[int, Worktree] = {}

    async def writer(i: int) -> None:
        wt = await start(repo, tmp_path, base_dir, run_id=f"run-{i}")
        (wt.path / f"feature_{i}.py").write_text(f"FEATURE = {i}\n", encoding="utf-8")
        (wt.path / "notes.txt").write_text(f"notes of writer {i}\n", encoding="utf-8")
        assert await worktrees.commit(wt, f"writer {i}") is not None
        made[i] = wt

    with anyio.fail_after(DEADLINE_S):
        async with anyio.create_task_group() as tg:
            for i in range(5):
                tg.start_soon(writer, i)

    for i, wt in made.items():
        assert sorted(changed_on_branch(repo, wt)) == [f"feature_{i}.py", "notes.txt"]
        assert git(repo, "show", f"{wt.branch}:notes.txt") == f"notes of writer {i}\n"
    assert listed(repo).count("branch refs/heads/mcp-collab/") == 5
    assert git(repo, "status", "--porcelain") == ""


# A child process that creates three worktrees on one repository at once, as a second server would.
CHILD = """
import sys, anyio
from pathlib import Path
from mcp_collab import worktrees
top, roots, base_dir, prefix = Path(sys.argv[1]), (Path(sys.argv[2]),), Path(sys.argv[3]), sys.argv[4]
async def one(i):
    repo = await worktrees.inspect(top, roots)
    wt = await worktrees.create(repo, run_id=f"{prefix}-{i}", label=None, base_dir=base_dir)
    (wt.path / f"{prefix}_{i}.txt").write_text(f"{prefix} {i}\\n", encoding="utf-8")
    await worktrees.commit(wt, f"{prefix} {i}")
async def main():
    async with anyio.create_task_group() as tg:
        for i in range(3):
            tg.start_soon(one, i)
anyio.run(main)
"""


@pytest.mark.anyio
async def test_creates_from_several_processes_at_once_all_succeed(repo: Path, tmp_path: Path, base_dir: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD, encoding="utf-8")

    async def child(prefix: str) -> None:
        done = await anyio.run_process(
            [sys.executable, str(script), str(repo), str(tmp_path), str(base_dir), prefix], check=False
        )
        assert done.returncode == 0, done.stderr.decode()

    with anyio.fail_after(DEADLINE_S):
        async with anyio.create_task_group() as tg:
            for prefix in ("p", "q"):
                tg.start_soon(child, prefix)
            for i in range(3):
                tg.start_soon(start, repo, tmp_path, base_dir, f"here-{i}")

    assert runs_of(repo) == sorted(
        [f"mcp-collab/{p}-{i}" for p in ("p", "q") for i in range(3)] + [f"mcp-collab/here-{i}" for i in range(3)]
    )
    for p in ("p", "q"):
        for i in range(3):
            assert git(repo, "diff", "--name-only", "HEAD", f"mcp-collab/{p}-{i}").split() == [f"{p}_{i}.txt"]
    assert not list((repo / ".git").rglob("*.lock")), "no lock left behind"


@pytest.mark.anyio
async def test_a_branch_named_mcp_collab_in_the_way_is_refused_and_nothing_is_left(
    repo: Path, tmp_path: Path, base_dir: Path
) -> None:
    git(repo, "branch", "mcp-collab")
    with pytest.raises(WorktreeError, match=r"the ref refs/heads/mcp-collab is in the way"):
        await start(repo, tmp_path, base_dir)
    assert "mcp-collab/run-1" not in listed(repo)
    assert not (base_dir / "run-1").exists() and not (repo / ".git" / "worktrees" / "run-1").exists()


@pytest.mark.anyio
async def test_a_run_id_that_cannot_name_a_branch_or_directory_is_refused(
    repo: Path, tmp_path: Path, base_dir: Path
) -> None:
    with anyio.fail_after(DEADLINE_S):
        inspected = await worktrees.inspect(repo, (tmp_path,))
    assert inspected is not None
    for bad in ("../escape", "a/b", "x.lock", "", "-flag", "a..b"):
        with pytest.raises(InvalidRequestError, match="accepted are 1 to 100 letters"):
            await worktrees.create(inspected, run_id=bad, label=None, base_dir=base_dir)
    with pytest.raises(InvalidRequestError, match="writer label"):
        await worktrees.create(inspected, run_id="run-1", label="a/b", base_dir=base_dir)
    assert not base_dir.exists() or list(base_dir.iterdir()) == []


@pytest.mark.anyio
async def test_worktrees_inside_the_users_working_tree_are_refused(repo: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError, match="inside the working tree"):
        await start(repo, tmp_path, repo / ".worktrees")
    assert git(repo, "status", "--porcelain") == ""


@pytest.mark.anyio
async def test_a_create_that_fails_half_way_leaves_no_branch_entry_or_directory(
    repo: Path, tmp_path: Path, base_dir: Path
) -> None:
    with anyio.fail_after(DEADLINE_S):
        inspected = await worktrees.inspect(repo, (tmp_path,))
    assert inspected is not None
    blob = git(repo, "rev-parse", "HEAD:notes.txt").strip()
    (repo / ".git" / "objects" / blob[:2] / blob[2:]).unlink()  # the checkout cannot write notes.txt
    with anyio.fail_after(DEADLINE_S), pytest.raises(WorktreeError, match=r"cannot fill the worktree .*run-1"):
        await worktrees.create(inspected, run_id="run-1", label=None, base_dir=base_dir)
    assert runs_of(repo) == [] and "run-1" not in listed(repo)
    assert list(base_dir.iterdir()) == [] and list((repo / ".git").glob("worktrees/*")) == []


@pytest.mark.anyio
async def test_a_second_worktree_for_the_same_run_is_refused(repo: Path, tmp_path: Path, base_dir: Path) -> None:
    await start(repo, tmp_path, base_dir)
    with pytest.raises(WorktreeError, match="already exists"):
        await start(repo, tmp_path, base_dir)
    assert listed(repo).count("mcp-collab/run-1") == 1


# ---------------------------------------------------------------------------------------------
# Reading and committing


@pytest.mark.anyio
async def test_the_diff_holds_the_writers_commits_edits_and_new_files_but_not_the_carried_changes(
    repo: Path, tmp_path: Path, base_dir: Path
) -> None:
    (repo / "notes.txt").write_text("the user's own edit\n", encoding="utf-8")
    wt = await start(repo, tmp_path, base_dir)
    (wt.path / "parse.py").write_text(EDITED, encoding="utf-8")
    assert await worktrees.commit(wt, "first part") is not None
    (wt.path / "test_parse.py").write_text("def test_empty():\n    pass\n", encoding="utf-8")  # untracked
    (wt.path / "logo.png").write_bytes(PNG)
    (wt.path / "build").mkdir()
    (wt.path / "build" / "junk.o").write_bytes(b"ignored")

    with anyio.fail_after(DEADLINE_S):
        text = await worktrees.diff(wt, max_bytes=100_000)
        short = await worktrees.diff(wt, max_bytes=200)

    assert "+    if not s:" in text and "b/test_parse.py" in text
    assert "GIT binary patch" in text and "b/logo.png" in text
    assert "notes.txt" not in text and "junk.o" not in text
    assert short.endswith("[... diff truncated ...]\n") and len(short) < 300


@pytest.mark.anyio
async def test_commit_records_the_worktree_on_its_branch_and_nothing_when_unchanged(
    repo: Path, tmp_path: Path, base_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wt = await start(repo, tmp_path, base_dir)
    with anyio.fail_after(DEADLINE_S):
        assert await worktrees.commit(wt, "nothing yet") is None
        (wt.path / "parse.py").write_text(EDITED, encoding="utf-8")
        (wt.path / "new.txt").write_text("new\n", encoding="utf-8")
        first = await worktrees.commit(wt, "handle empty input")
        monkeypatch.setenv("GIT_AUTHOR_NAME", "Ada")
        monkeypatch.setenv("GIT_AUTHOR_EMAIL", "ada@example.invalid")
        (wt.path / "new.txt").unlink()
        second = await worktrees.commit(wt, "drop new.txt")

    assert first and second
    assert git(repo, "rev-parse", wt.branch).strip() == second
    assert git(repo, "log", "--format=%s|%an <%ae>|%cn", f"{wt.base_commit}..{wt.branch}").splitlines() == [
        "drop new.txt|Ada <ada@example.invalid>|mcp-collab",
        "handle empty input|mcp-collab <mcp-collab@localhost>|mcp-collab",
    ]
    assert git(wt.path, "status", "--porcelain") == "", "the worktree's own git sees the commit as its state"
    assert changed_on_branch(repo, wt) == ["parse.py"]


# ---------------------------------------------------------------------------------------------
# Applying


@pytest.mark.anyio
async def test_a_clean_apply_changes_the_working_tree_only_and_keeps_the_users_other_changes(
    repo: Path, tmp_path: Path, base_dir: Path
) -> None:
    wt = await start(repo, tmp_path, base_dir)
    (wt.path / "parse.py").write_text(EDITED, encoding="utf-8")
    (wt.path / "test_parse.py").write_text("def test_empty():\n    pass\n", encoding="utf-8")
    assert await worktrees.commit(wt, "writer") is not None
    (repo / "notes.txt").write_text("typed while the run worked\n", encoding="utf-8")
    index_before = (repo / ".git" / "index").read_bytes()
    refs_before = UserState.of(repo).branches

    with anyio.fail_after(DEADLINE_S):
        result = await worktrees.apply(repo, wt, roots=(tmp_path,))

    assert result.applied and result.files == ("parse.py", "test_parse.py")
    assert "nothing staged or committed" in result.message
    assert (repo / "parse.py").read_text(encoding="utf-8") == EDITED
    assert (repo / "notes.txt").read_text(encoding="utf-8") == "typed while the run worked\n"
    assert (repo / ".git" / "index").read_bytes() == index_before and UserState.of(repo).branches == refs_before
    assert sorted(git(repo, "status", "--porcelain").splitlines()) == [
        " M notes.txt",
        " M parse.py",
        "?? test_parse.py",
    ]


@pytest.mark.anyio
async def test_apply_brings_a_binary_a_deleted_and_a_renamed_file(repo: Path, tmp_path: Path, base_dir: Path) -> None:
    wt = await start(repo, tmp_path, base_dir)
    (wt.path / "logo.png").write_bytes(PNG)
    (wt.path / "icon.bin").write_bytes(PNG[::3])
    (wt.path / "doomed.txt").unlink()
    (wt.path / "old_name.txt").rename(wt.path / "new_name.txt")
    (wt.path / "tool.sh").write_text("#!/bin/sh\n", encoding="utf-8")
    (wt.path / "tool.sh").chmod(0o755)
    assert await worktrees.commit(wt, "writer") is not None

    with anyio.fail_after(DEADLINE_S):
        result = await worktrees.apply(repo, wt, roots=(tmp_path,))

    assert result.applied
    assert set(result.files) == {"logo.png", "icon.bin", "doomed.txt", "old_name.txt", "new_name.txt", "tool.sh"}
    assert (repo / "logo.png").read_bytes() == PNG and (repo / "icon.bin").read_bytes() == PNG[::3]
    assert not (repo / "doomed.txt").exists() and not (repo / "old_name.txt").exists()
    assert (repo / "new_name.txt").read_text(encoding="utf-8") == "a file the writer renames\n" * 5
    assert (repo / "tool.sh").stat().st_mode & stat.S_IXUSR


@dataclass(frozen=True)
class InTheWay:
    writer: Callable[[Path], None]  # what the run changes
    user: Callable[[Path], None]  # what the user did meanwhile, which the apply must not lose
    named: tuple[str, ...]


IN_THE_WAY: dict[str, InTheWay] = {
    "conflicting_edit": InTheWay(
        lambda t: (t / "parse.py").write_text(EDITED, encoding="utf-8"),
        lambda t: (t / "parse.py").write_text("def parse(s):\n    return list(s)\n", encoding="utf-8"),
        ("parse.py",),
    ),
    "untracked_file_where_the_run_adds_one": InTheWay(
        lambda t: (t / "report.md").write_text("the writer's report\n", encoding="utf-8"),
        lambda t: (t / "report.md").write_text("the user's own report\n", encoding="utf-8"),
        ("report.md",),
    ),
    "local_edit_of_a_file_the_run_deletes": InTheWay(
        lambda t: (t / "doomed.txt").unlink(),
        lambda t: (t / "doomed.txt").write_text("the user still needs this\n", encoding="utf-8"),
        ("doomed.txt",),
    ),
    "local_edit_of_a_file_the_run_renames": InTheWay(
        lambda t: (t / "old_name.txt").rename(t / "new_name.txt"),
        lambda t: (t / "old_name.txt").write_text("rewritten by the user\n", encoding="utf-8"),
        ("old_name.txt",),
    ),
    "local_edit_of_a_binary_file": InTheWay(
        lambda t: (t / "icon.bin").write_bytes(PNG),
        lambda t: (t / "icon.bin").write_bytes(b"\x00the user's own icon"),
        ("icon.bin",),
    ),
    "file_the_run_edits_deleted_locally": InTheWay(
        lambda t: (t / "notes.txt").write_text("notes, extended\n", encoding="utf-8"),
        lambda t: (t / "notes.txt").unlink(),
        ("notes.txt",),
    ),
}


@pytest.mark.anyio
@pytest.mark.parametrize("case", sorted(IN_THE_WAY))
async def test_apply_is_refused_whole_when_local_changes_are_in_the_way_and_nothing_changes(
    repo: Path, tmp_path: Path, base_dir: Path, case: str
) -> None:
    way = IN_THE_WAY[case]
    wt = await start(repo, tmp_path, base_dir)
    way.writer(wt.path)
    (wt.path / "also_new.txt").write_text("a change that would apply on its own\n", encoding="utf-8")
    assert await worktrees.commit(wt, "writer") is not None
    way.user(repo)
    (repo / "scratch.txt").write_text("an untracked file of the user\n", encoding="utf-8")
    before = UserState.of(repo)

    with anyio.fail_after(DEADLINE_S):
        result = await worktrees.apply(repo, wt, roots=(tmp_path,))

    assert not result.applied and result.files == way.named
    assert result.message.startswith("nothing was applied") and way.named[0] in result.message
    assert "Commit or stash" in result.message
    assert UserState.of(repo) == before, "not a byte of the user's tree, index or branches changed"
    assert not (repo / "also_new.txt").exists(), "all or nothing"


@pytest.mark.anyio
async def test_apply_of_a_discarded_run_says_the_branch_is_gone(repo: Path, tmp_path: Path, base_dir: Path) -> None:
    wt = await start(repo, tmp_path, base_dir)
    await worktrees.remove(wt)
    with pytest.raises(WorktreeError, match=r"mcp-collab/run-1 no longer exists .*nothing was applied"):
        await worktrees.apply(repo, wt, roots=(tmp_path,))


@pytest.mark.anyio
async def test_apply_refuses_a_branch_that_is_not_a_runs(repo: Path, tmp_path: Path) -> None:
    head = git(repo, "rev-parse", "HEAD").strip()

    @dataclass(frozen=True)
    class Info:
        branch: str
        base_commit: str

    with pytest.raises(InvalidRequestError, match="not a run's branch"):
        await worktrees.apply(repo, Info("main", head), roots=(tmp_path,))
    with pytest.raises(InvalidRequestError, match="not a commit id"):
        await worktrees.apply(repo, Info("mcp-collab/run-1", "HEAD~1"), roots=(tmp_path,))


# ---------------------------------------------------------------------------------------------
# Discarding and retention


@pytest.mark.anyio
async def test_remove_takes_away_directory_entry_and_branch_and_is_idempotent(
    repo: Path, tmp_path: Path, base_dir: Path
) -> None:
    keeper = await start(repo, tmp_path, base_dir, run_id="keeper")
    wt = await start(repo, tmp_path, base_dir)
    (wt.path / "work.txt").write_text("uncommitted work of a discarded run\n", encoding="utf-8")
    with anyio.fail_after(DEADLINE_S):
        await worktrees.remove(wt)
        await worktrees.remove(wt)

    assert not wt.path.exists()
    assert str(wt.path) not in listed(repo) and str(keeper.path) in listed(repo)
    assert runs_of(repo) == ["mcp-collab/keeper"]
    assert git(repo, "worktree", "prune", "--dry-run", "--verbose") == ""
    assert git(keeper.path, "status", "--porcelain") == ""


@pytest.mark.anyio
async def test_remove_after_the_directory_was_deleted_by_hand_and_with_a_packed_branch(
    repo: Path, tmp_path: Path, base_dir: Path
) -> None:
    wt = await start(repo, tmp_path, base_dir)
    git(repo, "tag", "v1")
    git(repo, "pack-refs", "--all")  # what `git gc` does: the run's branch now lives in packed-refs
    assert "refs/heads/mcp-collab/run-1" in (repo / ".git" / "packed-refs").read_text(encoding="utf-8")
    shutil.rmtree(wt.path)

    with anyio.fail_after(DEADLINE_S):
        await worktrees.remove(wt)

    assert "mcp-collab" not in (repo / ".git" / "packed-refs").read_text(encoding="utf-8")
    assert git(repo, "for-each-ref", "--format=%(refname)").split() == ["refs/heads/main", "refs/tags/v1"]
    assert str(wt.path) not in listed(repo)
    git(repo, "fsck", "--no-progress")


@pytest.mark.anyio
async def test_remove_can_keep_the_branch_and_removes_read_only_directories(
    repo: Path, tmp_path: Path, base_dir: Path
) -> None:
    wt = await start(repo, tmp_path, base_dir)
    locked = wt.path / "locked"
    locked.mkdir()
    (locked / "file.txt").write_text("x\n", encoding="utf-8")
    locked.chmod(0o500)
    with anyio.fail_after(DEADLINE_S):
        await worktrees.remove(wt, delete_branch=False)
    assert not wt.path.exists() and str(wt.path) not in listed(repo)
    assert git(repo, "rev-parse", "--verify", wt.branch).strip() == wt.base_commit


@pytest.mark.anyio
async def test_remove_refuses_a_branch_the_user_checked_out_and_removes_nothing(
    repo: Path, tmp_path: Path, base_dir: Path
) -> None:
    wt = await start(repo, tmp_path, base_dir)
    elsewhere = tmp_path / "inspecting"
    git(repo, "worktree", "add", "-q", "-f", str(elsewhere), wt.branch)  # the user looks at the run's branch
    with pytest.raises(WorktreeError, match=rf"checked out in {elsewhere}: nothing was removed"):
        await worktrees.remove(wt)
    assert wt.path.exists() and str(wt.path) in listed(repo)
    assert git(repo, "rev-parse", "--verify", wt.branch).strip() == wt.base_commit


@pytest.mark.anyio
async def test_remove_after_the_user_removed_or_moved_the_worktree_with_git(
    repo: Path, tmp_path: Path, base_dir: Path
) -> None:
    removed_by_user = await start(repo, tmp_path, base_dir, run_id="removed")
    moved_by_user = await start(repo, tmp_path, base_dir, run_id="moved")
    git(repo, "worktree", "remove", str(removed_by_user.path))
    git(repo, "worktree", "move", str(moved_by_user.path), str(tmp_path / "moved-here"))

    with anyio.fail_after(DEADLINE_S):
        await worktrees.remove(removed_by_user)
        with pytest.raises(WorktreeError, match=r"mcp-collab/moved of run moved is checked out in .*moved-here"):
            await worktrees.remove(moved_by_user)

    assert runs_of(repo) == ["mcp-collab/moved"]
    assert git(tmp_path / "moved-here", "status", "--porcelain") == "", "the moved worktree still works"


def test_the_users_subdirectory_maps_into_the_worktree(repo: Path, tmp_path: Path, base_dir: Path) -> None:
    (repo / "pkg").mkdir()
    wt = anyio.run(start, repo, tmp_path, base_dir)
    assert worktrees.working_directory(wt, repo / "pkg") == wt.path / "pkg"
    assert worktrees.working_directory(wt, repo) == wt.path
    with pytest.raises(InvalidRequestError, match="not inside the working tree"):
        worktrees.working_directory(wt, tmp_path)


@pytest.mark.anyio
async def test_remove_leaves_a_directory_that_is_not_the_runs_worktree(
    repo: Path, tmp_path: Path, base_dir: Path
) -> None:
    wt = await start(repo, tmp_path, base_dir)
    await worktrees.remove(wt)
    wt.path.mkdir()
    (wt.path / "precious.txt").write_text("someone else's\n", encoding="utf-8")
    with pytest.raises(WorktreeError, match="not the worktree of run run-1"):
        await worktrees.remove(wt)
    assert (wt.path / "precious.txt").exists()


@pytest.mark.anyio
async def test_prune_removes_the_worktrees_and_branches_of_runs_not_kept(
    repo: Path, tmp_path: Path, base_dir: Path
) -> None:
    for run_id in ("old-1", "old-2", "recent"):
        await start(repo, tmp_path, base_dir, run_id=run_id)
    await start(repo, tmp_path, base_dir, run_id="old-3", label="a")
    (base_dir / "not-a-worktree").mkdir()

    with anyio.fail_after(DEADLINE_S):
        removed = await worktrees.prune(base_dir, keep=lambda run_id: run_id == "recent")

    assert sorted(Path(p).name for p in removed) == ["old-1", "old-2", "old-3-a"]
    assert sorted(p.name for p in base_dir.iterdir()) == ["not-a-worktree", "recent"]
    assert runs_of(repo) == ["mcp-collab/recent"]
    with anyio.fail_after(DEADLINE_S):
        assert await worktrees.prune(base_dir, keep=lambda run_id: run_id == "recent") == []


def test_a_worktree_is_read_back_from_its_directory(repo: Path, tmp_path: Path, base_dir: Path) -> None:
    wt = anyio.run(start, repo, tmp_path, base_dir, "run-9", "b")
    assert worktrees.worktree_at(wt.path) == wt
    assert worktrees.worktree_at(tmp_path) is None
    record = json.loads((wt.admin / "mcp-collab.json").read_text(encoding="utf-8"))
    assert record["baseCommit"] == wt.base_commit


# ---------------------------------------------------------------------------------------------
# No program the repository names ever runs


@dataclass
class Lab:
    tmp: Path
    repo: Path
    markers: Path
    evil: Path

    def command(self, name: str) -> str:
        return f"{shlex.quote(str(self.evil))} {name}"

    def fired(self) -> list[str]:
        return sorted(p.name for p in self.markers.iterdir())

    def hook(self, directory: Path, name: str, marker: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text(f"#!/bin/sh\nexec {self.command(marker)}\n", encoding="utf-8")
        (directory / name).chmod(0o755)


@pytest.fixture
def lab(repo: Path, tmp_path: Path) -> Lab:
    markers = tmp_path / "markers"
    markers.mkdir()
    evil = tmp_path / "evil.sh"
    # Records that it ran, then passes its input through so a filter that ran would not also break the files.
    evil.write_text(
        f'#!/bin/sh\ntouch {shlex.quote(str(markers))}/"$1"\ncase "$1" in *filter*) exec cat;; esac\n',
        encoding="utf-8",
    )
    evil.chmod(0o755)
    return Lab(tmp=tmp_path, repo=repo, markers=markers, evil=evil)


def _ordinary_worktree_add(lab: Lab) -> None:
    git(lab.repo, "worktree", "add", "-q", "-b", "ordinary", str(lab.tmp / "ordinary"))
    git(lab.repo, "worktree", "remove", "--force", str(lab.tmp / "ordinary"))
    git(lab.repo, "branch", "-D", "ordinary")


def _ordinary_add(lab: Lab) -> None:
    (lab.repo / "parse.py").write_text(EDITED, encoding="utf-8")
    env = {**os.environ, "GIT_INDEX_FILE": str(lab.tmp / "ordinary-index")}
    git(lab.repo, "add", "-A", env=env)
    git(lab.repo, "status", "--porcelain", env=env)
    (lab.repo / "parse.py").write_text(ORIGINAL, encoding="utf-8")


def _filter(kind: str) -> Callable[[Lab], None]:
    def plant(lab: Lab) -> None:
        with (lab.repo / ".git" / "info" / "attributes").open("a", encoding="utf-8") as fh:
            fh.write("*.py filter=evil\n")
        git(lab.repo, "config", f"filter.evil.{kind}", lab.command(f"{kind}_filter"))

    return plant


@dataclass(frozen=True)
class Plant:
    plant: Callable[[Lab], None]
    arm: Callable[[Lab], None]  # ordinary git that runs it: proves the case can fail


PLANTS: dict[str, Plant] = {
    "post_checkout_hook": Plant(
        lambda lab: lab.hook(lab.repo / ".git" / "hooks", "post-checkout", "post_checkout_hook"),
        _ordinary_worktree_add,
    ),
    "reference_transaction_hook": Plant(
        lambda lab: lab.hook(lab.repo / ".git" / "hooks", "reference-transaction", "reference_transaction_hook"),
        _ordinary_worktree_add,
    ),
    "post_index_change_hook": Plant(
        lambda lab: lab.hook(lab.repo / ".git" / "hooks", "post-index-change", "post_index_change_hook"),
        _ordinary_add,
    ),
    "hooks_path_post_checkout": Plant(
        lambda lab: (
            lab.hook(lab.tmp / "hooks", "post-checkout", "hooks_path_post_checkout"),
            git(lab.repo, "config", "core.hooksPath", str(lab.tmp / "hooks")),
        ),
        _ordinary_worktree_add,
    ),
    "smudge_filter": Plant(_filter("smudge"), _ordinary_worktree_add),
    "clean_filter": Plant(_filter("clean"), _ordinary_add),
    "process_filter": Plant(_filter("process"), _ordinary_worktree_add),
    "fsmonitor": Plant(lambda lab: git(lab.repo, "config", "core.fsmonitor", lab.command("fsmonitor")), _ordinary_add),
}


async def _whole_cycle(lab: Lab) -> None:
    """Everything a run does with its worktree, from a user tree with uncommitted changes."""
    (lab.repo / "notes.txt").write_text("the user's uncommitted edit\n", encoding="utf-8")
    (lab.repo / "draft.py").write_text("DRAFT = 1\n", encoding="utf-8")
    with anyio.fail_after(DEADLINE_S):
        inspected = await worktrees.inspect(lab.repo, (lab.tmp,))
        assert inspected is not None and inspected.dirty
        wt = await worktrees.create(inspected, run_id="run-p", label=None, base_dir=lab.tmp / "wts")
        assert (wt.path / "parse.py").read_text(encoding="utf-8") == ORIGINAL
        (wt.path / "parse.py").write_text(EDITED, encoding="utf-8")
        (wt.path / "test_parse.py").write_text("def test_empty():\n    pass\n", encoding="utf-8")
        assert "+    if not s:" in await worktrees.diff(wt, max_bytes=100_000)
        assert await worktrees.commit(wt, "writer") is not None
        result = await worktrees.apply(lab.repo, wt, roots=(lab.tmp,))
        assert result.applied and result.files == ("parse.py", "test_parse.py"), result.message
        await worktrees.remove(wt)
    assert (lab.repo / "parse.py").read_text(encoding="utf-8") == EDITED


@pytest.mark.anyio
@pytest.mark.parametrize("name", sorted(PLANTS))
async def test_no_planted_program_runs_during_create_diff_commit_apply_or_remove(lab: Lab, name: str) -> None:
    PLANTS[name].plant(lab)
    PLANTS[name].arm(lab)
    assert name in lab.fired(), f"the planted {name} is not armed: ordinary git did not run it"
    for marker in lab.markers.iterdir():
        marker.unlink()

    await _whole_cycle(lab)

    assert lab.fired() == [], "a planted program ran"


@pytest.mark.anyio
async def test_with_every_plant_at_once_and_a_planted_global_config_nothing_runs(
    lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    for plant in PLANTS.values():
        plant.plant(lab)
    home = lab.tmp / "home"
    home.mkdir(exist_ok=True)
    (home / ".gitconfig").write_text(f"[core]\n\tfsmonitor = {lab.command('global_config')}\n", encoding="utf-8")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("GIT_CONFIG_COUNT", "1")
    monkeypatch.setenv("GIT_CONFIG_KEY_0", "core.hooksPath")
    monkeypatch.setenv("GIT_CONFIG_VALUE_0", str(lab.tmp / "hooks"))

    await _whole_cycle(lab)

    assert lab.fired() == []


@pytest.mark.anyio
async def test_a_sha256_repository_gets_a_worktree_in_its_own_object_format(tmp_path: Path) -> None:
    top = tmp_path / "repo256"
    git(tmp_path, "init", "-q", "--object-format=sha256", "-b", "main", str(top))
    (top / "a.txt").write_text("old\n", encoding="utf-8")
    git(top, "add", ".")
    git(top, "commit", "-qm", "init")
    (top / "b.txt").write_text("untracked\n", encoding="utf-8")
    wt = await start(top, tmp_path, tmp_path / "wts")
    assert len(wt.base_commit) == 64 and wt.carried_changes
    (wt.path / "a.txt").write_text("new\n", encoding="utf-8")
    with anyio.fail_after(DEADLINE_S):
        assert await worktrees.commit(wt, "writer") is not None
        assert (await worktrees.apply(top, wt, roots=(tmp_path,))).applied
        await worktrees.remove(wt)
    assert (top / "a.txt").read_text(encoding="utf-8") == "new\n"
    git(top, "fsck", "--no-progress")
