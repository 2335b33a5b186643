"""What a writer changed in a git working tree, without touching the user's index or stash.

``snapshot`` writes the whole working tree (tracked and untracked, minus ignored files) as a git
tree object through a throwaway index file; the diff between the snapshot before and after the
writer's step is exactly what the writer left, whatever state the tree was in before.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import anyio

GIT_TIMEOUT_S = 30.0


async def _git(cwd: Path, *args: str, index: str | None = None, max_bytes: int = 1 << 20) -> str | None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env["GIT_OPTIONAL_LOCKS"] = "0"
    if index:
        env["GIT_INDEX_FILE"] = index
    try:
        with anyio.fail_after(GIT_TIMEOUT_S):
            done = await anyio.run_process(["git", *args], cwd=cwd, env=env, check=False, stdin=subprocess.DEVNULL)
    except (OSError, TimeoutError):
        return None
    if done.returncode != 0:
        return None
    return done.stdout[:max_bytes].decode("utf-8", "replace")


async def snapshot(cwd: Path | None) -> str | None:
    """A tree id for the working tree at ``cwd``, or None when it is not a git working tree."""
    if cwd is None:
        cwd = Path.cwd()
    top = await _git(cwd, "rev-parse", "--show-toplevel")
    if not top:
        return None
    with tempfile.TemporaryDirectory(prefix="mcp-collab-index-") as tmp:
        index = str(Path(tmp) / "index")
        head_ok = await _git(cwd, "rev-parse", "--verify", "-q", "HEAD")
        if head_ok:
            await _git(cwd, "read-tree", "HEAD", index=index)
        if await _git(cwd, "add", "-A", ":/", index=index) is None:
            return None
        tree = await _git(cwd, "write-tree", index=index)
    return tree.strip() if tree else None


async def diff(cwd: Path | None, before: str, after: str, max_bytes: int) -> str | None:
    if cwd is None:
        cwd = Path.cwd()
    text = await _git(cwd, "diff", "--no-color", "--no-ext-diff", before, after, max_bytes=max_bytes + 1)
    if text is not None and len(text) > max_bytes:
        text = text[:max_bytes] + "\n[... diff truncated ...]\n"
    return text
