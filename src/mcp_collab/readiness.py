"""Readiness probes: what this machine can run right now, and how to fix what it cannot.

Non-destructive: it looks for binaries and asks their version, checks that credentials are
present (never reads out a value), imports the SDKs, writes one temp file beside the store, and
reports damaged logs the store repaired and kept aside.
Used by the ``check_runtimes`` tool, ``mcp-collab doctor`` and ``probes/run_probes.py``.
"""

from __future__ import annotations

import errno
import importlib.metadata
import os
import subprocess
import tempfile

import anyio
from pydantic import Field

from .config import Settings
from .models import RuntimeMode, WireModel
from .runtimes.cli import find_binary
from .runtimes.cli.vendors import VENDORS
from .store.json_store import CORRUPT_MARK, DAMAGED_MARK, LOG_NAME, PROBE_BYTES

VERSION_TIMEOUT_S = 20.0


class Check(WireModel):
    name: str
    ok: bool
    detail: str
    hint: str | None = None
    required: bool = Field(default=True, description="False: only some runtimes need it.")


class RuntimeReadiness(WireModel):
    mode: RuntimeMode
    worker_model: str
    ready: bool
    reason: str


class ReadinessReport(WireModel):
    checks: list[Check]
    runtimes: list[RuntimeReadiness] = Field(description="Per worker identity and runtime: can it run now?")
    default_runtime: RuntimeMode
    fallback_policy: str

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks if c.required)


async def _cli_version(binary: str, env: dict[str, str]) -> str | None:
    try:
        with anyio.fail_after(VERSION_TIMEOUT_S):
            done = await anyio.run_process(
                [binary, "--version"], env=env, check=False, stdin=subprocess.DEVNULL, start_new_session=True
            )
    except (OSError, TimeoutError):
        return None
    text = (done.stdout or done.stderr).decode("utf-8", "replace").strip().splitlines()
    return text[0][:120] if done.returncode == 0 and text else None


def _display(path: str | os.PathLike[str]) -> str:
    """Paths under the user's home as ~/..., so reports and evidence carry no machine paths."""
    text, home = os.fspath(path), os.path.expanduser("~")
    return "~" + text[len(home) :] if home != "/" and text.startswith(home + os.sep) else text


def _package_version(dist: str, module: str) -> str | None:
    try:
        __import__(module)
    except ImportError:
        return None
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown version"


def _store_checks(settings: Settings) -> list[Check]:
    """Can a run be stored (room for a page, a writable directory, a log that is a file), and was
    damage found and repaired (its original kept aside for the operator to read)?"""
    directory = settings.state_dir
    log_path = directory / LOG_NAME
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".probe-", delete=True) as fh:
            fh.write(b"\0" * PROBE_BYTES)
            fh.flush()
            os.fsync(fh.fileno())
        if log_path.exists() and not log_path.is_file():
            raise IsADirectoryError(errno.EISDIR, "the log is not a regular file", str(log_path))
        if log_path.exists() and not os.access(log_path, os.W_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(log_path))
    except OSError as exc:
        where = _display(exc.filename or directory)
        checks = [
            Check(
                name="store",
                ok=False,
                detail=f"{where}: {exc.strerror or exc}",
                hint="free space, fix the permissions, or set MCP_COLLAB_STATE_DIR to a writable directory",
            )
        ]
    else:
        checks = [Check(name="store", ok=True, detail=f"{_display(directory)} (writable)")]
    damaged = sorted(p.name for marker in (DAMAGED_MARK, CORRUPT_MARK) for p in directory.glob(f"{LOG_NAME}{marker}*"))
    if damaged:
        shown_names = ", ".join(damaged[:5]) + (f" and {len(damaged) - 5} more" if len(damaged) > 5 else "")
        checks.append(
            Check(
                name="store:damage",
                ok=False,
                required=False,
                detail=f"the run log was found damaged and repaired; the damaged original(s) kept: {shown_names}",
                hint=f"runs in those lines were lost from the history; inspect the files in {_display(directory)} "
                "and delete them once reviewed",
            )
        )
    return checks


async def check(settings: Settings) -> ReadinessReport:
    checks: list[Check] = []
    cli_ready: dict[str, bool] = {}
    binaries = {model: find_binary(settings, vendor) for model, vendor in VENDORS.items()}
    versions: dict[str, str | None] = {}

    async def ask(model: str, binary: str) -> None:
        versions[model] = await _cli_version(binary, settings.child_env(VENDORS[model].env_prefixes))

    async with anyio.create_task_group() as tg:  # gemini alone takes seconds to start
        for model, binary in binaries.items():
            if binary is not None:
                tg.start_soon(ask, model, binary)
    for model, vendor in VENDORS.items():
        binary = binaries[model]
        if binary is None:
            cli_ready[model] = False
            checks.append(
                Check(
                    name=f"cli:{vendor.name}",
                    ok=False,
                    detail="not found",
                    hint=f"npm install -g {vendor.package}  (or set MCP_COLLAB_{vendor.name.upper()}_BIN)",
                )
            )
            continue
        version = versions.get(model)
        cli_ready[model] = version is not None
        checks.append(
            Check(
                name=f"cli:{vendor.name}",
                ok=version is not None,
                detail=f"{version} at {_display(binary)}"
                if version
                else f"{_display(binary)} does not answer --version",
                hint=None if version else f"reinstall with npm install -g {vendor.package}",
            )
        )
    environ = settings.environ
    creds = {
        "OPENAI_API_KEY": bool(environ.get("OPENAI_API_KEY", "").strip()),
        "GEMINI_API_KEY or GOOGLE_API_KEY": bool(
            (environ.get("GEMINI_API_KEY") or environ.get("GOOGLE_API_KEY") or "").strip()
        ),
        "ANTHROPIC_API_KEY": bool(environ.get("ANTHROPIC_API_KEY", "").strip()),
    }
    hints = {
        "OPENAI_API_KEY": "export OPENAI_API_KEY to use runtimeMode openai_sdk (the codex CLI can use its own login)",
        "GEMINI_API_KEY or GOOGLE_API_KEY": "export GEMINI_API_KEY to use runtimeMode google_sdk",
        "ANTHROPIC_API_KEY": "optional: the claude CLI can use its own login (`claude` once, interactively)",
    }
    for name, present in creds.items():
        checks.append(
            Check(
                name=f"credential:{name}",
                ok=present,
                detail="present" if present else "not set",
                required=False,
                hint=None if present else hints[name],
            )
        )
    sdk = {
        "openai_sdk": _package_version("openai", "openai"),
        "google_sdk": _package_version("google-genai", "google.genai"),
    }
    for mode, version in sdk.items():
        checks.append(
            Check(
                name=f"sdk:{mode}",
                ok=version is not None,
                detail=version or "not importable",
                hint=None if version else "pip install mcp-collab (its dependencies include the SDK)",
            )
        )
    checks.extend(_store_checks(settings))
    base_urls = [v for v in ("OPENAI_BASE_URL", "GOOGLE_GEMINI_BASE_URL", "ANTHROPIC_BASE_URL") if environ.get(v)]
    if base_urls:
        checks.append(Check(name="endpoints", ok=True, detail=f"custom endpoints set: {', '.join(base_urls)}"))

    runtimes = [
        RuntimeReadiness(
            mode="cli",
            worker_model=model,
            ready=cli_ready[model],
            reason=f"{VENDORS[model].name} CLI " + ("found" if cli_ready[model] else "not found"),
        )
        for model in VENDORS
    ]
    runtimes.append(
        RuntimeReadiness(
            mode="openai_sdk",
            worker_model="codex_cli",
            ready=bool(sdk["openai_sdk"]) and creds["OPENAI_API_KEY"],
            reason="openai importable, OPENAI_API_KEY "
            + ("present" if creds["OPENAI_API_KEY"] else "missing (steps fall back to cli under on_error)"),
        )
    )
    google_key = creds["GEMINI_API_KEY or GOOGLE_API_KEY"]
    runtimes.append(
        RuntimeReadiness(
            mode="google_sdk",
            worker_model="gemini_cli",
            ready=bool(sdk["google_sdk"]) and google_key,
            reason="google-genai importable, API key "
            + ("present" if google_key else "missing (steps fall back to cli under on_error)"),
        )
    )
    return ReadinessReport(
        checks=checks,
        runtimes=runtimes,
        default_runtime=settings.default_runtime,
        fallback_policy=settings.fallback_policy,
    )
