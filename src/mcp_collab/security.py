"""Safe by default: workspace confinement and secret redaction.

Workers run code on the user's machine on the word of a model, so:

- a worker's working directory must resolve (symlinks followed) inside one of the configured
  workspace roots (``MCP_COLLAB_WORKSPACE_ROOTS``, default: the user's home directory); a path with
  ``..`` in it, or one whose symlinks lead outside, is refused with the roots named;
- secrets never reach the store, a log, a tool result or an error message: the values of the
  server's credential variables and common key shapes are replaced by ``[REDACTED]`` wherever text
  from a worker, a vendor API or a caller enters a run.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from .errors import InvalidRequestError, shown

REDACTED = "[REDACTED]"
# Variables whose values are credentials, by name.
SECRET_NAME = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|AUTH|COOKIE)", re.I)
# Shorter values are too likely to be ordinary words to replace everywhere.
MIN_SECRET_CHARS = 8
# Key shapes worth hiding even when we were never told the value.
SECRET_PATTERNS: tuple[re.Pattern[str], ...] = tuple(
    re.compile(p)
    for p in (
        r"sk-[A-Za-z0-9][A-Za-z0-9_\-]{15,}",  # OpenAI, Anthropic (sk-ant-...)
        r"AIza[0-9A-Za-z_\-]{30,}",  # Google API keys
        r"gh[pousr]_[A-Za-z0-9]{20,}",  # GitHub tokens
        r"github_pat_[A-Za-z0-9_]{20,}",
        r"xox[abprs]-[A-Za-z0-9\-]{10,}",  # Slack
        r"AKIA[0-9A-Z]{16}",  # AWS access key ids
        r"(?i)(?<=bearer )[A-Za-z0-9._~+/\-]{16,}=*",  # the token after "Bearer "
        r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z ]*PRIVATE KEY-----",
    )
)


class Redactor:
    def __init__(self, secrets: Iterable[str] = ()) -> None:
        values = sorted({s for s in secrets if len(s) >= MIN_SECRET_CHARS}, key=len, reverse=True)
        self._known = re.compile("|".join(re.escape(v) for v in values)) if values else None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Redactor:
        return cls(v for k, v in environ.items() if SECRET_NAME.search(k) and v.strip())

    def __call__(self, text: str) -> str:
        if not text:
            return text
        if self._known is not None:
            text = self._known.sub(REDACTED, text)
        for pattern in SECRET_PATTERNS:
            text = pattern.sub(REDACTED, text)
        return text

    def optional(self, text: str | None) -> str | None:
        return None if text is None else self(text)


class RedactingFilter(logging.Filter):
    """Log records pass through the redactor before any handler formats them."""

    def __init__(self, redact: Redactor) -> None:
        super().__init__()
        self.redact = redact

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        cleaned = self.redact(message)
        if cleaned != message or record.args:
            record.msg, record.args = cleaned, None
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        return True


def default_roots(environ: Mapping[str, str]) -> tuple[Path, ...]:
    raw = environ.get("MCP_COLLAB_WORKSPACE_ROOTS", "").strip()
    if raw:
        return tuple(Path(p).expanduser() for p in raw.split(os.pathsep) if p.strip())
    return (Path(environ.get("HOME") or Path.home()),)


def confine(directory: str, roots: Sequence[Path], field: str = "workingDirectory") -> Path:
    """The real path of ``directory`` if it lies inside a workspace root; a clear refusal otherwise."""
    allowed = ", ".join(str(r) for r in roots) or "(none configured)"
    path = Path(directory)
    if not path.is_absolute():
        raise InvalidRequestError(f"{field} must be an absolute path, got {shown(directory)}")
    if ".." in path.parts:
        raise InvalidRequestError(f"{field} must not contain '..' components, got {shown(directory)}")
    try:
        real = path.resolve(strict=True)
    except (OSError, RuntimeError):
        raise InvalidRequestError(f"{field} {shown(directory)} is not an existing directory") from None
    if not real.is_dir():
        raise InvalidRequestError(f"{field} {shown(directory)} is not an existing directory")
    for root in roots:
        try:
            real_root = root.resolve(strict=True)
        except (OSError, RuntimeError):
            continue
        if real == real_root or real.is_relative_to(real_root):
            return real
    via = f" (it resolves to {real})" if str(real) != str(path) else ""
    raise InvalidRequestError(
        f"{field} {shown(directory)}{via} is outside the workspace roots: {allowed}. "
        "The operator can widen them with MCP_COLLAB_WORKSPACE_ROOTS."
    )
