from __future__ import annotations

import base64
from pathlib import Path

import pytest

from mcp_collab.config import Settings
from mcp_collab.errors import ConfigError


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"MCP_WORKER_RUNTIME_DEFAULT": "grpc"}, "use one of: cli, openai_sdk, google_sdk"),
        ({"MCP_WORKER_FALLBACK_POLICY": "always"}, "use one of: on_error, never"),
        ({"MCP_COLLAB_STEP_TIMEOUT": "soon"}, "is not a number"),
        ({"MCP_COLLAB_IDLE_TIMEOUT": "-1"}, "greater than zero"),
        ({"MCP_COLLAB_STEP_TIMEOUT": "nan"}, "is not a finite number"),
        ({"MCP_COLLAB_RUN_TIMEOUT": "inf"}, "is not a finite number"),
        ({"MCP_COLLAB_MAX_CONCURRENT_RUNS": "0.5"}, "must be a whole number"),
        ({"MCP_COLLAB_RETAIN_RUNS": "2.5"}, "must be a whole number"),
        ({"MCP_COLLAB_CAPTURE_BYTES": "1e3.5"}, "is not a number"),
        ({"MCP_COLLAB_TEMPORAL_ADDRESS": "https://x.tmprl.cloud"}, "is not host:port"),
        ({"MCP_COLLAB_TEMPORAL_API_KEY": "k" * 20, "MCP_COLLAB_TEMPORAL_TLS": "0"}, "sent only over TLS"),
        ({"MCP_COLLAB_TEMPORAL_HEARTBEAT_TIMEOUT_S": "2"}, r"too short: .* every 1s, so set it to 3 seconds or more"),
        ({"MCP_COLLAB_TEMPORAL_HEARTBEAT_TIMEOUT_S": "0"}, "greater than zero"),
        ({"MCP_COLLAB_WORKER_STOP_GRACE_S": "-1"}, "must be zero or more"),
    ],
)
def test_malformed_settings_name_the_variable_and_what_is_accepted(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.from_env({"HOME": "/nonexistent", **env})


def test_defaults_and_state_dir() -> None:
    s = Settings.from_env({"HOME": "/home/u"})
    assert (s.default_runtime, s.fallback_policy) == ("cli", "on_error")
    assert s.store_dir == Path("/home/u/.local/state/mcp-collab")
    assert Settings.from_env({"HOME": "/h", "XDG_STATE_HOME": "/x"}).state_dir == Path("/x/mcp-collab")
    assert Settings.from_env({"HOME": "/h", "MCP_COLLAB_STATE_DIR": "/s"}).store_dir == Path("/s")


def test_a_temporal_api_key_turns_tls_on_and_is_never_shown() -> None:
    cloud = Settings.from_env({"HOME": "/h", "MCP_COLLAB_TEMPORAL_API_KEY": "sekrit-key-1234567890"}).temporal
    assert cloud.tls and cloud.api_key == "sekrit-key-1234567890"
    assert "sekrit" not in repr(cloud)
    assert not Settings.from_env({"HOME": "/h"}).temporal.tls, "a dev server speaks plain gRPC"


def test_payload_keys_are_read_as_hex_base64_or_a_file_and_never_shown(tmp_path: Path) -> None:
    key = bytes(range(32))
    (tmp_path / "payload.key").write_text(base64.b64encode(key).decode() + "\n", encoding="utf-8")
    given = f"{'ab' * 32}, {tmp_path / 'payload.key'}, {base64.urlsafe_b64encode(key).decode().rstrip('=')}"
    temporal = Settings.from_env({"HOME": "/h", "MCP_COLLAB_TEMPORAL_PAYLOAD_KEYS": given}).temporal
    assert temporal.payload_keys == (bytes.fromhex("ab" * 32), key), "the first encrypts; a key given twice counts once"
    assert "abab" not in repr(temporal) and Settings.from_env({"HOME": "/h"}).temporal.payload_keys == ()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("ab" * 31, r"entry 1 of 1 is neither a 256-bit key: 64 hex digits, or base64 .* nor the absolute path"),
        (f"{'ab' * 32},sekrit-but-short", "entry 2 of 2 is neither"),
        ("/nowhere/payload.key", r"the key file /nowhere/payload.key cannot be read \(No such file or directory\)"),
    ],
)
def test_a_payload_key_that_is_not_one_is_refused_by_its_place_never_echoed(value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as refused:
        Settings.from_env({"HOME": "/h", "MCP_COLLAB_TEMPORAL_PAYLOAD_KEYS": value})
    assert "abab" not in str(refused.value) and "sekrit" not in str(refused.value)


def test_a_payload_key_file_without_a_key_and_the_singular_variable_are_refused(tmp_path: Path) -> None:
    (tmp_path / "empty.key").write_text("\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"the key file .*empty.key must hold a 256-bit key"):
        Settings.from_env({"HOME": "/h", "MCP_COLLAB_TEMPORAL_PAYLOAD_KEYS": str(tmp_path / "empty.key")})
    with pytest.raises(ConfigError, match=r"MCP_COLLAB_TEMPORAL_PAYLOAD_KEY is not a setting; put the key in .*KEYS"):
        Settings.from_env({"HOME": "/h", "MCP_COLLAB_TEMPORAL_PAYLOAD_KEY": "ab" * 32})


def test_tls_files_turn_tls_on_and_half_or_unreadable_ones_are_refused(tmp_path: Path) -> None:
    cert, key, ca, junk = (tmp_path / n for n in ("c.pem", "k.pem", "ca.pem", "junk.pem"))
    cert.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n", encoding="utf-8")
    ca.write_bytes(cert.read_bytes())
    key.write_text("-----BEGIN PRIVATE KEY-----\nsekrit\n-----END PRIVATE KEY-----\n", encoding="utf-8")
    junk.write_text("not a certificate", encoding="utf-8")
    files = {"MCP_COLLAB_TEMPORAL_TLS_CERT": str(cert), "MCP_COLLAB_TEMPORAL_TLS_KEY": str(key)}
    temporal = Settings.from_env({"HOME": "/h", **files, "MCP_COLLAB_TEMPORAL_TLS_CA": str(ca)}).temporal
    assert temporal.tls and temporal.tls_files is not None and temporal.tls_files.server_ca == ca.read_bytes()
    assert "sekrit" not in repr(temporal)
    refusals = [
        ({"MCP_COLLAB_TEMPORAL_TLS_CERT": str(cert)}, "TLS_CERT is set but MCP_COLLAB_TEMPORAL_TLS_KEY is not"),
        ({"MCP_COLLAB_TEMPORAL_TLS_KEY": str(key)}, "TLS_KEY is set but MCP_COLLAB_TEMPORAL_TLS_CERT is not"),
        (
            {**files, "MCP_COLLAB_TEMPORAL_TLS": "0"},
            r"TLS_CERT and MCP_COLLAB_TEMPORAL_TLS_KEY are for TLS, but .*TLS=0",
        ),
        ({"MCP_COLLAB_TEMPORAL_TLS_CA": str(tmp_path / "gone.pem")}, r"gone.pem cannot be read \(No such file"),
        ({"MCP_COLLAB_TEMPORAL_TLS_CA": str(junk)}, "junk.pem holds no PEM CERTIFICATE"),
        ({**files, "MCP_COLLAB_TEMPORAL_TLS_KEY": str(cert)}, "c.pem holds no PEM PRIVATE KEY"),
    ]
    for env, message in refusals:
        with pytest.raises(ConfigError, match=message) as refused:
            Settings.from_env({"HOME": "/h", **env})
        assert "sekrit" not in str(refused.value)


def test_a_lost_temporal_worker_is_noticed_after_twenty_seconds_unless_set_and_a_stopping_one_waits_ten() -> None:
    default = Settings.from_env({"HOME": "/h"})
    assert (default.temporal.heartbeat_timeout_s, default.worker_stop_grace_s) == (20.0, 10.0)
    quick = Settings.from_env(
        {"HOME": "/h", "MCP_COLLAB_TEMPORAL_HEARTBEAT_TIMEOUT_S": "4.5", "MCP_COLLAB_WORKER_STOP_GRACE_S": "0"}
    )
    assert (quick.temporal.heartbeat_timeout_s, quick.worker_stop_grace_s) == (4.5, 0.0)


def test_a_child_gets_the_allow_list_not_the_whole_environment() -> None:
    s = Settings.from_env(
        {
            "HOME": "/h",
            "PATH": "/bin",
            "CODEX_HOME": "/c",
            "ANTHROPIC_API_KEY": "sk-ant",
            "AWS_SECRET_ACCESS_KEY": "nope",
            "DATABASE_URL": "postgres://secret",
            "MY_TOOL_TOKEN": "extra",
            "MCP_COLLAB_CHILD_ENV": "MY_TOOL_TOKEN",
        }
    )
    claude = s.child_env(("ANTHROPIC_", "CLAUDE_"))
    assert claude["ANTHROPIC_API_KEY"] == "sk-ant" and claude["MY_TOOL_TOKEN"] == "extra" and claude["PATH"] == "/bin"
    assert "AWS_SECRET_ACCESS_KEY" not in claude and "DATABASE_URL" not in claude
    assert "CODEX_HOME" not in claude, "a CLI sees only its own vendor's variables"
    codex = s.child_env(("CODEX_", "OPENAI_"))
    assert codex["CODEX_HOME"] == "/c" and "ANTHROPIC_API_KEY" not in codex


def test_retention_limits_default_and_zero_means_none() -> None:
    s = Settings.from_env({"HOME": "/h"})
    assert (s.retain_runs, s.retain_days) == (10_000, 90.0)
    s = Settings.from_env({"HOME": "/h", "MCP_COLLAB_RETAIN_RUNS": "0", "MCP_COLLAB_RETAIN_DAYS": "7"})
    assert (s.retain_runs, s.retain_days) == (None, 7.0)
