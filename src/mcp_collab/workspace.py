"""What a writer changed in a git working tree, without touching the user's index or stash, and
without ever running a program the repository names.

``snapshot`` writes the whole working tree (tracked and untracked, minus ignored files) as a git
tree object through a throwaway index file; the diff between the snapshot before and after the
writer's step is exactly what the writer left, whatever state the tree was in before.

Why git runs in a scratch repository: the working tree, its ``.git/config``, ``.gitattributes`` and
hooks are all in the hands of the writer (and of whoever wrote the repository). Git config can name
programs in many places (``core.fsmonitor``, hooks, ``diff.external``, textconv, clean/smudge/process
filters, pagers, ssh and askpass commands, credential helpers, ``include.path`` pulling in more), and
new versions add more. Rather than chase each key, git here never reads the repository's config at
all: every command runs with ``GIT_DIR`` set to a scratch directory this module writes (its config is
ours alone, it has no hooks), with the repository's object store borrowed through
``GIT_OBJECT_DIRECTORY`` and its working tree through ``GIT_WORK_TREE``. System and global config are
off (``GIT_CONFIG_NOSYSTEM``, ``GIT_CONFIG_GLOBAL=/dev/null``), so the only config git sees is the
scratch file plus the ``-c`` overrides below. A ``filter=x`` or ``diff=x`` attribute in
``.gitattributes`` then names a driver no config defines, which git treats as no driver at all.
The repository's ``HEAD`` is resolved here, in Python, by reading its ref files.

The pieces (``locate``, ``Scratch``, ``write_tree``, ``run_git``, ``read_ref``) are shared with
``worktrees``, which makes and tends a writer's own git worktree under the same rules.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import stat
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import anyio
import anyio.abc

from .errors import InvalidRequestError
from .security import confine

log = logging.getLogger("mcp_collab.workspace")

# A snapshot of a big tree hashes every changed file; past this the diff is given up, not the run.
GIT_TIMEOUT_S = 30.0
# Bytes read from small repository files (HEAD, a ref, a .git file); real ones are under 200 bytes.
SMALL_FILE_BYTES = 4096
# Bytes read from a repository data file (config, packed-refs, info/exclude, the user's global
# excludes); real ones are far smaller, and past this the rest is simply not seen.
DATA_FILE_BYTES = 8 << 20
# Bytes of git's stderr kept for the log line that says why a snapshot failed.
STDERR_BYTES = 4096
# Symbolic refs followed from HEAD before giving up (git itself stops at 5).
MAX_SYMREF_DEPTH = 5

# Belt and braces on top of the scratch config: each names the key's "run nothing" value, so even a
# config that slipped in (an environment we did not foresee) cannot name a program for these. No
# `include.path` here: git refuses it on the command line, and no config git reads here includes any.
_NEUTRALIZE: tuple[str, ...] = (
    "-c", "core.fsmonitor=false",
    "-c", "core.hooksPath=/dev/null",
    "-c", "core.untrackedCache=false",
    "-c", "core.pager=cat",
    "-c", "core.sshCommand=false",
    "-c", "core.askPass=",
    "-c", "credential.helper=",
    "-c", "diff.external=",
    "-c", "protocol.allow=never",
    "-c", "core.alternateRefsCommand=",
    "-c", "uploadpack.packObjectsHook=",
)  # fmt: skip

# The environment of every git child, whatever the server's holds. Kept: PATH (to find git), the
# locale (git's messages and path quoting), TMPDIR. Not kept: HOME and XDG_* (they lead to the user's
# global config and attributes; HOME points at the scratch directory instead), every vendor key and
# token, and every GIT_* variable of the server (GIT_EXTERNAL_DIFF, GIT_SSH_COMMAND, GIT_ASKPASS,
# GIT_CONFIG_PARAMETERS, GIT_DIR...), which could redirect or extend what git runs.
GIT_ENV_NAMES: frozenset[str] = frozenset({"PATH", "LANG", "LANGUAGE", "TMPDIR"})
GIT_ENV_PREFIXES: tuple[str, ...] = ("LC_",)
_GIT_ENV_FIXED: dict[str, str] = {
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": "/dev/null",
    "GIT_ATTR_NOSYSTEM": "1",
    "GIT_OPTIONAL_LOCKS": "0",
    "GIT_TERMINAL_PROMPT": "0",
    "GIT_NO_REPLACE_OBJECTS": "1",
    "GIT_PROTOCOL_FROM_USER": "0",
}

_HEX_ID = re.compile(r"[0-9a-f]{40}([0-9a-f]{24})?")
_REF_NAME = re.compile(r"refs/[A-Za-z0-9._/+@-]+")


@dataclass(frozen=True)
class RepoLayout:
    top: Path  # the working tree
    git_dir: Path  # per-worktree git directory (HEAD lives here)
    common_dir: Path  # shared git directory (objects, branches, packed-refs, info/exclude)


@dataclass(frozen=True)
class GitResult:
    """What one git child did. ``code`` is None when git could not start or missed its deadline."""

    code: int | None
    out: bytes  # at most ``max_bytes + 1`` bytes of stdout
    err: str  # the start of stderr
    truncated: bool  # stdout went past ``max_bytes`` and git was stopped there
    problem: str  # why it failed, in words ("" when it did not)

    @property
    def ok(self) -> bool:
        return self.code == 0 and not self.truncated

    @property
    def text(self) -> str:
        return self.out.decode("utf-8", "replace")


def git_env(environ: Mapping[str, str], scratch: Path) -> dict[str, str]:
    """The allow-listed environment of a git child working through the scratch repository."""
    env = {k: v for k, v in environ.items() if k in GIT_ENV_NAMES or k.startswith(GIT_ENV_PREFIXES)}
    env.update(_GIT_ENV_FIXED)
    env["HOME"] = str(scratch)
    env["GIT_DIR"] = str(scratch / "git")
    return env


def read_small(path: Path, limit: int = SMALL_FILE_BYTES) -> str | None:
    """The start of a regular file, or None. Non-blocking and type-checked, because a writer can put
    a FIFO or a device where a ref file should be and the server must not hang on it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return os.read(fd, limit).decode("utf-8", "replace")
    except OSError:
        return None
    finally:
        os.close(fd)


def _mode(path: str) -> int | None:
    """The file type bits of ``path`` (links followed), or None when there is nothing there."""
    try:
        return stat.S_IFMT(os.stat(path).st_mode)
    except (OSError, ValueError):
        return None


def _is_git_dir(path: str) -> bool:
    return _mode(os.path.join(path, "HEAD")) == stat.S_IFREG and (
        _mode(os.path.join(path, "objects")) == stat.S_IFDIR or _mode(os.path.join(path, "commondir")) == stat.S_IFREG
    )


def locate(cwd: Path, roots: Sequence[Path]) -> RepoLayout | None:
    """The repository whose working tree holds ``cwd``, found the way git finds it, or None.

    A ``.git`` file (``gitdir: /somewhere``) is followed, because linked worktrees and submodules are
    made of them, but only when the git directory it names (and its shared directory) lies inside the
    workspace roots: the snapshot writes objects there, and the server writes nowhere a worker could
    not. A bare repository, or a directory inside a ``.git``, has no working tree: no diff."""
    try:
        start = str(cwd.resolve(strict=True))
    except (OSError, RuntimeError):
        return None
    # Up from ``start``, in plain strings and one stat per candidate (a dispatch walks this for a
    # directory outside any repository up to the root).
    here = start
    while True:
        dotgit = os.path.join(here, ".git")
        kind = _mode(dotgit)
        if kind == stat.S_IFDIR:
            top, git_dir = Path(here), Path(dotgit)
            break
        if kind is not None:
            text = read_small(Path(dotgit))
            if text is None or not text.startswith("gitdir:"):
                log.warning("no diff: %s is neither a git directory nor a 'gitdir:' file", dotgit)
                return None
            top = Path(here)
            git_dir = top / text[len("gitdir:") :].strip()
            break
        if _is_git_dir(here):
            return None
        parent = os.path.dirname(here)
        if parent == here:
            return None
        here = parent
    common = git_dir
    if (pointer := read_small(git_dir / "commondir")) is not None:
        common = git_dir / pointer.strip()
    try:
        for what, path in (("working tree", top), ("git directory", git_dir), ("git common directory", common)):
            confine(str(path.resolve()), roots, field=f"the {what}")
    except InvalidRequestError as exc:
        log.warning("no diff: %s", exc)
        return None
    git_dir, common = git_dir.resolve(), common.resolve()
    if not (git_dir / "HEAD").is_file() or not (common / "objects").is_dir():
        log.warning("no diff: %s is not a git directory (no HEAD or objects)", git_dir)
        return None
    return RepoLayout(top=top, git_dir=git_dir, common_dir=common)


def read_ref(repo: RepoLayout, name: str = "HEAD") -> str | None:
    """The commit a ref names (``HEAD`` by default), read from the ref files (loose, then
    packed-refs), or None when the branch is unborn or the refs are in a form not read here (a
    reftable): the snapshot then starts from an empty index, which changes only whether files
    tracked but ignored are included."""
    for _ in range(MAX_SYMREF_DEPTH):
        text = read_small(repo.git_dir / name)
        if text is None and name != "HEAD":
            text = read_small(repo.common_dir / name)
        if text is None:
            return _packed_ref(repo, name)
        text = text.strip()
        if text.startswith("ref:"):
            name = text[len("ref:") :].strip()
            # A ref name from the repository is used as a path below: refs/... and nothing that climbs.
            if not _REF_NAME.fullmatch(name) or ".." in name:
                return None
            continue
        return text if _HEX_ID.fullmatch(text) else None
    return None


def _packed_ref(repo: RepoLayout, name: str) -> str | None:
    text = read_small(repo.common_dir / "packed-refs", limit=DATA_FILE_BYTES)
    for line in (text or "").splitlines():
        oid, _, ref = line.partition(" ")
        if ref == name and _HEX_ID.fullmatch(oid):
            return oid
    return None


def copy_regular_file(source: Path, target: Path) -> bool:
    """Copy ``source`` to ``target`` when it is a regular file (never a FIFO or device a writer put
    there), with its modification time; False when it is not, or cannot be read.

    The time matters for the git indexes copied here: git takes an entry whose file has the stat
    data the index recorded for unchanged, except when the file is as new as the index itself
    ("racily clean"), which it re-reads. A copy dated now would hide that, and a file rewritten
    in place with the same size in the second its worktree was filled would be missed."""
    try:
        fd = os.open(source, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return False
        with os.fdopen(os.dup(fd), "rb") as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.utime(target, ns=(info.st_atime_ns, info.st_mtime_ns))
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


class Scratch:
    """A scratch git directory that borrows one repository's objects and a working tree (the
    repository's own unless ``work_tree`` names another, such as a new worktree being filled)."""

    def __init__(
        self,
        repo: RepoLayout,
        base: Path,
        *,
        work_tree: Path | None = None,
        purpose: str = "no diff",
        deadline_s: float = GIT_TIMEOUT_S,
    ) -> None:
        self.repo = repo
        self.base = base
        self.work_tree = work_tree or repo.top
        self.git_dir = base / "git"
        self.index = str(base / "index")
        self.purpose = purpose  # how a failure starts in the log ("no diff", "worktree")
        self.deadline_s = deadline_s
        self.object_format = "sha1"
        self.problem = ""  # why the last step failed, for the caller's message

    async def prepare(self) -> bool:
        for sub in ("refs", "objects", "info"):
            (self.git_dir / sub).mkdir(parents=True)
        (self.git_dir / "HEAD").write_text("ref: refs/heads/snapshot\n", encoding="utf-8")
        (self.git_dir / "config").write_text("", encoding="utf-8")
        # The object format is the one setting of the repository that must carry over: sha1 objects
        # written into a sha256 store would be garbage. `git config --file` only parses the file.
        fmt = (await self.repository_config("extensions.objectformat", "sha1") or "").strip()
        if fmt not in ("sha1", "sha256"):
            self.problem = f"{self.repo.top} uses object format {fmt!r}, not sha1 or sha256"
            log.warning("%s: %s", self.purpose, self.problem)
            return False
        self.object_format = fmt
        version = "0" if fmt == "sha1" else "1"
        extensions = "" if fmt == "sha1" else f"[extensions]\n\tobjectFormat = {fmt}\n"
        (self.git_dir / "config").write_text(
            f"[core]\n\trepositoryformatversion = {version}\n\tbare = false\n{extensions}", encoding="utf-8"
        )
        # Ignore patterns are data, never programs: keep the repository's own and the user's global
        # ones, so the snapshot skips what `git status` would skip (build output, virtualenvs).
        excludes = [read_small(self.repo.common_dir / "info" / "exclude", DATA_FILE_BYTES) or ""]
        if (global_file := _global_excludes_file()) is not None:
            excludes.append(read_small(global_file, DATA_FILE_BYTES) or "")
        (self.git_dir / "info" / "exclude").write_text("\n".join(excludes), encoding="utf-8")
        return True

    async def repository_config(self, key: str, default: str) -> str | None:
        """One value of the repository's own config file, parsed by git as data (never applied).
        git parses a bounded copy, never the file itself: a FIFO there would hold git until the deadline."""
        copy = self.base / "repository.config"
        if not copy.exists():
            copy.write_text(read_small(self.repo.common_dir / "config", DATA_FILE_BYTES) or "", encoding="utf-8")
        return await self.git("config", "--file", str(copy), "--default", default, "--get", key)

    def env(self, index: str | None = None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        env = git_env(os.environ, self.base)
        env["GIT_WORK_TREE"] = str(self.work_tree)
        env["GIT_OBJECT_DIRECTORY"] = str(self.repo.common_dir / "objects")
        if index is not None:
            env["GIT_INDEX_FILE"] = index
        env.update(extra or {})
        return env

    async def git(self, *args: str, index: bool = False, max_bytes: int = SMALL_FILE_BYTES) -> str | None:
        result = await self.run(*args, index=self.index if index else None, max_bytes=max_bytes)
        if result.truncated:
            return result.text  # cut short on purpose; the exit status is our kill's
        return result.text if result.ok else None

    async def run(
        self,
        *args: str,
        index: str | None = None,
        env: Mapping[str, str] | None = None,
        max_bytes: int = SMALL_FILE_BYTES,
        stdout: int | IO[Any] | None = None,
    ) -> GitResult:
        """git through this scratch repository, its failure logged and kept in ``problem``."""
        result = await run_git(
            [*_NEUTRALIZE, *args],
            cwd=self.work_tree,
            env=self.env(index, env),
            max_bytes=max_bytes,
            stdout=stdout,
            deadline_s=self.deadline_s,
        )
        if not result.ok and not result.truncated:
            self.problem = result.problem
            log.warning("%s: %s", self.purpose, result.problem)
        return result


def _global_excludes_file() -> Path | None:
    """The user's global ignore file at git's default place. Only the default place: the global
    config that could name another is not read (a writer whose workspace holds the home directory
    could write it)."""
    xdg = os.environ.get("XDG_CONFIG_HOME") or (
        str(Path(os.environ["HOME"]) / ".config") if os.environ.get("HOME") else ""
    )
    return Path(xdg) / "git" / "ignore" if xdg else None


def _kill_group(proc: anyio.abc.Process | None) -> None:
    if proc is not None and proc.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


def _subcommand(args: Sequence[str]) -> str:
    """The git command in an argument list that may start with ``-c key=value`` pairs."""
    rest = list(args)
    while len(rest) >= 2 and rest[0] == "-c":
        rest = rest[2:]
    return rest[0] if rest else "(nothing)"


async def run_git(
    args: list[str],
    *,
    cwd: Path,
    env: dict[str, str],
    max_bytes: int,
    stdout: int | IO[Any] | None = None,
    deadline_s: float = GIT_TIMEOUT_S,
) -> GitResult:
    """Run git (``args`` after the program name): own process group, killed whole on the deadline,
    stdout kept up to ``max_bytes + 1`` bytes (or written to ``stdout`` when a file is given), the
    start of stderr kept for the message. Never raises for git's own failure: see ``GitResult``."""
    out = bytearray()
    err = bytearray()
    proc: anyio.abc.Process | None = None
    what = f"git {_subcommand(args)} in {cwd}"

    async def drain(stream: anyio.abc.ByteReceiveStream | None, into: bytearray, cap: int) -> None:
        if stream is None:
            return
        async for chunk in stream:
            into.extend(chunk[: max(0, cap - len(into))])
            if len(into) >= cap and into is out:
                # Enough of stdout: stop git rather than read (and wait for) the rest of a flood.
                _kill_group(proc)
                return

    try:
        with anyio.fail_after(deadline_s):
            proc = await anyio.open_process(
                ["git", *args],
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=stdout if stdout is not None else subprocess.PIPE,
                start_new_session=True,
            )
            async with proc, anyio.create_task_group() as tg:
                tg.start_soon(drain, proc.stderr, err, STDERR_BYTES)
                await drain(proc.stdout, out, max_bytes + 1)
            code = proc.returncode
    except TimeoutError:
        return GitResult(None, b"", "", False, f"{what} did not finish within {deadline_s:g} s")
    except OSError as exc:
        return GitResult(None, b"", "", False, f"{what} could not run: {exc}")
    finally:
        _kill_group(proc)
    stderr = err.decode("utf-8", "replace").strip()
    if len(out) > max_bytes:
        return GitResult(code, bytes(out), stderr, True, "")
    problem = "" if code == 0 else f"{what} failed (exit {code}): {stderr or 'no message'}"
    return GitResult(code, bytes(out), stderr, False, problem)


async def write_tree(scratch: Scratch, head: str | None, *, seed_index: Path | None = None) -> str | None:
    """A tree id for the scratch's working tree as it is (tracked and untracked, minus ignored), or
    None (``scratch.problem`` says why).

    ``seed_index``, when it is a regular file, is copied and used as the starting index: its stat
    data lets git skip hashing every unchanged file (a 10,000-file tree costs a stat per file, not a
    read), and its skip-worktree entries (a sparse checkout) are kept rather than seen as deleted.
    An index git cannot use here (a split index, whose shared part lives in the repository's own git
    directory) falls back to starting from ``head``."""
    seeded = seed_index is not None and await anyio.to_thread.run_sync(
        copy_regular_file, seed_index, Path(scratch.index)
    )
    added = await scratch.git("add", "-A", "--", ".", index=True) if seeded else None
    if added is None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(scratch.index)
        if head is not None:
            # A HEAD whose objects are missing (a partial clone) only loses the tracked-but-ignored
            # files; the scratch repository has no remote, so nothing is fetched.
            await scratch.git("read-tree", head, index=True)
        if await scratch.git("add", "-A", "--", ".", index=True) is None:
            return None
    tree = (await scratch.git("write-tree", index=True) or "").strip()
    return tree if _HEX_ID.fullmatch(tree) else None


async def snapshot(cwd: Path | None, roots: Sequence[Path]) -> str | None:
    """A tree id for the working tree at ``cwd``, or None when it is not a git working tree inside
    ``roots`` (or git could not write the snapshot)."""
    repo = locate(cwd or Path.cwd(), roots)
    if repo is None:
        return None
    with tempfile.TemporaryDirectory(prefix="mcp-collab-git-") as tmp:
        scratch = Scratch(repo, Path(tmp))
        if not await scratch.prepare():
            return None
        return await write_tree(scratch, read_ref(repo))


async def diff(cwd: Path | None, roots: Sequence[Path], before: str, after: str, max_bytes: int) -> str | None:
    """The diff between two snapshots of the working tree at ``cwd``, cut to ``max_bytes``."""
    if not (_HEX_ID.fullmatch(before) and _HEX_ID.fullmatch(after)):
        return None
    repo = locate(cwd or Path.cwd(), roots)
    if repo is None:
        return None
    with tempfile.TemporaryDirectory(prefix="mcp-collab-git-") as tmp:
        scratch = Scratch(repo, Path(tmp))
        if not await scratch.prepare():
            return None
        text = await scratch.git(
            "diff", "--no-color", "--no-ext-diff", "--no-textconv", before, after, max_bytes=max_bytes
        )
    if text is not None and len(text) > max_bytes:
        text = text[:max_bytes] + "\n[... diff truncated ...]\n"
    return text
