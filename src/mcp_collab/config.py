"""Settings from the environment, read once at start and then passed around as one frozen value."""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args
from urllib.parse import parse_qsl, urlsplit

from .errors import ConfigError
from .models import MAX_COST_USD, Access, FallbackPolicy, RuntimeMode
from .pricing import BUILTIN_PRICES, PRICES_VARIABLE, PriceTable, load_prices
from .runtimes.registry import RUNTIMES
from .security import Redactor, default_roots

# Coding steps routinely take many minutes; an hour is a ceiling, not an expectation.
DEFAULT_STEP_TIMEOUT_S = 3600.0
# A CLI that prints nothing for this long is presumed stuck (codex and gemini emit events per item).
DEFAULT_IDLE_TIMEOUT_S = 600.0
# Bytes of a CLI's stdout/stderr kept in memory: the head and the tail, each this size.
DEFAULT_CAPTURE_BYTES = 1 << 20
# The largest answer kept whole: a step's final text, and any one line of a CLI's event stream (the
# answer is often one JSON line). Far above any model's answer (128k output tokens are under 1 MiB),
# small enough to hold a few times over while it is parsed; beyond it the step fails and says so.
DEFAULT_MAX_ANSWER_BYTES = 64 << 20
# The SDK clients' own retries: off by default so a failure reaches our fallback policy quickly.
DEFAULT_SDK_MAX_RETRIES = 0
# Runs executing at once; more wait as `queued`. Unset, it is chosen from the machine
# (default_max_concurrent_runs): each CLI worker is a process tree that takes about a core in bursts
# and up to 1 GiB, but spends most of a run waiting for its model's API.
RUNS_PER_CORE = 4  # a worker waits on the network most of the time; four share a core's bursts
MEMORY_PER_RUN = 1 << 30  # the most one CLI worker's process tree takes
MAX_DEFAULT_CONCURRENT_RUNS = 32  # beyond this the vendors' rate limits bind before the machine does
DEFAULT_MAX_CONCURRENT_RUNS = 4  # when the machine's cores or memory cannot be read
# A whole run (all its steps) may take this long before it is stopped.
DEFAULT_RUN_TIMEOUT_S = 4 * 3600.0
# Retention: finished runs beyond the newest N, or older than D days, are pruned with their outputs.
DEFAULT_RETAIN_RUNS = 10_000
DEFAULT_RETAIN_DAYS = 90.0
# A worker told to stop (SIGTERM) gives its running steps this long to end, then kills the process
# trees of those still running (they end interrupted).
DEFAULT_WORKER_STOP_GRACE_S = 10.0
# A server's lease on the run store lives this long unless renewed (three times per TTL): long
# enough to ride out a database restart or a stalled disk, short enough that a host that vanished
# has its runs recovered within half a minute.
DEFAULT_LEASE_TTL_S = 30.0
# Caps on what one caller can make us hold: a task's text, and runs waiting for a slot.
DEFAULT_MAX_TASK_CHARS = 200_000
DEFAULT_MAX_QUEUED_RUNS = 100
# Streamable HTTP sessions open at once. Each holds a transport and a server task until the client
# ends it; a handful of clients need a few each, and the cap keeps a careless or hostile local client
# from holding memory without bound.
DEFAULT_HTTP_MAX_SESSIONS = 64
# An HTTP session with no request in flight for this long is closed (its client re-initializes).
DEFAULT_HTTP_SESSION_IDLE_S = 30 * 60.0
# Which OpenAI API an OpenAI-compatible endpoint is spoken to with (MCP_COLLAB_OPENAI_WIRE_API):
# ``responses`` only, ``chat`` (Chat Completions) only, or ``auto``: Responses first, and Chat
# Completions once a custom endpoint answers 404/405 for /responses (many self-hosted servers).
WireApi = Literal["auto", "responses", "chat"]
WIRE_APIS: tuple[str, ...] = get_args(WireApi)

# Variables a CLI child inherits. Everything else in the server's environment stays behind, so a
# worker cannot read secrets it was never meant to have. Extend with MCP_COLLAB_CHILD_ENV.
CHILD_ENV_NAMES: frozenset[str] = frozenset(
    {
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "SHELL",
        "LANG",
        "LANGUAGE",
        "TERM",
        "TZ",
        "TMPDIR",
        "XDG_CONFIG_HOME",
        "XDG_DATA_HOME",
        "XDG_STATE_HOME",
        "XDG_CACHE_HOME",
        "XDG_RUNTIME_DIR",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
        "NODE_EXTRA_CA_CERTS",
        "NODE_OPTIONS",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "NO_PROXY",
        "http_proxy",
        "https_proxy",
        "no_proxy",
        "GIT_AUTHOR_NAME",
        "GIT_AUTHOR_EMAIL",
        "GIT_COMMITTER_NAME",
        "GIT_COMMITTER_EMAIL",
    }
)
# Every child gets the locale; each CLI also gets the variables of its own vendor (see vendors.py),
# so a gemini worker never sees the OpenAI key.
CHILD_ENV_PREFIXES: tuple[str, ...] = ("LC_",)


@dataclass(frozen=True)
class Endpoint:
    """Where one vendor's runtimes send their requests: a custom base URL the user set once (the
    variable names it), or the vendor's own API."""

    vendor: str  # openai | gemini | anthropic
    variable: str  # the variable that sets it: OPENAI_BASE_URL, GOOGLE_GEMINI_BASE_URL, ANTHROPIC_BASE_URL
    url: str | None  # the custom base URL, None when unset
    default_url: str  # what the vendor's clients call without one

    @property
    def custom(self) -> bool:
        return self.url is not None

    @property
    def effective(self) -> str:
        return self.url or self.default_url

    @property
    def shown(self) -> str:
        """The URL without credentials or query, fit for a report (a URL may carry user:password)."""
        parts = urlsplit(self.effective)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{host}{port}{parts.path}"


# The variable each vendor's runtimes (CLI and SDK alike) take their endpoint from, and the vendor's own.
ENDPOINT_VARIABLES: dict[str, tuple[str, str]] = {
    "openai": ("OPENAI_BASE_URL", "https://api.openai.com/v1"),
    "gemini": ("GOOGLE_GEMINI_BASE_URL", "https://generativelanguage.googleapis.com"),
    "anthropic": ("ANTHROPIC_BASE_URL", "https://api.anthropic.com"),
}


def _endpoints(env: Mapping[str, str]) -> dict[str, Endpoint]:
    found = {}
    for vendor, (variable, default) in ENDPOINT_VARIABLES.items():
        raw = env.get(variable, "").strip() or None
        if raw is not None:
            parts = urlsplit(raw)
            try:
                port_ok = parts.port is None or parts.port > 0
            except ValueError:
                port_ok = False
            if parts.scheme not in ("http", "https") or not parts.hostname or not port_ok:
                raise ConfigError(
                    f"{variable} is not an http(s) URL with a host and a valid port; "
                    "set it like http://127.0.0.1:8000/v1 (OPENAI_BASE_URL includes the /v1 path) or unset it"
                )
        found[vendor] = Endpoint(vendor=vendor, variable=variable, url=raw, default_url=default)
    return found


# Where runs execute (MCP_COLLAB_ENGINE): in this server process, or as Temporal workflows whose
# steps run on `mcp-collab worker` processes on any machine.
Engine = Literal["local", "temporal"]
ENGINES: tuple[str, ...] = get_args(Engine)
DEFAULT_TEMPORAL_ADDRESS = "127.0.0.1:7233"  # `temporal server start-dev`'s own default
DEFAULT_TEMPORAL_NAMESPACE = "default"
# The task queue run workflows are scheduled on; steps go to the queue of a worker that has their directory.
DEFAULT_TEMPORAL_QUEUE = "mcp-collab"
# A step's activity on a Temporal worker tells Temporal it is alive this often; a worker silent for
# the heartbeat timeout (MCP_COLLAB_TEMPORAL_HEARTBEAT_TIMEOUT_S) has died (its step is
# interrupted, never retried: a CLI may have edited files).
TEMPORAL_HEARTBEAT_EVERY_S = 1.0
DEFAULT_TEMPORAL_HEARTBEAT_TIMEOUT_S = 20.0
# The heartbeat timeout spans at least this many heartbeats: a couple of them may be late on a
# loaded machine, and a shorter timeout would end steps whose worker is alive.
MIN_HEARTBEATS_PER_TIMEOUT = 3


# AES-256-GCM's key: what MCP_COLLAB_TEMPORAL_PAYLOAD_KEYS holds, one or more.
PAYLOAD_KEY_BYTES = 32
PAYLOAD_KEYS_VARIABLE = "MCP_COLLAB_TEMPORAL_PAYLOAD_KEYS"
# The files of TLS to Temporal beyond the system's roots, and the PEM block each must hold.
TLS_FILE_VARIABLES = {
    "MCP_COLLAB_TEMPORAL_TLS_CERT": "CERTIFICATE",
    "MCP_COLLAB_TEMPORAL_TLS_KEY": "PRIVATE KEY",
    "MCP_COLLAB_TEMPORAL_TLS_CA": "CERTIFICATE",
}


def payload_key_id(key: bytes) -> str:
    """What names a payload key in each payload it seals, in logs and in doctor: the first bytes of
    a hash, which tell nothing of the key."""
    return hashlib.sha256(b"mcp-collab payload key " + key).hexdigest()[:8]


@dataclass(frozen=True)
class TemporalTLS:
    """TLS to Temporal beyond the system's roots (MCP_COLLAB_TEMPORAL_TLS_*): a client certificate
    and its key (mTLS), a private CA, the name the server's certificate carries. The files are read
    once, at start; the key is never shown."""

    client_cert: bytes | None = None
    client_key: bytes | None = field(default=None, repr=False)
    server_ca: bytes | None = None
    server_name: str | None = None


@dataclass(frozen=True)
class TemporalSettings:
    """Where the Temporal service is (MCP_COLLAB_TEMPORAL_*). The API key, the client certificate's
    key and the payload keys are secrets: never shown."""

    address: str = DEFAULT_TEMPORAL_ADDRESS
    namespace: str = DEFAULT_TEMPORAL_NAMESPACE
    queue: str = DEFAULT_TEMPORAL_QUEUE
    tls: bool = False
    api_key: str | None = field(default=None, repr=False)
    tls_files: TemporalTLS | None = None
    # What crosses Temporal is encrypted with the first key; any of them decrypts (key rotation).
    payload_keys: tuple[bytes, ...] = field(default=(), repr=False)
    # A step whose worker sent no heartbeat for this long has lost its worker
    # (MCP_COLLAB_TEMPORAL_HEARTBEAT_TIMEOUT_S; the server gives each run its value at dispatch).
    heartbeat_timeout_s: float = DEFAULT_TEMPORAL_HEARTBEAT_TIMEOUT_S


def _temporal(env: Mapping[str, str]) -> TemporalSettings:
    address = env.get("MCP_COLLAB_TEMPORAL_ADDRESS", "").strip() or DEFAULT_TEMPORAL_ADDRESS
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536 or "/" in address:
        raise ConfigError(
            "MCP_COLLAB_TEMPORAL_ADDRESS is not host:port; set it like 127.0.0.1:7233 or "
            "my-namespace.a1b2c.tmprl.cloud:7233"
        )
    queue = env.get("MCP_COLLAB_TEMPORAL_QUEUE", "").strip() or DEFAULT_TEMPORAL_QUEUE
    api_key = env.get("MCP_COLLAB_TEMPORAL_API_KEY", "").strip() or None
    tls_set = [n for n in (*TLS_FILE_VARIABLES, "MCP_COLLAB_TEMPORAL_TLS_SERVER_NAME") if env.get(n, "").strip()]
    # An API key (Temporal Cloud) is only ever sent over TLS, and the TLS files mean nothing without
    # it: either turns TLS on, and cannot be had without.
    tls = _choice(env, "MCP_COLLAB_TEMPORAL_TLS", "1" if api_key or tls_set else "0", ("1", "0")) == "1"
    if api_key and not tls:
        raise ConfigError(
            "MCP_COLLAB_TEMPORAL_API_KEY is sent only over TLS, but MCP_COLLAB_TEMPORAL_TLS=0; "
            "unset MCP_COLLAB_TEMPORAL_TLS (an API key turns TLS on) or unset the key"
        )
    if tls_set and not tls:
        raise ConfigError(
            f"{' and '.join(tls_set)} {'is' if len(tls_set) == 1 else 'are'} for TLS, but MCP_COLLAB_TEMPORAL_TLS=0; "
            "unset MCP_COLLAB_TEMPORAL_TLS (they turn TLS on) or unset them"
        )
    heartbeat_timeout = _positive(env, "MCP_COLLAB_TEMPORAL_HEARTBEAT_TIMEOUT_S", DEFAULT_TEMPORAL_HEARTBEAT_TIMEOUT_S)
    least = MIN_HEARTBEATS_PER_TIMEOUT * TEMPORAL_HEARTBEAT_EVERY_S
    if heartbeat_timeout < least:
        raise ConfigError(
            f"MCP_COLLAB_TEMPORAL_HEARTBEAT_TIMEOUT_S={env['MCP_COLLAB_TEMPORAL_HEARTBEAT_TIMEOUT_S'].strip()!r} is "
            f"too short: a step's worker sends a heartbeat every {TEMPORAL_HEARTBEAT_EVERY_S:g}s, so set it to "
            f"{least:g} seconds or more (default {DEFAULT_TEMPORAL_HEARTBEAT_TIMEOUT_S:g})"
        )
    return TemporalSettings(
        address=address,
        namespace=env.get("MCP_COLLAB_TEMPORAL_NAMESPACE", "").strip() or DEFAULT_TEMPORAL_NAMESPACE,
        queue=queue,
        tls=tls,
        api_key=api_key,
        tls_files=_tls_files(env) if tls_set else None,
        payload_keys=_payload_keys(env),
        heartbeat_timeout_s=heartbeat_timeout,
    )


def _tls_files(env: Mapping[str, str]) -> TemporalTLS:
    cert, key = env.get("MCP_COLLAB_TEMPORAL_TLS_CERT", "").strip(), env.get("MCP_COLLAB_TEMPORAL_TLS_KEY", "").strip()
    if bool(cert) != bool(key):
        have, lacking = ("CERT", "KEY") if cert else ("KEY", "CERT")
        raise ConfigError(
            f"MCP_COLLAB_TEMPORAL_TLS_{have} is set but MCP_COLLAB_TEMPORAL_TLS_{lacking} is not: a client "
            "certificate goes with its private key; set both (PEM files) or neither"
        )
    read = {name: _pem(name, env[name].strip(), block) for name, block in TLS_FILE_VARIABLES.items() if env.get(name)}
    return TemporalTLS(
        client_cert=read.get("MCP_COLLAB_TEMPORAL_TLS_CERT"),
        client_key=read.get("MCP_COLLAB_TEMPORAL_TLS_KEY"),
        server_ca=read.get("MCP_COLLAB_TEMPORAL_TLS_CA"),
        server_name=env.get("MCP_COLLAB_TEMPORAL_TLS_SERVER_NAME", "").strip() or None,
    )


def _pem(name: str, path: str, block: str) -> bytes:
    """A PEM file's bytes, refused (by its path, never its content) unless it holds a ``block``."""
    try:
        data = Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"{name}={path} cannot be read ({exc.strerror}); set it to a PEM file this user can read"
        ) from None
    if b"-----BEGIN ENCRYPTED PRIVATE KEY" in data:
        raise ConfigError(
            f"{name}={path} is an encrypted private key, which Temporal's client cannot use; write it out "
            "unencrypted (openssl pkey -in KEY -out PLAIN), readable by this user only"
        )
    if not re.search(rb"-----BEGIN [A-Z ]*" + block.encode() + rb"-----", data):
        raise ConfigError(f"{name}={path} holds no PEM {block} (-----BEGIN ...{block}-----); set it to one that does")
    return data


def _payload_keys(env: Mapping[str, str]) -> tuple[bytes, ...]:
    """MCP_COLLAB_TEMPORAL_PAYLOAD_KEYS: keys, or absolute paths to files holding one, comma-separated.
    A key is refused by its place in the list, never echoed."""
    if env.get("MCP_COLLAB_TEMPORAL_PAYLOAD_KEY", "").strip():
        raise ConfigError(
            f"MCP_COLLAB_TEMPORAL_PAYLOAD_KEY is not a setting; put the key in {PAYLOAD_KEYS_VARIABLE} (one key, "
            "or several separated by commas: the first encrypts, any of them decrypts)"
        )
    key_forms = f"a 256-bit key: {PAYLOAD_KEY_BYTES * 2} hex digits, or base64 (make one with openssl rand -hex 32)"
    keys: list[bytes] = []
    entries = [e.strip() for e in env.get(PAYLOAD_KEYS_VARIABLE, "").split(",")]
    for place, entry in enumerate(entries, 1):
        if not entry:
            continue
        key = _key(entry)
        if key is None and entry.startswith(("/", "~")):
            try:
                key = _key(Path(entry).expanduser().read_text(encoding="utf-8").strip())
            except (OSError, UnicodeDecodeError) as exc:
                cause = exc.strerror if isinstance(exc, OSError) else "not text"
                raise ConfigError(
                    f"{PAYLOAD_KEYS_VARIABLE}: the key file {entry} cannot be read ({cause}); it must be readable "
                    f"by this user and hold {key_forms}"
                ) from None
            if key is None:
                raise ConfigError(f"{PAYLOAD_KEYS_VARIABLE}: the key file {entry} must hold {key_forms}")
        if key is None:
            raise ConfigError(
                f"{PAYLOAD_KEYS_VARIABLE}: entry {place} of {len(entries)} is neither {key_forms}, nor the "
                "absolute path of a file holding one"
            )
        if key not in keys:
            keys.append(key)
    return tuple(keys)


def _key(text: str) -> bytes | None:
    """A 256-bit key written as hex or base64 (standard or URL-safe, padded or not); None if it is not."""
    if re.fullmatch(r"[0-9a-fA-F]{64}", text):
        return bytes.fromhex(text)
    try:
        key = base64.b64decode(text.replace("-", "+").replace("_", "/") + "=" * (-len(text) % 4), validate=True)
    except binascii.Error:
        return None
    return key if len(key) == PAYLOAD_KEY_BYTES else None


# The URL schemes that select the PostgreSQL store (libpq accepts both).
STORE_URL_SCHEMES = ("postgresql", "postgres")


@dataclass(frozen=True)
class StoreUrl:
    """A database URL (MCP_COLLAB_STORE_URL). It may carry a password: ``repr`` and ``shown`` never do."""

    url: str = field(repr=False)

    def __repr__(self) -> str:
        return f"StoreUrl({self.shown!r})"

    @property
    def shown(self) -> str:
        return shown_store_url(self.url)


def shown_store_url(url: str) -> str:
    """The database a URL names, fit for a log or a report: no password, no query."""
    parts = urlsplit(url)
    host = parts.hostname or dict(parse_qsl(parts.query)).get("host", "")
    if ":" in host:
        host = f"[{host}]"
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        port = ""
    user = f"{parts.username}@" if parts.username else ""
    return f"{parts.scheme}://{user}{host}{port}{parts.path}"


def store_url_secrets(url: str) -> list[str]:
    """What of a URL must never be shown: its password, in the user part or the query."""
    parts = urlsplit(url)
    found = [parts.password] if parts.password else []
    found += [v for k, v in parse_qsl(parts.query) if k == "password" and v]
    return found


def _store_url(env: Mapping[str, str]) -> StoreUrl | None:
    raw = env.get("MCP_COLLAB_STORE_URL", "").strip()
    if not raw:
        return None
    # The value is never echoed back: it may hold a password.
    parts = urlsplit(raw)
    try:
        port_ok = parts.port is None or parts.port > 0
    except ValueError:
        port_ok = False
    if parts.scheme not in STORE_URL_SCHEMES or not port_ok or not (parts.path.strip("/") or parts.query):
        raise ConfigError(
            "MCP_COLLAB_STORE_URL is not a PostgreSQL URL with a database name and a valid port; set it like "
            "postgresql://user:password@host:5432/dbname, or unset it to keep runs in the JSON store in "
            "MCP_COLLAB_STATE_DIR"
        )
    return StoreUrl(raw)


def default_state_dir(environ: Mapping[str, str]) -> Path:
    base = environ.get("XDG_STATE_HOME") or str(Path(environ.get("HOME") or Path.home()) / ".local" / "state")
    return Path(base) / "mcp-collab"


@dataclass(frozen=True)
class Settings:
    state_dir: Path
    default_runtime: RuntimeMode = "cli"
    fallback_policy: FallbackPolicy = "on_error"
    step_timeout_s: float = DEFAULT_STEP_TIMEOUT_S
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S
    capture_bytes: int = DEFAULT_CAPTURE_BYTES
    max_answer_bytes: int = DEFAULT_MAX_ANSWER_BYTES
    sdk_max_retries: int = DEFAULT_SDK_MAX_RETRIES
    max_concurrent_runs: int = DEFAULT_MAX_CONCURRENT_RUNS
    run_timeout_s: float = DEFAULT_RUN_TIMEOUT_S
    max_task_chars: int = DEFAULT_MAX_TASK_CHARS
    max_queued_runs: int = DEFAULT_MAX_QUEUED_RUNS
    http_max_sessions: int = DEFAULT_HTTP_MAX_SESSIONS
    http_session_idle_s: float = DEFAULT_HTTP_SESSION_IDLE_S
    # What writing roles may do: read_only, workspace_write (default), or bypass (the CLIs' own
    # sandbox and approvals off). Only the operator's environment can choose bypass; no tool can.
    writer_access: Access = "workspace_write"
    # Writers work in a git worktree of their own when the directory is inside a repository.
    worktrees: bool = True
    workspace_roots: tuple[Path, ...] = ()
    retain_runs: int | None = DEFAULT_RETAIN_RUNS
    retain_days: float | None = DEFAULT_RETAIN_DAYS
    # The PostgreSQL database that holds the runs (MCP_COLLAB_STORE_URL); None: the JSON store in state_dir.
    store_url: StoreUrl | None = None
    # Where runs execute: this process (local) or Temporal (MCP_COLLAB_ENGINE=temporal).
    engine: Engine = "local"
    temporal: TemporalSettings = field(default_factory=TemporalSettings)
    # How long a server's lease on the store outlives its last renewal (MCP_COLLAB_LEASE_TTL_S).
    lease_ttl_s: float = DEFAULT_LEASE_TTL_S
    # How long a stopping worker lets its running steps go on (MCP_COLLAB_WORKER_STOP_GRACE_S).
    worker_stop_grace_s: float = DEFAULT_WORKER_STOP_GRACE_S
    # The variables the runtimes declare in runtimes/registry.py, read and checked once, by name.
    runtime_texts: Mapping[str, str] = field(default_factory=lambda: _runtime_settings({})[0])
    runtime_counts: Mapping[str, int] = field(default_factory=lambda: _runtime_settings({})[1])
    openai_wire_api: WireApi = "auto"
    # Per vendor (openai, gemini, anthropic): the one endpoint its CLI and its SDK runtime both call.
    endpoints: Mapping[str, Endpoint] = field(default_factory=lambda: _endpoints({}))
    cli_bins: Mapping[str, str] = field(default_factory=dict)
    child_env_extra: frozenset[str] = frozenset()
    # Dollars per million tokens by model (pricing.py, with MCP_COLLAB_PRICES laid over it).
    prices: PriceTable = field(default_factory=lambda: PriceTable(BUILTIN_PRICES), repr=False)
    # A run's budget when its dispatch names none (MCP_COLLAB_MAX_COST_USD); None: no budget.
    max_cost_usd: float | None = None
    environ: Mapping[str, str] = field(default_factory=dict, repr=False)
    redact: Redactor = field(default_factory=Redactor, repr=False)

    @property
    def store_dir(self) -> Path:
        return self.state_dir

    @property
    def worktrees_dir(self) -> Path:
        """Where runs' worktrees live: beside the store, never inside the user's repository."""
        return self.state_dir / "worktrees"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = dict(os.environ if environ is None else environ)
        state = env.get("MCP_COLLAB_STATE_DIR")
        runtime_texts, runtime_counts = _runtime_settings(env)
        return cls(
            state_dir=Path(state).expanduser() if state else default_state_dir(env),
            default_runtime=_choice(env, "MCP_WORKER_RUNTIME_DEFAULT", "cli", get_args(RuntimeMode)),  # type: ignore[arg-type]
            fallback_policy=_choice(env, "MCP_WORKER_FALLBACK_POLICY", "on_error", get_args(FallbackPolicy)),  # type: ignore[arg-type]
            step_timeout_s=_positive(env, "MCP_COLLAB_STEP_TIMEOUT", DEFAULT_STEP_TIMEOUT_S),
            idle_timeout_s=_positive(env, "MCP_COLLAB_IDLE_TIMEOUT", DEFAULT_IDLE_TIMEOUT_S),
            capture_bytes=_count(env, "MCP_COLLAB_CAPTURE_BYTES", DEFAULT_CAPTURE_BYTES),
            max_answer_bytes=_count(env, "MCP_COLLAB_MAX_ANSWER_BYTES", DEFAULT_MAX_ANSWER_BYTES),
            sdk_max_retries=_count(env, "MCP_COLLAB_SDK_MAX_RETRIES", DEFAULT_SDK_MAX_RETRIES, allow_zero=True),
            max_concurrent_runs=_count(env, "MCP_COLLAB_MAX_CONCURRENT_RUNS", default_max_concurrent_runs()),
            run_timeout_s=_positive(env, "MCP_COLLAB_RUN_TIMEOUT", DEFAULT_RUN_TIMEOUT_S),
            max_task_chars=_count(env, "MCP_COLLAB_MAX_TASK_CHARS", DEFAULT_MAX_TASK_CHARS),
            max_queued_runs=_count(env, "MCP_COLLAB_MAX_QUEUED_RUNS", DEFAULT_MAX_QUEUED_RUNS),
            http_max_sessions=_count(env, "MCP_COLLAB_HTTP_MAX_SESSIONS", DEFAULT_HTTP_MAX_SESSIONS),
            http_session_idle_s=_positive(env, "MCP_COLLAB_HTTP_SESSION_IDLE_S", DEFAULT_HTTP_SESSION_IDLE_S),
            writer_access=_choice(env, "MCP_COLLAB_WRITER_ACCESS", "workspace_write", get_args(Access)),  # type: ignore[arg-type]
            worktrees=_choice(env, "MCP_COLLAB_WORKTREES", "1", ("1", "0")) == "1",
            workspace_roots=default_roots(env),
            retain_runs=_optional_int(env, "MCP_COLLAB_RETAIN_RUNS", DEFAULT_RETAIN_RUNS),
            retain_days=_optional(env, "MCP_COLLAB_RETAIN_DAYS", DEFAULT_RETAIN_DAYS),
            store_url=_store_url(env),
            engine=_choice(env, "MCP_COLLAB_ENGINE", "local", ENGINES),  # type: ignore[arg-type]
            temporal=_temporal(env),
            lease_ttl_s=_positive(env, "MCP_COLLAB_LEASE_TTL_S", DEFAULT_LEASE_TTL_S),
            worker_stop_grace_s=_positive(
                env, "MCP_COLLAB_WORKER_STOP_GRACE_S", DEFAULT_WORKER_STOP_GRACE_S, allow_zero=True
            ),
            runtime_texts=runtime_texts,
            runtime_counts=runtime_counts,
            openai_wire_api=_choice(env, "MCP_COLLAB_OPENAI_WIRE_API", "auto", WIRE_APIS),  # type: ignore[arg-type]
            endpoints=_endpoints(env),
            cli_bins={
                vendor: env[var]
                for vendor, var in (
                    ("codex", "MCP_COLLAB_CODEX_BIN"),
                    ("gemini", "MCP_COLLAB_GEMINI_BIN"),
                    ("claude", "MCP_COLLAB_CLAUDE_BIN"),
                )
                if env.get(var)
            },
            child_env_extra=frozenset(n for n in env.get("MCP_COLLAB_CHILD_ENV", "").replace(",", " ").split() if n),
            prices=load_prices(env.get(PRICES_VARIABLE, "")),
            max_cost_usd=_budget(env, "MCP_COLLAB_MAX_COST_USD"),
            environ=env,
            redact=Redactor.from_environ(env),
        )

    def child_env(self, vendor_prefixes: tuple[str, ...] = ()) -> dict[str, str]:
        """The environment a CLI child gets: the allow-list of the server's environment, plus the
        variables whose names start with its vendor's prefixes."""
        prefixes = CHILD_ENV_PREFIXES + vendor_prefixes
        return {
            k: v
            for k, v in self.environ.items()
            if k in CHILD_ENV_NAMES or k in self.child_env_extra or k.startswith(prefixes)
        }


def _runtime_settings(env: Mapping[str, str]) -> tuple[dict[str, str], dict[str, int]]:
    """Every variable a runtime declares with a kind, read as that kind (or its default)."""
    texts: dict[str, str] = {}
    counts: dict[str, int] = {}
    for spec in RUNTIMES.values():
        for variable in spec.variables:
            if variable.kind == "text":
                texts[variable.name] = env.get(variable.name, "").strip() or variable.default
            elif variable.kind == "count":
                counts[variable.name] = _count(env, variable.name, int(variable.default))
    return texts, counts


def default_max_concurrent_runs() -> int:
    """Runs at once that this machine carries: ``RUNS_PER_CORE`` per usable core, at most one per
    ``MEMORY_PER_RUN`` of memory, within 1 and ``MAX_DEFAULT_CONCURRENT_RUNS``. Cores and memory are
    what this process may use: its CPU affinity and, in a container, its cgroup's limits."""
    cores, memory = _usable_cores(), _usable_memory()
    if cores is None or memory is None:
        return DEFAULT_MAX_CONCURRENT_RUNS
    return max(1, min(cores * RUNS_PER_CORE, memory // MEMORY_PER_RUN, MAX_DEFAULT_CONCURRENT_RUNS))


def _usable_cores() -> int | None:
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 0
    quota = _cgroup_value("cpu.max")  # "max 100000" or "<quota> <period>"
    if quota is not None and len(quota.split()) == 2 and quota.split()[0].isdigit():
        limit, period = (int(v) for v in quota.split())
        cores = min(cores, max(1, -(-limit // max(1, period))))
    return cores or None


def _usable_memory() -> int | None:
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None
    limit = _cgroup_value("memory.max")  # "max" or bytes
    if limit is not None and limit.isdigit():
        memory = min(memory, int(limit))
    return memory if memory > 0 else None


def _cgroup_value(name: str) -> str | None:
    """A cgroup v2 limit of this process's group, if there is one."""
    try:
        with open("/proc/self/cgroup", encoding="utf-8") as fh:
            group = next((line.split(":", 2)[2].strip() for line in fh if line.startswith("0::")), None)
        if group is None:
            return None
        with open(f"/sys/fs/cgroup{group.rstrip('/')}/{name}", encoding="utf-8") as fh:
            return fh.read().strip()
    except (OSError, IndexError):
        return None


def _choice(env: Mapping[str, str], name: str, default: str, accepted: tuple[str, ...]) -> str:
    value = env.get(name, "").strip() or default
    if value not in accepted:
        raise ConfigError(f"{name}={value!r} is not accepted; use one of: {', '.join(accepted)}")
    return value


def _optional(env: Mapping[str, str], name: str, default: float) -> float | None:
    """A positive limit, or 0 for none."""
    value = _positive(env, name, default, allow_zero=True)
    return None if value == 0 else value


def _budget(env: Mapping[str, str], name: str) -> float | None:
    """A budget in dollars, or None (unset or 0: no budget)."""
    value = _optional(env, name, 0.0)
    if value is not None and value > MAX_COST_USD:
        raise ConfigError(f"{name}={env.get(name, '').strip()!r} is over the ceiling of {MAX_COST_USD:g} dollars")
    return value


def _optional_int(env: Mapping[str, str], name: str, default: int) -> int | None:
    value = _count(env, name, default, allow_zero=True)
    return None if value == 0 else value


def _positive(env: Mapping[str, str], name: str, default: float, *, allow_zero: bool = False) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None
    if not math.isfinite(value):
        raise ConfigError(f"{name}={raw!r} is not a finite number")
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name}={raw!r} must be {'zero or more' if allow_zero else 'greater than zero'}")
    return value


def _count(env: Mapping[str, str], name: str, default: int, *, allow_zero: bool = False) -> int:
    """A whole number (a count, a size in bytes): '0.5' is refused, never rounded down to 0."""
    value = _positive(env, name, default, allow_zero=allow_zero)
    if value != int(value):
        raise ConfigError(f"{name}={env.get(name, '').strip()!r} must be a whole number")
    return int(value)
