"""Where a run's writers work: their own git worktree when the working directory is inside a git
repository, else the directory itself (in place, as before worktrees, and the run says so).

A run inspects the repository once, so every writer of the run (best_of_n's several) starts from
the very same base: the commit checked out at dispatch, plus the user's uncommitted changes carried
over as a commit on the run's branch (see ``worktrees``). The user's working tree, index and
branches are never touched while a run works; ``apply`` brings the work back.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import anyio
import anyio.to_thread

from .. import workspace, worktrees
from ..errors import InvalidRequestError, WorktreeError
from ..models import Run, RunWorktree, Step
from ..security import pin
from ..strategies import MAX_QUOTED_DIFF_CHARS
from .locks import held

log = logging.getLogger("mcp_collab.engine")

# The diff stored with a run (and shown by get_worker_run / runs show) is capped here; apply uses
# the branch itself, never this text.
STORED_DIFF_BYTES = 4 << 20
# Committing and diffing a worktree when a run ends; a cancelled run gets this long to keep its work.
FINALIZE_TIMEOUT_S = 120.0


class InPlaceSpace:
    """The run's own working directory (no worktree): the diff is what changed in its git working
    tree between the space's creation and now, whatever state the tree was in before."""

    def __init__(self, directory: Path | None, roots: Sequence[Path], *, outside_repository: bool = False) -> None:
        self._directory = directory
        self._roots = roots
        self._before: str | None = None
        # Inspected when the space was made and found outside any git repository: nothing here
        # has a diff (a step's own snapshot would look for the same repository and find none).
        self.outside_repository = outside_repository

    @property
    def directory(self) -> Path | None:
        return self._directory

    @property
    def before(self) -> str | None:
        """The snapshot the diff is taken against (None: no diff to take)."""
        return self._before

    @classmethod
    def resumed(cls, directory: Path | None, roots: Sequence[Path], before: str | None) -> InPlaceSpace:
        """A space begun elsewhere (another activity of a run on Temporal), from its snapshot."""
        space = cls(directory, roots)
        space._before = before
        return space

    async def begin(self) -> None:
        with self._pinned() as cwd:
            self._before = await workspace.snapshot(cwd, self._roots) if cwd is not None else None

    async def diff(self) -> str | None:
        if self._before is None:
            return None
        with self._pinned() as cwd:
            if cwd is None:
                return None
            after = await workspace.snapshot(cwd, self._roots)
            if after is None or after == self._before:
                return None
            return await workspace.diff(cwd, self._roots, self._before, after, MAX_QUOTED_DIFF_CHARS)

    @contextlib.contextmanager
    def _pinned(self) -> Iterator[Path | None]:
        if self._directory is None:
            yield None
            return
        try:
            with pin(self._directory, self._roots) as pinned:
                yield pinned.cwd
        except InvalidRequestError:
            yield None  # the step that runs here fails with the reason; the diff is just absent


class WorktreeSpace:
    """A writer's own worktree; the diff is its work against the run's base."""

    def __init__(self, tree: worktrees.Worktree, directory: Path) -> None:
        self.tree = tree
        self._directory = directory

    @property
    def directory(self) -> Path | None:
        return self._directory

    async def diff(self) -> str | None:
        text = await worktrees.diff(self.tree, max_bytes=MAX_QUOTED_DIFF_CHARS)
        return text or None


class Spaces:
    """The spaces of one run: inspects the repository once, makes a worktree per label."""

    def __init__(self, run: Run, directory: Path | None, roots: Sequence[Path], base_dir: Path, enabled: bool):
        self.run = run
        self.directory = directory
        self.roots = roots
        self.base_dir = base_dir
        self.enabled = enabled
        self._repo: worktrees.Repo | None = None
        self._inspected = False
        self._lock = anyio.Lock()
        self.trees: list[worktrees.Worktree] = []

    def seed(self, repo: worktrees.Repo | None) -> None:
        """The repository as an earlier inspection of this run found it (so every writer of a run
        on Temporal starts from the same base, whichever activity makes its space)."""
        self._repo, self._inspected = repo, True

    async def repository(self) -> worktrees.Repo | None:
        async with held(self._lock):
            if not self._inspected:
                self._inspected = True
                if self.enabled and self.directory is not None:
                    self._repo = await worktrees.inspect(self.directory, self.roots)
        return self._repo

    async def make(self, label: str | None) -> InPlaceSpace | WorktreeSpace:
        repo = await self.repository()
        if repo is None:
            self._note_in_place()
            # Inspected just now and found outside any repository: a snapshot would look for the
            # same repository again and find none, so the space has no diff to take.
            inspected = self.enabled and self.directory is not None
            space = InPlaceSpace(self.directory, self.roots, outside_repository=inspected)
            if not inspected:
                await space.begin()
            return space
        tree = await worktrees.create(repo, run_id=self.run.id, label=label, base_dir=self.base_dir)
        self.trees.append(tree)
        self.run.repository = str(repo.top)
        self.run.worktrees.append(
            RunWorktree(
                label=label,
                path=str(tree.path),
                branch=tree.branch,
                entry=tree.entry,
                git_dir=str(tree.common_dir),
                head_commit=tree.head_commit,
                base_commit=tree.base_commit,
                carried_changes=tree.carried_changes,
            )
        )
        if tree.carried_changes and not any("uncommitted" in n for n in self.run.notes):
            self.run.notes.append(
                f"the uncommitted changes in {repo.top} at dispatch were carried into the run's worktrees "
                f"(commit {tree.base_commit[:12]}); your working tree was not touched"
            )
        assert self.directory is not None
        inside = self.directory.relative_to(repo.top) if self.directory.is_relative_to(repo.top) else Path()
        return WorktreeSpace(tree, tree.path / inside)

    async def continue_in(
        self, parent: Run, record: RunWorktree | None, step: Step
    ) -> InPlaceSpace | WorktreeSpace | None:
        """Where a follow-up works: the parent's worktree while it is active (the branch then holds
        all the work), else a new worktree of the parent's repository, else the step's directory."""
        alive = record is not None and await anyio.to_thread.run_sync(Path(record.path).is_dir)
        if record is not None and record.state == "active" and alive:
            from .delivery import rebuild

            tree = rebuild(parent, record)
            self.trees.append(tree)
            self.run.repository = parent.repository
            self.run.worktrees.append(record.model_copy(update={"tip": None, "diff": ""}))
            self.run.notes.append(f"continues in the worktree of {parent.id} ({record.branch})")
            return WorktreeSpace(tree, Path(step.directory or record.path))
        if record is not None and parent.repository is not None:
            self.directory = Path(parent.repository)
            self.run.notes.append(
                f"the worktree of {parent.id} was {record.state if record.state != 'active' else 'removed'}; "
                "this follow-up works in a new one, from what your repository holds now"
            )
            return await self.make(None)
        if step.directory is None:
            return None
        self.directory = Path(step.directory)
        return await self.make(None)

    def _note_in_place(self) -> None:
        if self.run.notes and any("in place" in n for n in self.run.notes):
            return
        why = "worktrees are off (MCP_COLLAB_WORKTREES=0)" if not self.enabled else "it is not inside a git repository"
        where = self.directory or "the workers' own directories"
        self.run.notes.append(f"writers worked in place in {where}: {why}")

    async def finish(self, *, max_diff_bytes: int = STORED_DIFF_BYTES) -> None:
        """Record each worktree's work as a commit on its branch, and its diff against the base."""
        if not self.trees:
            return  # worked in place: nothing to record
        with anyio.CancelScope(shield=True), anyio.move_on_after(FINALIZE_TIMEOUT_S):
            for tree, record in zip(self.trees, self.run.worktrees, strict=False):
                try:
                    record.tip = await worktrees.commit(tree, f"mcp-collab: work of {self.run.id}") or tree.base_commit
                    record.diff = await worktrees.diff(tree, max_bytes=max_diff_bytes)
                except (OSError, WorktreeError) as exc:
                    note = f"the work in {tree.path} could not be recorded: {exc}"
                    self.run.notes.append(note)
                    log.error("run %s: %s", self.run.id, note)
