"""Helpers shared by the benchmark scripts: a private environment, /proc probes, the verdict line.

Every figure a benchmark prints comes with a baseline measured in the same process run, because
machines are noisy; nothing here compares against a number recorded on another day.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FAKE_CLIS = REPO / "tests" / "fake_clis"

# The two events that make a codex `exec --json` run count as finished with a final message.
FINAL_EVENTS = (
    '{"type":"item.completed","item":{"id":"a","type":"agent_message","text":"done"}}',
    '{"type":"turn.completed","usage":{"input_tokens":1,"output_tokens":1}}',
)


@contextmanager
def private_dir(prefix: str) -> Iterator[Path]:
    """A temp directory for state, fakes and pid files; never the user's store."""
    with tempfile.TemporaryDirectory(prefix=f"mcp-collab-{prefix}-") as tmp:
        yield Path(tmp)


def server_env(tmp: Path, **extra: str) -> dict[str, str]:
    """The server's environment, built explicitly: a private state dir and home, nothing inherited but PATH."""
    (tmp / "home").mkdir(exist_ok=True)
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp / "home"),
        "LANG": "C.UTF-8",
        "MCP_COLLAB_STATE_DIR": str(tmp / "state"),
        **extra,
    }


def write_script(path: Path, body: str) -> Path:
    path.write_text(body, encoding="utf-8")
    path.chmod(0o755)
    return path


def alive(pid: int) -> bool:
    """True while ``pid`` is a live process; a zombie has finished dying and counts as gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read().decode("utf-8", "replace")
    except OSError:
        return False
    fields = raw[raw.rfind(")") + 2 :].split()
    return bool(fields) and fields[0] not in ("Z", "X")


def read_pids(path: Path) -> list[int]:
    if not path.exists():
        return []
    return [int(line) for line in path.read_text(encoding="utf-8").split()]


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """The Vm* lines of /proc/<pid>/status, in kB."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status", encoding="utf-8") as fh:
        for line in fh:
            if line.startswith("Vm"):
                name, value = line.split(":", 1)
                out[name] = int(value.split()[0])
    return out


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def mb(kb: float) -> str:
    return f"{kb / 1024:.1f} MB"


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def ratio(value: float, baseline: float) -> str:
    return f"{value / baseline:.2f}x" if baseline > 0 else "n/a (baseline is zero)"


def verdict(ok: bool, what: str) -> None:
    print(f"{'PASS' if ok else 'FAIL'}: {what}")
    sys.stdout.flush()
    sys.exit(0 if ok else 1)
