"""A throwaway PostgreSQL cluster for tests and benches: initdb into a temp dir, started on loopback
on a free port, as the ``postgres`` OS user when we run as root (PostgreSQL refuses root), trust
auth, stopped and deleted at the end."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

# Seconds pg_ctl waits for the server to start or stop: a cold start on a busy machine takes a few.
PG_CTL_WAIT_S = 60
# The OS user PostgreSQL runs as when we are root (Debian's package creates it).
PG_OS_USER = "postgres"


def find_pg_bin() -> Path | None:
    """The directory holding initdb, pg_ctl and postgres: on PATH, else Debian's versioned dirs."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version, reverse=True):
        if all((Path(candidate) / b).exists() for b in ("initdb", "pg_ctl", "postgres")):
            return Path(candidate)
    return None


def missing_reason() -> str | None:
    """Why a cluster cannot be started here, or None when it can."""
    if find_pg_bin() is None:
        return "PostgreSQL's initdb/pg_ctl are not installed (Debian: apt-get install postgresql)"
    if os.geteuid() == 0:
        try:
            import pwd

            pwd.getpwnam(PG_OS_USER)
        except KeyError:
            return f"running as root and there is no {PG_OS_USER!r} OS user to run PostgreSQL as"
        if shutil.which("runuser") is None:
            return "running as root and runuser is missing (needed to start PostgreSQL as its own user)"
    return None


def _version(path: str) -> float:
    try:
        return float(Path(path).parent.name)
    except ValueError:
        return 0.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PostgresCluster:
    def __init__(self, *, durable: bool = False) -> None:
        """``durable``: keep fsync on (benches compare against a store that fsyncs); tests turn it off."""
        bin_dir = find_pg_bin()
        if bin_dir is None:
            raise RuntimeError(missing_reason() or "no PostgreSQL binaries")
        self.bin_dir = bin_dir
        self.durable = durable
        self.port = _free_port()
        self.root = Path(tempfile.mkdtemp(prefix="mcp-collab-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self._as_user: list[str] = ["runuser", "-u", PG_OS_USER, "--"] if os.geteuid() == 0 else []
        self.started = False

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, *argv: str) -> None:
        subprocess.run([*self._as_user, *argv], check=True, capture_output=True, timeout=PG_CTL_WAIT_S + 30)

    def start(self) -> PostgresCluster:
        if self._as_user:
            shutil.chown(self.root, user=PG_OS_USER)
        options = f"-h 127.0.0.1 -p {self.port} -k {self.root}" + ("" if self.durable else " -c fsync=off")
        try:
            self._run(
                str(self.bin_dir / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
                "-E", "UTF8", "--locale=C", "--no-sync",
            )  # fmt: skip
            self._run(
                str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-o", options, "-l", str(self.log),
                "-w", "-t", str(PG_CTL_WAIT_S), "start",
            )  # fmt: skip
        except subprocess.CalledProcessError as exc:
            log = self.log.read_text(encoding="utf-8", errors="replace") if self.log.exists() else ""
            self.stop()
            raise RuntimeError(f"PostgreSQL did not start: {exc.stderr.decode(errors='replace')}\n{log}") from exc
        self.started = True
        return self

    def create_database(self) -> str:
        """A fresh, empty database; its URL."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]  # our own generated name
        return self.url(name)

    def stop(self) -> None:
        if self.data.exists():
            subprocess.run(
                [*self._as_user, str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"],
                capture_output=True,
                timeout=PG_CTL_WAIT_S + 30,
            )
        self.started = False
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PostgresCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
