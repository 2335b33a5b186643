"""Real git repositories for tests: a command runner and a repository with one commit."""

from __future__ import annotations

import subprocess
from pathlib import Path

# Tests commit as someone, whatever the machine's git configuration says.
IDENTITY = ("-c", "user.email=t@t", "-c", "user.name=t")


def git(repo: Path, *args: str) -> str:
    """Run git in ``repo``; its stdout (a failure raises)."""
    return subprocess.run(["git", *IDENTITY, *args], cwd=repo, capture_output=True, text=True, check=True).stdout


def init_repo(path: Path, files: dict[str, str]) -> Path:
    """A repository at ``path`` on branch main whose one commit holds ``files``."""
    path.mkdir(parents=True)
    git(path, "init", "-q", "-b", "main")
    for name, text in files.items():
        (path / name).write_text(text, encoding="utf-8")
    git(path, "add", ".")
    git(path, "commit", "-qm", "init")
    return path
