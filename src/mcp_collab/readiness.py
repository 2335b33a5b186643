"""Readiness probes: what this machine can run right now, and how to fix what it cannot.

Non-destructive: it looks for binaries and asks their version, checks that credentials are
present (never reads out a value), imports the SDKs, writes one temp file beside the store, and
reports damaged logs the store repaired and kept aside. With MCP_COLLAB_ENGINE=temporal it asks
Temporal whether the namespace answers and lists the workers serving steps (their leases in the
store). For each runtime it says which endpoint it
will call and what the server hands a CLI so that it does; a custom endpoint gets a TCP connect
(no request, no key), so one that is set but down is reported before a step waits on it.
Used by the ``check_runtimes`` tool, ``mcp-collab doctor`` and ``probes/run_probes.py``.
"""

from __future__ import annotations

import errno
import importlib.metadata
import os
import subprocess
import tempfile
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import anyio

from .config import PAYLOAD_KEYS_VARIABLE, Endpoint, Settings, payload_key_id
from .errors import StoreError
from .models import Check, ReadinessReport, RuntimeReadiness
from .runtimes.cli import find_binary
from .runtimes.cli.vendors import VENDORS, EndpointPlan
from .runtimes.registry import RuntimeSpec, sdk_runtimes
from .store.json_store import CORRUPT_MARK, DAMAGED_MARK, LOG_NAME, PROBE_BYTES

if TYPE_CHECKING:
    from .store import RunStore

VERSION_TIMEOUT_S = 20.0
# A TCP connect to a custom endpoint: a loopback or LAN server answers in milliseconds, a remote
# gateway well within this; beyond it the endpoint counts as unreachable.
ENDPOINT_CONNECT_TIMEOUT_S = 3.0
# The workers a report names one by one; past this it counts the rest (a check is one line).
LISTED_WORKERS = 8
START_WORKER = "mcp-collab worker --queue NAME --root DIR"


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


async def _reach(endpoint: Endpoint) -> str | None:
    """None when a TCP connection to the endpoint's host and port opens; else why not."""
    parts = urlsplit(endpoint.effective)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with anyio.fail_after(ENDPOINT_CONNECT_TIMEOUT_S):
            stream = await anyio.connect_tcp(host, port)
    except TimeoutError:
        return f"no answer to a TCP connect within {ENDPOINT_CONNECT_TIMEOUT_S:g}s"
    except OSError as exc:
        # anyio sums up failed attempts (one per address) in one error whose cause is the last one.
        cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
        return f"TCP connect to {host}:{port} failed: {cause.strerror or exc}"
    await stream.aclose()
    return None


def _proxied(settings: Settings) -> bool:
    return any(settings.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"))


def _endpoint_checks(
    settings: Settings, plans: dict[str, EndpointPlan], unreachable: dict[str, str]
) -> tuple[list[Check], dict[str, str | None]]:
    """One check per runtime: the endpoint it will call, what the server does so it does, and why
    it cannot (a CLI that cannot speak it, an endpoint that does not answer). Also, per runtime key
    (a worker model for CLIs, a mode for SDKs), the reason it is not ready, or None."""
    checks: list[Check] = []
    blocked: dict[str, str | None] = {}
    proxy_note = " (a proxy is set: the runtimes may still reach it through the proxy)" if _proxied(settings) else ""
    for model, vendor in VENDORS.items():
        plan = plans[model]
        detail = f"calls {plan.url} ({plan.source})" + (f"; {plan.how}" if plan.how else "")
        down = unreachable.get(settings.endpoints[_vendor_of(model)].variable) if plan.custom else None
        hint = None
        if plan.problem:
            hint = plan.problem
        elif down:
            detail += f"; unreachable: {down}{proxy_note}"
            hint = f"start the server at {plan.url} or correct {plan.source}"
        blocked[model] = plan.problem or (f"{plan.url} unreachable ({down})" if down else None)
        checks.append(Check(name=f"endpoint:{vendor.name}", ok=blocked[model] is None, detail=detail, hint=hint,
                            required=False))  # fmt: skip
    for spec in sdk_runtimes():
        mode, ep = spec.mode, settings.endpoints[spec.endpoint or ""]
        source = ep.variable if ep.custom else "the vendor's own API"
        detail = f"calls {ep.shown} ({source})"
        if spec.endpoint_note is not None:
            detail += f"; {spec.endpoint_note(settings)}"
        down = unreachable.get(ep.variable) if ep.custom else None
        if down:
            detail += f"; unreachable: {down}{proxy_note}"
        blocked[mode] = f"{ep.shown} unreachable ({down})" if down else None
        checks.append(
            Check(
                name=f"endpoint:{mode}",
                ok=down is None,
                detail=detail,
                hint=f"start the server at {ep.shown} or correct {ep.variable}" if down else None,
                required=False,
            )
        )
    return checks, blocked


def _sdk_rows(
    settings: Settings, spec: RuntimeSpec, importable: bool, keyed: bool, blocked: str | None
) -> list[RuntimeReadiness]:
    """An SDK runtime is ready when its package imports, its key is set and its endpoint answers."""
    package = spec.package[0] if spec.package else spec.mode
    reason = f"{package} {'importable' if importable else 'not importable'}, {' or '.join(spec.credentials)} " + (
        "present" if keyed else "missing (steps fall back to cli under on_error)"
    )
    reason += f"; calls {settings.endpoints[spec.endpoint or ''].shown}" + (f"; {blocked}" if blocked else "")
    return [
        RuntimeReadiness(mode=spec.mode, worker_model=model, ready=importable and keyed and not blocked, reason=reason)
        for model in spec.serves
    ]


def _vendor_of(model: str) -> str:
    return {"codex_cli": "openai", "gemini_cli": "gemini", "claude_cli": "anthropic"}[model]


def _package_version(dist: str, module: str) -> str | None:
    try:
        __import__(module)
    except ImportError:
        return None
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown version"


def _store_checks(settings: Settings) -> tuple[list[Check], bool]:
    """Can a run be stored (room for a page, a writable directory, a log that is a file), and was
    damage found and repaired (its original kept aside for the operator to read)? With a database:
    which one, and is it reachable and usable. Also: whether it holds this version's schema (the JSON
    store's is made as it is written; a database's by the first server or worker of this version)."""
    if settings.store_url is not None:
        return _database_check(settings.store_url.url)
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
    return checks, True


def _database_check(url: str) -> tuple[list[Check], bool]:
    """Connect, read the schema version, change nothing (the server migrates at start, not doctor)."""
    from .store.postgres import probe  # the driver is imported only when a database is configured

    try:
        detail, current = probe(url)
    except StoreError as exc:
        return [
            Check(
                name="store",
                ok=False,
                detail=f"PostgreSQL: {exc}",
                hint="start the database or fix MCP_COLLAB_STORE_URL (host, port, user, database), "
                "or unset it to use the JSON store",
            )
        ], False
    return [Check(name="store", ok=True, detail=f"PostgreSQL: {detail}")], current


async def _temporal_check(settings: Settings) -> Check:
    """Does Temporal answer at the configured address, with the namespace and the runs' queue
    (bounded by the probe's timeout)?"""
    name = "engine:temporal"
    try:
        from .engine.temporal.client import TemporalUnavailable, probe

        detail = await probe(settings)
    except ImportError:
        return Check(
            name=name,
            ok=False,
            detail="MCP_COLLAB_ENGINE=temporal, but the temporalio package is not importable",
            hint="pip install 'mcp-collab[temporal]', or unset MCP_COLLAB_ENGINE to run steps in this server",
        )
    except TemporalUnavailable as exc:
        return Check(name=name, ok=False, detail=str(exc), hint=exc.hint)
    return Check(name=name, ok=True, detail=detail)


def _workers_check(settings: Settings, store: RunStore | None, usable: bool, current: bool) -> Check:
    """Which ``mcp-collab worker`` processes serve steps now: the live workers' leases in the store
    (the server routes a dispatch by them). Without a store at hand (doctor), the store is opened
    without migrating it, when the store check passed (``usable``) and it holds this version's schema
    (``current``: every worker sets it up at start, so without it none is serving)."""
    from .store import open_store

    name = "engine:workers"
    start = f"on a machine with the CLIs, their credentials, the repositories and this store: {START_WORKER}"
    none = "no worker is serving: a dispatch is refused until one is"
    fix_store = "fix the store (see the store check): workers announce themselves there"
    if store is None and not usable:
        return Check(name=name, ok=False, detail="not known: the store cannot be read", hint=fix_store)
    if store is None and not current:
        return Check(name=name, ok=False, detail=f"{none} (the store is not set up for this version yet)", hint=start)
    own = store is None
    try:
        if store is None:
            store = open_store(settings, migrate=False)
        leases = store.live_leases("worker")
    except StoreError as exc:
        return Check(
            name=name,
            ok=False,
            detail=f"the workers' leases could not be read: {exc}",
            hint=fix_store,
        )
    finally:
        close = getattr(store, "close", None) if own else None  # a database's pool; the JSON store holds none
        if close is not None:
            close()
    if not leases:
        return Check(name=name, ok=False, detail=none, hint=start)
    shown = [
        f"{lease.queue} on {lease.host} (pid {lease.pid}{f', {lease.slots} slots' if lease.slots else ''}): "
        f"{', '.join(map(_display, lease.roots)) or 'no roots'}"
        for lease in leases[:LISTED_WORKERS]
    ]
    more = f"; and {len(leases) - LISTED_WORKERS} more" if len(leases) > LISTED_WORKERS else ""
    return Check(name=name, ok=True, detail=f"{len(leases)} serving: " + "; ".join(shown) + more)


def _payloads_check(settings: Settings) -> Check:
    """Whether what crosses Temporal is encrypted (MCP_COLLAB_TEMPORAL_PAYLOAD_KEYS), and by which key."""
    name = "engine:payloads"
    ids = [payload_key_id(key) for key in settings.temporal.payload_keys]
    if not ids:
        return Check(
            name=name,
            ok=False,
            required=False,
            detail="not encrypted: Temporal keeps each run's task, prompts, outputs and diffs as they are",
            hint=f"set {PAYLOAD_KEYS_VARIABLE} (a key file: openssl rand -hex 32) on the server and every worker",
        )
    more = f"; {', '.join(ids[1:])} also decrypt{'s' if len(ids) == 2 else ''}" if len(ids) > 1 else ""
    return Check(
        name=name,
        ok=True,
        required=False,
        detail=f"encrypted (AES-256-GCM) with key {ids[0]}{more}; every worker needs the same keys",
    )


async def check(settings: Settings, store: RunStore | None = None) -> ReadinessReport:
    """``store``: the server's own, when it has one open (else the settings' store is opened to read)."""
    checks: list[Check] = []
    cli_ready: dict[str, bool] = {}
    binaries = {model: find_binary(settings, vendor) for model, vendor in VENDORS.items()}
    versions: dict[str, str | None] = {}

    async def ask(model: str, binary: str) -> None:
        versions[model] = await _cli_version(binary, settings.child_env(VENDORS[model].env_prefixes))

    custom = [ep for ep in settings.endpoints.values() if ep.custom]
    unreachable: dict[str, str] = {}
    engine: list[Check] = []

    async def look_at_temporal() -> None:
        engine.append(await _temporal_check(settings))  # before the workers' check, added below

    async def reach(endpoint: Endpoint) -> None:
        problem = await _reach(endpoint)
        if problem:
            unreachable[endpoint.variable] = problem

    async with anyio.create_task_group() as tg:  # gemini alone takes seconds to start
        for model, binary in binaries.items():
            if binary is not None:
                tg.start_soon(ask, model, binary)
        for endpoint in custom:
            tg.start_soon(reach, endpoint)
        if settings.engine == "temporal":
            tg.start_soon(look_at_temporal)
    # On Temporal this server runs no step: the CLIs matter on the workers' machines.
    on_workers = settings.engine == "temporal"
    elsewhere = (
        "; this server runs no step (MCP_COLLAB_ENGINE=temporal): the workers need the CLIs, so run "
        "`mcp-collab doctor` on each worker's machine"
        if on_workers
        else ""
    )
    for model, vendor in VENDORS.items():
        binary = binaries[model]
        if binary is None:
            cli_ready[model] = False
            checks.append(
                Check(
                    name=f"cli:{vendor.name}",
                    ok=False,
                    detail="not found" + (" on this server" if on_workers else ""),
                    hint=f"npm install -g {vendor.package}  (or set MCP_COLLAB_{vendor.name.upper()}_BIN)" + elsewhere,
                    required=not on_workers,
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
                hint=None if version else f"reinstall with npm install -g {vendor.package}{elsewhere}",
                required=not on_workers,
            )
        )
    environ = settings.environ
    creds: dict[str, bool] = {}  # per SDK mode: is its key set?
    for spec in sdk_runtimes():
        name = " or ".join(spec.credentials)
        creds[spec.mode] = any(environ.get(v, "").strip() for v in spec.credentials)
        checks.append(
            Check(
                name=f"credential:{name}",
                ok=creds[spec.mode],
                detail="present" if creds[spec.mode] else "not set",
                required=False,
                hint=None
                if creds[spec.mode]
                else f"export {spec.credentials[0]} to use runtimeMode {spec.mode} (the {spec.identities} CLI "
                "can use its own login)",
            )
        )
    sdk = {spec.mode: _package_version(*spec.package) for spec in sdk_runtimes() if spec.package}
    for mode, version in sdk.items():
        checks.append(
            Check(
                name=f"sdk:{mode}",
                ok=version is not None,
                detail=version or "not importable",
                hint=None if version else "pip install mcp-collab (its dependencies include the SDK)",
            )
        )
    # A database's connect can take seconds: off the event loop.
    store_checks, current = await anyio.to_thread.run_sync(_store_checks, settings)
    checks.extend(store_checks)
    if settings.engine == "temporal":
        usable = store_checks[0].ok
        engine.append(await anyio.to_thread.run_sync(_workers_check, settings, store, usable, current))
        engine.append(_payloads_check(settings))
        checks.extend(engine)
    plans = {model: vendor.endpoint(settings) for model, vendor in VENDORS.items()}
    endpoint_checks, blocked = _endpoint_checks(settings, plans, unreachable)
    checks.extend(endpoint_checks)

    runtimes = []
    for model in VENDORS:
        reason = f"{VENDORS[model].name} CLI " + ("found" if cli_ready[model] else "not found")
        reason += f"; calls {plans[model].url}"
        if blocked[model]:
            reason += f"; {blocked[model]}"
        runtimes.append(
            RuntimeReadiness(
                mode="cli", worker_model=model, ready=cli_ready[model] and not blocked[model], reason=reason
            )
        )
    for spec in sdk_runtimes():
        runtimes.extend(_sdk_rows(settings, spec, bool(sdk[spec.mode]), creds[spec.mode], blocked[spec.mode]))
    return ReadinessReport(
        checks=checks,
        runtimes=runtimes,
        default_runtime=settings.default_runtime,
        fallback_policy=settings.fallback_policy,
    )
