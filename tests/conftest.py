from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mcp_collab.config import Settings

FAKE_CLIS = Path(__file__).parent / "fake_clis"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def base_env(tmp_path: Path) -> dict[str, str]:
    """A minimal server environment: no vendor keys, a private state dir."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path / "home"),
        "LANG": "C.UTF-8",
        "MCP_COLLAB_STATE_DIR": str(tmp_path / "state"),
    }


@pytest.fixture
def make_settings(base_env: dict[str, str]) -> Callable[..., Settings]:
    def make(**env: str) -> Settings:
        return Settings.from_env({**base_env, **env})

    return make


@pytest.fixture
def pidfile(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "pids.txt"
    yield path


def read_pids(path: Path) -> list[int]:
    if not path.exists():
        return []
    return [int(line) for line in path.read_text(encoding="utf-8").split()]


def alive(pid: int) -> bool:
    """True while ``pid`` is a live process (zombies count as gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def fake_cli(name: str) -> str:
    return str(FAKE_CLIS / name)
