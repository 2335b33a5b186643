"""A writer's own git worktree: made from what the user had checked out, read, committed, applied
back to the user's working tree, and removed, without ever running a program the repository names.

The shape of a run's worktree
    ``base_dir/<run_id>`` on the branch ``mcp-collab/<run_id>``; parallel writers of one run add a
    label: ``base_dir/<run_id>-<label>`` on ``mcp-collab/<run_id>-<label>`` (git cannot hold both
    ``a`` and ``a/b`` as refs, so a label never nests under the run's own branch). It is a real git
    worktree: ``git worktree list`` in the user's repository shows it, and the user's own git works in
    it (``git -C <path> status``, ``git log mcp-collab/<run_id>``, ``git worktree remove``).

Uncommitted changes of the user are carried over
    At dispatch (``inspect``) the user's working tree is snapshotted as a tree object (tracked and
    untracked files, minus ignored ones), through a throwaway index. When it differs from ``HEAD``,
    ``create`` records it as a commit whose parent is ``HEAD`` ("mcp-collab: uncommitted changes at
    dispatch of <run_id>") and starts the branch there. Why: the writer sees exactly what the user saw
    when they asked; the user's working tree, index, stash and branches are never touched (the commit
    is on the run's branch only); and the diff and the apply later are taken against that base, so
    they hold only the writer's work, never the user's own edits coming back at them. The commit is
    dated at the snapshot, so every writer of one run starts from the very same commit. ``Worktree``
    records both ``head_commit`` (HEAD at dispatch) and ``base_commit`` (where the branch started).

An unborn branch (a repository with no commit yet)
    The run still gets a worktree: its base is a commit with no parent holding the snapshot (the
    user's files so far, possibly none). Applying the run later brings only the writer's files into
    the user's working tree, as in any other repository.

Why git is never run the ordinary way here
    ``git worktree add`` runs the ``post-checkout`` hook and, while checking files out, the smudge and
    process filters the repository's config names; every git command in a repository reads its config
    (``core.fsmonitor``, ``include.path``, hooks ...). This module therefore runs git only through
    ``workspace.Scratch``: a scratch ``GIT_DIR`` with a config of our own, borrowing the repository's
    object store and a working tree, with an allow-listed environment, deadlines and bounded output.
    What git would write into the repository itself is written here, in Python, in git's own formats
    and under git's own locking protocol (``<file>.lock`` created exclusively, then renamed):

    - the worktree's administrative entry ``<common>/worktrees/<name>/`` (``gitdir``, ``commondir``,
      ``HEAD``, and ``locked`` while it is being filled, so that a ``git worktree prune`` run meanwhile
      leaves it alone), and the ``.git`` file in the worktree naming it;
    - the branch ref (a loose ref file; deleting it also drops it from ``packed-refs``);
    - the worktree's files come from ``git read-tree -u`` into the worktree's own index, through the
      scratch repository, where no filter, hook or fsmonitor is defined. A ``filter=lfs`` file is
      therefore checked out as its pointer, as stored in the commit.

    Ref storage other than files (a reftable) is refused by ``inspect``, naming it.

Concurrency
    Operations that change what the repository records (create, commit, apply, remove) take a
    per-repository lock: an ``anyio.Lock`` within the process and an ``flock`` on
    ``<common>/mcp-collab.flock`` across processes. Only the bookkeeping is done under it; checking out
    a worktree's files and snapshotting happen outside it, so five writers starting at once fill their
    worktrees in parallel.

Getting the work back
    ``apply`` takes the branch's changes (``base_commit..tip``) as a binary patch and applies it to
    the user's working tree with ``git apply``: all or nothing, nothing staged or committed. Anything
    in the way (a file changed locally where the patch changes it, an untracked file where the run
    adds one, a file deleted locally) makes git refuse the whole patch; the refusal names the files and
    the user's working tree, index and branches are exactly as they were. Changes the user made to
    other parts of a file the run also changed are kept, as ``git apply`` keeps them. ``apply`` takes
    the branch tip: ``commit`` the worktree first to include what the writer left uncommitted.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import stat
import sys
import tempfile
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import anyio
import anyio.to_thread

from .errors import InvalidRequestError, WorktreeError, listing, shown
from .workspace import RepoLayout, Scratch, copy_regular_file, locate, read_ref, read_small, write_tree

log = logging.getLogger("mcp_collab.worktrees")

BRANCH_PREFIX = "mcp-collab/"
# A checkout, snapshot or diff of a very large tree (100,000+ files on a slow disk) takes minutes;
# past this the step fails, named, instead of holding the run.
WORKTREE_GIT_TIMEOUT_S = 600.0
# Stdout kept from git for an id or a short answer.
ID_BYTES = 4096
# Stdout kept from git for the list of files a run changed; a list longer than this is refused.
NAMES_BYTES = 64 << 20
# Lines of git's own message quoted in a refusal: enough to name the first conflicts.
ERR_LINES = 12
# Names tried for the worktree's entry under <common>/worktrees when the plain one is taken (git
# itself adds a counter the same way).
MAX_ENTRY_SUFFIX = 100
# Not "*.lock": that is git's name for a lock held while a file is rewritten, which tools clear.
LOCK_FILE = "mcp-collab.flock"
METADATA_FILE = "mcp-collab.json"
DEFAULT_NAME = "mcp-collab"
DEFAULT_EMAIL = "mcp-collab@localhost"
# The id of the tree with no entry, per object format: the snapshot of an empty working tree.
EMPTY_TREE = {
    "sha1": "4b825dc642cb6eb9a060e54bf8d69288fbee4904",
    "sha256": "6ef19b41225c5369f1c104d45d8d85efa9b057b53b14b4b9b939dd74decc5321",
}

_HEX_ID = re.compile(r"[0-9a-f]{40}([0-9a-f]{24})?")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_BRANCH_REF = re.compile(r"refs/heads/[A-Za-z0-9._/+@-]+")
_NAME_RULE = (
    "accepted are 1 to 100 letters, digits, '.', '_' and '-', starting with a letter or digit, "
    "without '..' and not ending in '.' or '.lock'"
)


@dataclass(frozen=True)
class Repo:
    """A git working tree as it was at dispatch."""

    top: Path  # the working tree's top-level directory
    git_dir: Path  # its git directory (HEAD and the index live here)
    common_dir: Path  # the shared git directory (objects, branches, worktrees)
    head_commit: str | None  # None on an unborn branch
    branch: str | None  # the checked-out branch, None on a detached HEAD
    dirty: bool  # the working tree differs from HEAD (tracked or untracked files, ignored ones aside)
    tree: str  # the snapshot of the working tree the run starts from
    taken_at: int  # when the snapshot was taken (seconds since the epoch); dates the carried-over commit
    object_format: str  # "sha1" or "sha256"

    @property
    def layout(self) -> RepoLayout:
        return RepoLayout(top=self.top, git_dir=self.git_dir, common_dir=self.common_dir)


@dataclass(frozen=True)
class Worktree:
    """A run's worktree; every field is plain data, so a stored run can rebuild it."""

    run_id: str
    label: str | None
    repo_top: Path  # the user's working tree
    common_dir: Path  # the user's shared git directory
    path: Path  # the worktree's directory
    entry: str  # its entry under <common_dir>/worktrees
    branch: str  # without refs/heads/
    head_commit: str | None  # HEAD at dispatch
    base_commit: str  # what the branch started from (HEAD, or the commit of the carried changes)
    carried_changes: bool  # the base holds uncommitted changes of the user

    @property
    def admin(self) -> Path:
        return self.common_dir / "worktrees" / self.entry

    @property
    def ref(self) -> str:
        return "refs/heads/" + self.branch


class BranchInfo(Protocol):
    """What ``apply`` needs of a run: a ``Worktree``, or the same two fields from a stored run."""

    @property
    def branch(self) -> str: ...

    @property
    def base_commit(self) -> str: ...


@dataclass(frozen=True)
class ApplyResult:
    applied: bool
    files: tuple[str, ...]  # the files changed (applied) or those in the way (refused)
    message: str


# ---------------------------------------------------------------------------------------------
# Public operations


async def inspect(directory: Path, roots: Sequence[Path]) -> Repo | None:
    """The git working tree holding ``directory`` as it is now, or None when there is none (or its
    git directory lies outside ``roots``): the run then works in place, as without git."""
    layout = locate(directory, roots)
    if layout is None:
        return None
    head, branch = _head(layout)
    async with _scratch(layout) as scratch:
        refs = (await scratch.repository_config("extensions.refstorage", "files") or "files").strip().lower()
        if refs != "files":
            raise WorktreeError(
                f"{layout.top} keeps its refs as {refs!r}; run worktrees are made only in repositories "
                "with files refs (the default): nothing was changed"
            )
        taken_at = int(time.time())
        tree = await write_tree(scratch, head, seed_index=layout.git_dir / "index")
        if tree is None:
            raise WorktreeError(f"cannot snapshot the working tree {layout.top}: {scratch.problem}")
        head_tree = EMPTY_TREE[scratch.object_format] if head is None else await _tree_of(scratch, head)
    return Repo(
        top=layout.top,
        git_dir=layout.git_dir,
        common_dir=layout.common_dir,
        head_commit=head,
        branch=branch,
        dirty=tree != head_tree,
        tree=tree,
        taken_at=taken_at,
        object_format=scratch.object_format,
    )


async def create(repo: Repo, *, run_id: str, label: str | None, base_dir: Path) -> Worktree:
    """A worktree for run ``run_id`` (one writer of it when ``label`` is given) under ``base_dir``,
    on a new branch started from what ``repo`` had checked out at dispatch, uncommitted changes
    included (see the module's notes). The user's working tree, index and branches are not touched."""
    _check_name("the run id", run_id)
    if label is not None:
        _check_name("the writer label", label)
    entry = run_id if label is None else f"{run_id}-{label}"
    branch = BRANCH_PREFIX + entry
    path = await anyio.to_thread.run_sync(_make_worktree_dir, base_dir, entry, repo)
    admin: Path | None = None
    base: str | None = None
    try:
        async with _scratch(repo.layout, work_tree=path) as scratch:
            base = await _base_commit(scratch, repo, run_id)
            metadata = {
                "runId": run_id,
                "label": label,
                "repoTop": str(repo.top),
                "branch": branch,
                "headCommit": repo.head_commit,
                "baseCommit": base,
                "carriedChanges": base != repo.head_commit,
            }
            async with _serialized(repo.common_dir):
                admin = _register(repo.common_dir, path, entry, branch, base, metadata)
            filled = await scratch.run("read-tree", "-u", "--reset", base, index=str(admin / "index"))
            if not filled.ok:
                raise WorktreeError(f"cannot fill the worktree {path} from {base[:12]}: {filled.problem}")
        _unlink(admin / "locked")
    except BaseException:
        with anyio.CancelScope(shield=True):
            await _undo_create(repo.common_dir, path, admin, branch, base)
        raise
    return Worktree(
        run_id=run_id,
        label=label,
        repo_top=repo.top,
        common_dir=repo.common_dir,
        path=path,
        entry=admin.name,
        branch=branch,
        head_commit=repo.head_commit,
        base_commit=base,
        carried_changes=base != repo.head_commit,
    )


async def diff(wt: Worktree, *, max_bytes: int) -> str:
    """Everything the writer changed against the run's base: commits on the branch, uncommitted and
    untracked files in the worktree (ignored ones aside), as a unified diff with binary patches,
    cut to ``max_bytes``. Empty when nothing changed."""
    async with _worktree_scratch(wt) as scratch:
        tree = await _worktree_tree(wt, scratch)
        result = await scratch.run(
            "diff", "--binary", "--no-color", "--no-ext-diff", "--no-textconv", wt.base_commit, tree,
            max_bytes=max_bytes,
        )  # fmt: skip
    if result.truncated:
        return result.out[:max_bytes].decode("utf-8", "replace") + "\n[... diff truncated ...]\n"
    if not result.ok:
        raise WorktreeError(f"cannot diff the worktree {wt.path} against {wt.base_commit[:12]}: {result.problem}")
    return result.text


async def commit(wt: Worktree, message: str) -> str | None:
    """Record the worktree as it is (tracked and untracked files, ignored ones aside) as a commit on
    its branch, parent the branch tip, without hooks, by ``mcp-collab <mcp-collab@localhost>`` unless
    the environment names the author (``GIT_AUTHOR_NAME`` ...). None when nothing changed."""
    async with _worktree_scratch(wt) as scratch:
        tip = _branch_tip(wt.common_dir, wt.ref)
        if tip is None:
            raise WorktreeError(f"the branch {wt.branch} of run {wt.run_id} no longer exists in {wt.repo_top}")
        tree = await _worktree_tree(wt, scratch)
        if tree == await _tree_of(scratch, tip):
            return None
        made = await scratch.run("commit-tree", tree, "-p", tip, "-m", message or "mcp-collab", env=_identity())
        new = made.text.strip()
        if not made.ok or not _HEX_ID.fullmatch(new):
            raise WorktreeError(f"cannot commit the worktree {wt.path}: {made.problem or 'git gave no commit id'}")
        async with _serialized(wt.common_dir):
            _swap_ref(wt.common_dir, wt.ref, new, expected=tip)
        # The worktree's own index now matches its files and the new commit, so that `git status`
        # there shows a clean tree rather than the writer's work as changes.
        await anyio.to_thread.run_sync(_adopt_index, wt, Path(scratch.index))
    return new


async def apply(repo_top: Path, source: BranchInfo, *, roots: Sequence[Path]) -> ApplyResult:
    """Bring a run's changes (``base_commit`` .. the branch tip) into the user's working tree at
    ``repo_top``: all of them or none, nothing staged or committed. A refusal names the files in the
    way and leaves the working tree, index and branches exactly as they were."""
    branch, base = source.branch, source.base_commit
    if not branch.startswith(BRANCH_PREFIX) or not _BRANCH_REF.fullmatch("refs/heads/" + branch) or ".." in branch:
        raise InvalidRequestError(
            f"{shown(branch)} is not a run's branch: accepted are branches {BRANCH_PREFIX}<run id>[-<label>]"
        )
    if not _HEX_ID.fullmatch(base):
        raise InvalidRequestError(f"{shown(base)} is not a commit id: accepted are 40 or 64 hexadecimal digits")
    layout = locate(repo_top, roots)
    if layout is None:
        raise WorktreeError(f"{repo_top} is not a git working tree inside the workspace roots: nothing was applied")
    ref = "refs/heads/" + branch
    async with _scratch(layout) as scratch:
        tip = _branch_tip(layout.common_dir, ref)
        if tip is None:
            raise WorktreeError(
                f"the branch {branch} no longer exists in {layout.top} (the run was discarded, or the branch "
                "deleted): nothing was applied"
            )
        listed = await scratch.run("diff", "--name-only", "-z", "--no-renames", base, tip, max_bytes=NAMES_BYTES)
        if not listed.ok:
            raise WorktreeError(
                f"cannot list the changes of {branch} in {layout.top}: "
                f"{listed.problem or 'the list is too long'}; nothing was applied"
            )
        files = tuple(name for name in listed.text.split("\0") if name)
        if not files:
            return ApplyResult(True, (), f"nothing to apply: {branch} has no change against its base {base[:12]}")
        patch = scratch.base / "run.patch"
        fd = os.open(patch, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            made = await scratch.run(
                "diff", "--binary", "--full-index", "--no-renames", "--no-color", "--no-ext-diff", "--no-textconv",
                base, tip, stdout=fd,
            )  # fmt: skip
        finally:
            os.close(fd)
        if not made.ok:
            raise WorktreeError(
                f"cannot take the changes of {branch} in {layout.top}: {made.problem}; nothing was applied"
            )
        async with _serialized(layout.common_dir):
            result = await scratch.run("apply", "--whitespace=nowarn", str(patch))
    if result.ok:
        return ApplyResult(
            True,
            files,
            f"applied {branch} to {layout.top}: {len(files)} file(s) changed in the working tree, nothing "
            f"staged or committed: {listing(files)}",
        )
    if result.code is None:
        raise WorktreeError(
            f"applying {branch} to {layout.top} did not finish ({result.problem}); check the files "
            f"{listing(files)} with `git status`"
        )
    in_the_way = _named_in(result.err, files) or files
    said = "\n".join(result.err.splitlines()[:ERR_LINES])
    return ApplyResult(
        False,
        in_the_way,
        f"nothing was applied: the changes of {branch} do not apply to {layout.top}, where "
        f"{listing(in_the_way)} differ from the run's base {base[:12]} (changed or deleted locally, an "
        "untracked file in the way, or commits made since the run started). Your working tree, index and "
        f"branches are as they were. Commit or stash those changes and apply again, or merge {branch} "
        f"with git.\ngit said:\n{said}",
    )


async def remove(wt: Worktree, *, delete_branch: bool = True) -> None:
    """Discard a run's worktree: its directory, its entry in ``git worktree list`` and (unless told
    otherwise) its branch. Idempotent; a directory already deleted by hand is fine. A branch that is
    checked out somewhere else is refused, naming where, before anything is removed."""
    async with _serialized(wt.common_dir):
        await anyio.to_thread.run_sync(_deregister, wt, delete_branch)
    # Outside the lock: the directory is no longer registered, nothing else refers to it.
    await anyio.to_thread.run_sync(_remove_directory, wt.path)


async def prune(base_dir: Path, keep: Callable[[str], bool]) -> list[str]:
    """Remove the worktrees under ``base_dir`` (and their branches) of runs for which ``keep(run_id)``
    is false; the paths removed. A worktree that cannot be removed is logged and left for the next
    pass; directories that are not run worktrees are left alone."""
    removed: list[str] = []
    for wt in await anyio.to_thread.run_sync(_worktrees_in, base_dir):
        if keep(wt.run_id):
            continue
        try:
            await remove(wt)
        except WorktreeError as exc:
            log.warning("retention kept the worktree of run %s: %s", wt.run_id, exc)
            continue
        removed.append(str(wt.path))
    return removed


def working_directory(wt: Worktree, directory: Path) -> Path:
    """Where in the worktree the writer works when the user asked in ``directory`` (a directory of
    the user's working tree, such as a package inside it). A directory holding no file (git keeps
    none such) is not in the worktree yet: the caller creates it."""
    try:
        inside = directory.resolve().relative_to(wt.repo_top)
    except ValueError as exc:
        raise InvalidRequestError(
            f"{directory} is not inside the working tree {wt.repo_top} of run {wt.run_id}: accepted are "
            "directories of that working tree"
        ) from exc
    return wt.path / inside


def worktree_at(path: Path) -> Worktree | None:
    """The run worktree at ``path``, read back from what ``create`` recorded, or None when ``path``
    is not one (or its repository is gone)."""
    text = read_small(path / ".git")
    if text is None or not text.startswith("gitdir:"):
        return None
    admin = Path(text[len("gitdir:") :].strip())
    raw = read_small(admin / METADATA_FILE, 1 << 16)
    if raw is None or (read_small(admin / "gitdir") or "").strip() != str(path / ".git"):
        return None
    try:
        meta: dict[str, Any] = json.loads(raw)
        return Worktree(
            run_id=str(meta["runId"]),
            label=meta["label"],
            repo_top=Path(meta["repoTop"]),
            common_dir=admin.parent.parent,
            path=path,
            entry=admin.name,
            branch=str(meta["branch"]),
            head_commit=meta["headCommit"],
            base_commit=str(meta["baseCommit"]),
            carried_changes=bool(meta["carriedChanges"]),
        )
    except (ValueError, KeyError, TypeError):
        log.warning("%s: unreadable record of a run worktree", admin / METADATA_FILE)
        return None


# ---------------------------------------------------------------------------------------------
# Git through the scratch repository


@contextlib.asynccontextmanager
async def _scratch(layout: RepoLayout, *, work_tree: Path | None = None) -> AsyncIterator[Scratch]:
    with tempfile.TemporaryDirectory(prefix="mcp-collab-wt-") as tmp:
        scratch = Scratch(layout, Path(tmp), work_tree=work_tree, purpose="worktree", deadline_s=WORKTREE_GIT_TIMEOUT_S)
        if not await scratch.prepare():
            raise WorktreeError(f"cannot use git on {layout.top}: {scratch.problem}")
        yield scratch


@contextlib.asynccontextmanager
async def _worktree_scratch(wt: Worktree) -> AsyncIterator[Scratch]:
    if not await anyio.to_thread.run_sync(_is_directory, wt.path):
        raise WorktreeError(f"the worktree {wt.path} of run {wt.run_id} is gone (discarded, or deleted by hand)")
    async with _scratch(RepoLayout(top=wt.path, git_dir=wt.admin, common_dir=wt.common_dir)) as scratch:
        yield scratch


async def _tree_of(scratch: Scratch, commit: str) -> str:
    result = await scratch.run("rev-parse", "--verify", "--quiet", f"{commit}^{{tree}}", max_bytes=ID_BYTES)
    tree = result.text.strip()
    if not result.ok or not _HEX_ID.fullmatch(tree):
        problem = result.problem or "it is missing"
        raise WorktreeError(f"cannot read the commit {commit[:12]} in {scratch.repo.top}: {problem}")
    return tree


async def _worktree_tree(wt: Worktree, scratch: Scratch) -> str:
    head = _branch_tip(wt.common_dir, wt.ref) or wt.base_commit
    tree = await write_tree(scratch, head, seed_index=wt.admin / "index")
    if tree is None:
        raise WorktreeError(f"cannot snapshot the worktree {wt.path}: {scratch.problem}")
    return tree


async def _base_commit(scratch: Scratch, repo: Repo, run_id: str) -> str:
    if repo.head_commit is not None and not repo.dirty:
        return repo.head_commit
    if repo.head_commit is None:
        message = f"mcp-collab: the files at dispatch of {run_id} (the repository had no commit yet)"
        parents: list[str] = []
    else:
        message = f"mcp-collab: uncommitted changes at dispatch of {run_id}"
        parents = ["-p", repo.head_commit]
    # Dated at the snapshot, with a fixed identity: every writer of the run gets the same commit.
    dated = {"GIT_AUTHOR_DATE": f"@{repo.taken_at} +0000", "GIT_COMMITTER_DATE": f"@{repo.taken_at} +0000"}
    made = await scratch.run("commit-tree", repo.tree, *parents, "-m", message, env={**_identity(), **dated})
    commit = made.text.strip()
    if not made.ok or not _HEX_ID.fullmatch(commit):
        raise WorktreeError(
            f"cannot record the uncommitted changes of {repo.top} for run {run_id}: {made.problem or 'no commit id'}"
        )
    return commit


def _identity() -> dict[str, str]:
    env: dict[str, str] = {}
    for role in ("AUTHOR", "COMMITTER"):
        for part, default in (("NAME", DEFAULT_NAME), ("EMAIL", DEFAULT_EMAIL)):
            key = f"GIT_{role}_{part}"
            env[key] = os.environ.get(key) or default
    return env


def _named_in(stderr: str, files: Sequence[str]) -> tuple[str, ...]:
    """The files git's refusal names, in the order of the patch."""
    lines = [line[len("error:") :] for line in stderr.splitlines() if line.startswith("error:")]
    return tuple(
        name for name in files if any(re.search(rf"(?:^|[\s']){re.escape(name)}(?:$|[\s':,])", line) for line in lines)
    )


# ---------------------------------------------------------------------------------------------
# What git would write into the repository, written here (see the module's notes)


_locks: weakref.WeakValueDictionary[str, anyio.Lock] = weakref.WeakValueDictionary()


@contextlib.asynccontextmanager
async def _serialized(common_dir: Path) -> AsyncIterator[None]:
    """One repository's bookkeeping at a time: within this process, then across processes."""
    key = str(common_dir)
    lock = _locks.get(key)
    if lock is None:
        lock = _locks[key] = anyio.Lock()
    async with lock:
        fd = await anyio.to_thread.run_sync(_flock, common_dir / LOCK_FILE)
        try:
            yield
        finally:
            os.close(fd)  # releases the flock


def _flock(path: Path) -> int:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        raise WorktreeError(f"cannot open the lock file {path}: {exc.strerror}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError as exc:
        os.close(fd)
        raise WorktreeError(f"cannot lock {path}: {exc.strerror}") from exc
    return fd


def _check_name(what: str, value: str) -> None:
    if not (_NAME.fullmatch(value) and ".." not in value and not value.endswith((".", ".lock"))):
        raise InvalidRequestError(f"{what} {shown(value)} cannot name a branch and a directory: {_NAME_RULE}")


def _head(layout: RepoLayout) -> tuple[str | None, str | None]:
    """(HEAD's commit or None when unborn, the branch or None when detached)."""
    text = (read_small(layout.git_dir / "HEAD") or "").strip()
    if _HEX_ID.fullmatch(text):
        return text, None
    ref = text[len("ref:") :].strip() if text.startswith("ref:") else ""
    if not _BRANCH_REF.fullmatch(ref) or ".." in ref:
        raise WorktreeError(
            f"the HEAD of {layout.top} ({layout.git_dir / 'HEAD'}) names neither a branch nor a commit: "
            f"{shown(text)}; nothing was changed"
        )
    commit = read_ref(layout, ref)
    if commit is None and read_small(layout.common_dir / ref) is not None:
        raise WorktreeError(f"the branch ref {layout.common_dir / ref} holds no commit id; nothing was changed")
    return commit, ref[len("refs/heads/") :]


def _packed_refs(common_dir: Path) -> bytes:
    """The whole of packed-refs (empty when there is none). Read whole: it is rewritten from this."""
    path = common_dir / "packed-refs"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return b""
    except OSError as exc:
        raise WorktreeError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise WorktreeError(f"{path} is not a regular file")
        with os.fdopen(os.dup(fd), "rb") as fh:
            return fh.read()
    finally:
        os.close(fd)


def _packed_names(data: bytes) -> dict[str, str]:
    refs: dict[str, str] = {}
    for line in data.splitlines():
        if not line or line.startswith((b"#", b"^")):
            continue
        oid, _, name = line.partition(b" ")
        refs[name.decode("utf-8", "replace")] = oid.decode("ascii", "replace")
    return refs


def _branch_tip(common_dir: Path, ref: str) -> str | None:
    text = read_small(common_dir / ref)
    if text is not None:
        oid = text.strip()
        if not _HEX_ID.fullmatch(oid):
            raise WorktreeError(f"the ref file {common_dir / ref} holds no commit id")
        return oid
    packed = _packed_names(_packed_refs(common_dir)).get(ref)
    return packed if packed is not None and _HEX_ID.fullmatch(packed) else None


def _ref_in_the_way(common_dir: Path, ref: str) -> str | None:
    """A ref that exists where ``ref`` would go, or above or below it (git cannot hold both
    ``a`` and ``a/b``)."""
    packed = _packed_names(_packed_refs(common_dir))
    parts = ref.split("/")
    for i in range(3, len(parts)):
        above = "/".join(parts[:i])
        if above in packed or (common_dir / above).is_file():
            return above
    if ref in packed or (common_dir / ref).is_file():
        return ref
    below = next((name for name in packed if name.startswith(ref + "/")), None)
    if below is None and (common_dir / ref).is_dir():
        below = ref + "/..."
    return below


def _swap_ref(common_dir: Path, ref: str, new: str | None, *, expected: str | None) -> None:
    """Set ``ref`` to ``new`` (delete it when None) if it is still ``expected`` (absent when None),
    under git's lock for that ref."""
    path = common_dir / ref
    if expected is None and (other := _ref_in_the_way(common_dir, ref)) is not None:
        raise WorktreeError(
            f"the branch {ref[len('refs/heads/') :]} cannot be made in {common_dir}: the ref {other} is in the "
            "way (git cannot hold both 'a' and 'a/b'); rename or delete it"
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WorktreeError(f"cannot write the ref {ref} in {common_dir}: {exc.strerror}") from exc
    with _lock_file(path) as (fd, lock):
        current = _branch_tip(common_dir, ref)
        if current != expected:
            raise WorktreeError(
                f"the branch {ref[len('refs/heads/') :]} in {common_dir} moved while mcp-collab worked "
                f"(now {current or 'deleted'}, expected {expected or 'absent'}); nothing was changed"
            )
        if new is None:
            _drop_packed(common_dir, ref)
            _unlink(path)
            _unlink(common_dir / "logs" / ref)
            _remove_empty_parents(path.parent, common_dir / "refs" / "heads")
            _remove_empty_parents((common_dir / "logs" / ref).parent, common_dir / "logs" / "refs" / "heads")
        else:
            os.write(fd, f"{new}\n".encode("ascii"))
            os.fsync(fd)
            os.rename(lock, path)


@contextlib.contextmanager
def _lock_file(path: Path) -> Iterator[tuple[int, Path]]:
    """git's lock for ``path``: ``path.lock``, created exclusively; removed unless renamed over."""
    lock = path.with_name(path.name + ".lock")
    try:
        fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    except FileExistsError as exc:
        raise WorktreeError(
            f"{lock} exists: another git process is changing {path.name}; if none is running, delete that file "
            "and try again"
        ) from exc
    except OSError as exc:
        raise WorktreeError(f"cannot lock {path}: {exc.strerror}") from exc
    try:
        yield fd, lock
    finally:
        os.close(fd)
        _unlink(lock)


def _drop_packed(common_dir: Path, ref: str) -> None:
    """Rewrite packed-refs without ``ref`` (and its peeled line), every other byte as it was."""
    target = common_dir / "packed-refs"
    with _lock_file(target) as (fd, lock):
        data = _packed_refs(common_dir)
        if ref not in _packed_names(data):
            return
        kept: list[bytes] = []
        dropping = False
        for line in data.splitlines(keepends=True):
            if dropping and line.startswith(b"^"):
                continue
            dropping = not line.startswith((b"#", b"^")) and line.rstrip(b"\n").partition(b" ")[2] == ref.encode()
            if not dropping:
                kept.append(line)
        os.write(fd, b"".join(kept))
        os.fsync(fd)
        os.rename(lock, target)


def _make_worktree_dir(base_dir: Path, entry: str, repo: Repo) -> Path:
    try:
        base_dir.mkdir(parents=True, exist_ok=True)
        base = base_dir.resolve(strict=True)
    except OSError as exc:
        raise WorktreeError(f"cannot use {base_dir} for run worktrees: {exc.strerror}") from exc
    if base == repo.top or repo.top in base.parents:
        raise InvalidRequestError(
            f"the worktree directory {base} is inside the working tree {repo.top}, which a run must leave "
            "untouched: accepted is a directory outside it (such as the server's state directory)"
        )
    path = base / entry
    try:
        path.mkdir()
    except FileExistsError as exc:
        raise WorktreeError(f"{path} already exists: a worktree of {entry} is there (or something else is)") from exc
    except OSError as exc:
        raise WorktreeError(f"cannot create the worktree directory {path}: {exc.strerror}") from exc
    return path


def _register(common_dir: Path, path: Path, entry: str, branch: str, base: str, metadata: dict[str, Any]) -> Path:
    """The worktree's entry under <common>/worktrees, its .git file and its branch (under the lock)."""
    root = common_dir / "worktrees"
    try:
        root.mkdir(exist_ok=True)
    except OSError as exc:
        raise WorktreeError(f"cannot register a worktree in {common_dir}: {exc.strerror}") from exc
    for k in range(MAX_ENTRY_SUFFIX):
        admin = root / (entry if k == 0 else f"{entry}-{k}")
        try:
            admin.mkdir()
            break
        except FileExistsError:
            continue
        except OSError as exc:
            raise WorktreeError(f"cannot register a worktree in {root}: {exc.strerror}") from exc
    else:
        raise WorktreeError(f"{root} already holds {MAX_ENTRY_SUFFIX} worktrees named {entry}...; prune them")
    try:
        # `locked` first: a `git worktree prune` meanwhile leaves an entry being made alone.
        for name, text in (
            ("locked", "being created by mcp-collab\n"),
            ("commondir", "../..\n"),
            ("gitdir", f"{path / '.git'}\n"),
            ("HEAD", f"ref: refs/heads/{branch}\n"),
            (METADATA_FILE, json.dumps(metadata, indent=1) + "\n"),
        ):
            (admin / name).write_text(text, encoding="utf-8")
        (path / ".git").write_text(f"gitdir: {admin}\n", encoding="utf-8")
        _swap_ref(common_dir, "refs/heads/" + branch, base, expected=None)
    except OSError as exc:
        shutil.rmtree(admin, ignore_errors=True)
        raise WorktreeError(f"cannot register the worktree {path} in {common_dir}: {exc.strerror}") from exc
    except BaseException:
        shutil.rmtree(admin, ignore_errors=True)
        raise
    return admin


async def _undo_create(common_dir: Path, path: Path, admin: Path | None, branch: str, base: str | None) -> None:
    """Take back a create that failed or was cancelled half-way, leaving the repository as it was."""
    try:
        if admin is not None and base is not None:
            async with _serialized(common_dir):
                with contextlib.suppress(WorktreeError):
                    _swap_ref(common_dir, "refs/heads/" + branch, None, expected=base)
                await anyio.to_thread.run_sync(_remove_directory, admin)
        await anyio.to_thread.run_sync(_remove_directory, path)
    except (OSError, WorktreeError) as exc:
        log.warning("could not take back the half-made worktree %s: %s", path, exc)


def _deregister(wt: Worktree, delete_branch: bool) -> None:
    """Under the lock: check, then drop the worktree's entry and branch. Nothing is removed when a
    check fails."""
    gitdir_named = (read_small(wt.admin / "gitdir") or "").strip()
    # The entry is this run's while it names this directory, or names none but holds this run's record.
    ours = gitdir_named == str(wt.path / ".git") or (not gitdir_named and _recorded_run(wt.admin) == wt.run_id)
    if os.path.lexists(wt.path):
        points_here = (read_small(wt.path / ".git") or "").strip() == f"gitdir: {wt.admin}"
        if wt.path.is_symlink() or not wt.path.is_dir() or not (points_here or ours):
            raise WorktreeError(
                f"{wt.path} is not the worktree of run {wt.run_id} (it names no such worktree): left in place"
            )
    # An entry that is no longer ours (the user moved the worktree with `git worktree move`) is a
    # checkout like any other: its branch stays.
    skip = wt.admin if ours else None
    if delete_branch and (where := _checked_out_at(wt.common_dir, wt.ref, skip=skip)) is not None:
        raise WorktreeError(
            f"the branch {wt.branch} of run {wt.run_id} is checked out in {where}: nothing was removed; switch "
            "that checkout to another branch and discard again"
        )
    if ours:
        _remove_directory(wt.admin)
        with contextlib.suppress(OSError):
            (wt.common_dir / "worktrees").rmdir()  # as git does once the last worktree is gone
    if delete_branch and (tip := _branch_tip(wt.common_dir, wt.ref)) is not None:
        _swap_ref(wt.common_dir, wt.ref, None, expected=tip)


def _recorded_run(admin: Path) -> str | None:
    raw = read_small(admin / METADATA_FILE, 1 << 16)
    try:
        return str(json.loads(raw)["runId"]) if raw is not None else None
    except (ValueError, KeyError, TypeError):
        return None


def _checked_out_at(common_dir: Path, ref: str, *, skip: Path | None) -> str | None:
    heads = [(common_dir / "HEAD", "the repository's main working tree")]
    with contextlib.suppress(OSError):
        for admin in sorted((common_dir / "worktrees").iterdir()):
            if admin != skip:
                where = (read_small(admin / "gitdir") or str(admin)).strip().removesuffix("/.git")
                heads.append((admin / "HEAD", where))
    for head, where in heads:
        if (read_small(head) or "").strip() == f"ref: {ref}":
            return where
    return None


def _adopt_index(wt: Worktree, index: Path) -> None:
    if (read_small(wt.admin / "HEAD") or "").strip() != f"ref: {wt.ref}":
        return  # the writer switched its worktree to another branch: its index is its own business
    target = wt.admin / "index"
    try:
        with _lock_file(target) as (_, lock):
            if copy_regular_file(index, lock):
                os.rename(lock, target)
    except WorktreeError as exc:
        log.info("left the index of %s as it was: %s", wt.path, exc)


def _worktrees_in(base_dir: Path) -> list[Worktree]:
    try:
        entries = sorted(base_dir.resolve().iterdir())
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise WorktreeError(f"cannot list the run worktrees in {base_dir}: {exc.strerror}") from exc
    found = []
    for entry in entries:
        if entry.is_symlink() or not entry.is_dir():
            continue
        if (wt := worktree_at(entry)) is None:
            log.info("retention: %s is not a run worktree of a repository still there; left alone", entry)
            continue
        found.append(wt)
    return found


def _is_directory(path: Path) -> bool:
    return path.is_dir()


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _remove_empty_parents(directory: Path, stop: Path) -> None:
    while directory != stop and stop in directory.parents:
        try:
            directory.rmdir()
        except OSError:
            return
        directory = directory.parent


def _remove_directory(path: Path) -> None:
    """Remove a directory tree (never following a symlink), also where a writer left directories
    without write permission."""
    if path.is_symlink() or not path.exists():
        _unlink(path)
        return

    def retry(function: Callable[..., Any], name: str, exc: object) -> None:
        # A directory the writer made read-only: make it writable, then try the same step again.
        parent = os.path.dirname(name)
        try:
            os.chmod(parent, 0o700)
            function(name)
        except FileNotFoundError:
            pass
        except OSError as again:
            raise WorktreeError(f"cannot remove {name}: {again.strerror}") from again

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=retry)
    else:
        shutil.rmtree(path, onerror=retry)
