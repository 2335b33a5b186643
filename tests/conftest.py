from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mcp_collab.config import Settings
from tests.support.cli_homes import cli_bin_dir, cli_env
from tests.support.postgres import PostgresCluster
from tests.support.postgres import missing_reason as postgres_missing_reason
from tests.support.vendor_stub import VendorStub

FAKE_CLIS = Path(__file__).parent / "fake_clis"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def base_env(tmp_path: Path) -> dict[str, str]:
    """A minimal server environment: no vendor keys, a private state dir, the test's directory as the
    only workspace root."""
    (tmp_path / "home").mkdir(exist_ok=True)
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path / "home"),
        "LANG": "C.UTF-8",
        "MCP_COLLAB_STATE_DIR": str(tmp_path / "state"),
        "MCP_COLLAB_WORKSPACE_ROOTS": str(tmp_path),
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


def quick_vendor_clis() -> dict[str, str]:
    """The codex, gemini and claude CLIs as the fake that answers at once, for a test whose
    assertions are not about the vendor CLIs but whose server runs doctor (check_runtimes): it asks
    each CLI for its version, and the real gemini takes about two seconds to answer."""
    return {f"MCP_COLLAB_{name}_BIN": fake_cli("ok") for name in ("CODEX", "GEMINI", "CLAUDE")}


@pytest.fixture
def stub() -> Iterator[VendorStub]:
    """The loopback stub of the vendor APIs (127.0.0.1, free port), stopped by the test."""
    with VendorStub() as server:
        yield server


def require_real_clis() -> Path:
    """The npm bin dir of the real CLIs; a failure in CI (MCP_COLLAB_REQUIRE_REAL_CLIS=1), else a skip."""
    bin_dir = cli_bin_dir()
    missing = [b for b in ("codex", "gemini", "claude") if bin_dir is None or not (bin_dir / b).exists()]
    if missing:
        message = f"the real {', '.join(missing)} CLI(s) are not installed: run scripts/install-clis"
        if os.environ.get("MCP_COLLAB_REQUIRE_REAL_CLIS") == "1":
            pytest.fail(message)
        pytest.skip(message)
    assert bin_dir is not None
    return bin_dir


@pytest.fixture
def real_env(tmp_path: Path, stub: VendorStub, base_env: dict[str, str]) -> dict[str, str]:
    """A server environment whose CLIs and SDKs all talk to the stub; no OPENAI_API_KEY."""
    bin_dir = require_real_clis()
    env = {**base_env, **cli_env(tmp_path / "cli", stub.url)}
    env["PATH"] = f"{bin_dir}{os.pathsep}{base_env['PATH']}"
    env["OPENAI_BASE_URL"] = f"{stub.url}/v1"
    return env


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """One throwaway PostgreSQL cluster for the session (loopback, free port, trust auth), stopped
    and deleted at the end. Missing binaries: a failure in CI, else a skip that says why."""
    reason = postgres_missing_reason()
    if reason is not None:
        if os.environ.get("MCP_COLLAB_REQUIRE_REAL_CLIS") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    with PostgresCluster() as cluster:
        yield cluster


@pytest.fixture
def postgres_url(postgres_cluster: PostgresCluster) -> str:
    """A fresh, empty database of the session's cluster, for one test."""
    return postgres_cluster.create_database()
