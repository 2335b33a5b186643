from __future__ import annotations

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
