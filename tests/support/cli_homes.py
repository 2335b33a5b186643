"""Throwaway homes for the real codex / gemini / claude CLIs, pointed at a VendorStub.

``cli_env(base_dir, stub_url)`` writes config files under ``base_dir`` and returns
only the environment variables a test must add to the child's environment. Its codex provider and
gemini settings serve CLIs run directly (``fixtures/cli_outputs/record.py``); under the server,
``OPENAI_BASE_URL`` and ``GOOGLE_GEMINI_BASE_URL`` take over (the server hands the CLIs their own).

``user_env(base_dir, stub_url)`` is what a user sets once for custom endpoints: a home with no
endpoint configuration in it, the three base URLs and the keys, nothing else.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["STUB_API_KEY", "USER_CODEX_CONFIG", "cli_bin_dir", "cli_env", "user_env"]

STUB_API_KEY = "stub-key-not-secret"


def cli_bin_dir() -> Path | None:
    """Directory holding the npm-installed ``codex``, ``gemini`` and ``claude`` launchers."""
    prefix = os.environ.get("MCP_COLLAB_NPM_PREFIX")
    if prefix:
        return Path(prefix) / "node_modules" / ".bin"
    default = Path.home() / ".cache" / "mcp-collab" / "npm" / "node_modules" / ".bin"
    return default if default.is_dir() else None


def _codex_config(stub_url: str) -> str:
    base_url = stub_url.rstrip("/") + "/v1"
    return f"""\
# Written by tests/support/cli_homes.py: codex talks only to the loopback stub.
model_provider = "stub"
approval_policy = "never"
sandbox_mode = "read-only"
check_for_update_on_startup = false

[model_providers.stub]
name = "stub"
base_url = "{base_url}"
wire_api = "responses"
env_key = "CODEX_STUB_API_KEY"
request_max_retries = 0
stream_max_retries = 0
stream_idle_timeout_ms = 30000

[analytics]
enabled = false

[feedback]
enabled = false

[features]
plugins = false
"""


def _gemini_settings() -> dict[str, object]:
    return {
        "security": {
            "auth": {"selectedType": "gemini-api-key"},
            "folderTrust": {"enabled": False},
        },
        "privacy": {"usageStatisticsEnabled": False},
        "telemetry": {"enabled": False, "logPrompts": False},
        "general": {
            "maxAttempts": 1,
            "enableAutoUpdate": False,
            "enableAutoUpdateNotification": False,
            "checkpointing": {"enabled": False},
        },
        "ide": {"enabled": False},
        "tools": {"useRipgrep": False},
    }


def cli_env(base_dir: Path, stub_url: str) -> dict[str, str]:
    """Create CLI homes under ``base_dir``; return the env vars that point the CLIs at ``stub_url``."""
    base_dir = Path(base_dir)
    stub_url = stub_url.rstrip("/")
    home = base_dir / "home"
    codex_home = base_dir / "codex-home"
    gemini_home = base_dir / "gemini-home"
    claude_dir = base_dir / "claude-config"
    tmp = base_dir / "tmp"
    for d in (home, tmp, codex_home, gemini_home / ".gemini", claude_dir):
        d.mkdir(parents=True, exist_ok=True)

    (codex_home / "config.toml").write_text(_codex_config(stub_url), encoding="utf-8")
    (gemini_home / ".gemini" / "settings.json").write_text(json.dumps(_gemini_settings(), indent=2), encoding="utf-8")

    return {
        "HOME": str(home),
        "TMPDIR": str(tmp),
        # codex
        "CODEX_HOME": str(codex_home),
        "CODEX_STUB_API_KEY": STUB_API_KEY,
        # gemini
        "GEMINI_CLI_HOME": str(gemini_home),
        "GEMINI_API_KEY": STUB_API_KEY,
        "GOOGLE_GEMINI_BASE_URL": stub_url,
        "GEMINI_CLI_NO_RELAUNCH": "true",
        # claude
        "CLAUDE_CONFIG_DIR": str(claude_dir),
        "ANTHROPIC_BASE_URL": stub_url,
        "ANTHROPIC_API_KEY": STUB_API_KEY,
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "CLAUDE_CODE_MAX_RETRIES": "0",
        # Without this, claude answers a 400 by re-sending the request up to 5 more times with
        # beta headers / request fields stripped, so one scripted 400 would be followed by a 200.
        "CLAUDE_CODE_DISABLE_EXPERIMENTAL_BETAS": "1",
    }


# A user's own ~/.codex/config.toml: no provider, nothing about the stub; only codex's outside
# traffic off (analytics and plugins reach out), as a careful user would have it.
USER_CODEX_CONFIG = """\
# a user's own codex configuration: no model provider, no endpoint
model = "gpt-5.5"

[analytics]
enabled = false

[features]
plugins = false
"""


def user_env(base_dir: Path, stub_url: str) -> dict[str, str]:
    """A user's home under ``base_dir`` (only ``~/.codex/config.toml`` above in it) and the variables a
    user sets once to point every runtime at ``stub_url``: base URLs and keys, nothing else."""
    home = Path(base_dir) / "user-home"
    (home / ".codex").mkdir(parents=True, exist_ok=True)
    (home / ".codex" / "config.toml").write_text(USER_CODEX_CONFIG, encoding="utf-8")
    stub_url = stub_url.rstrip("/")
    return {
        "HOME": str(home),
        "OPENAI_BASE_URL": f"{stub_url}/v1",
        "OPENAI_API_KEY": STUB_API_KEY,
        "GOOGLE_GEMINI_BASE_URL": stub_url,
        "GEMINI_API_KEY": STUB_API_KEY,
        "ANTHROPIC_BASE_URL": stub_url,
        "ANTHROPIC_API_KEY": STUB_API_KEY,
    }
