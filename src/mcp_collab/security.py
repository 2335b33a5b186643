"""Safe by default: workspace confinement and secret redaction.

Workers run code on the user's machine on the word of a model, so:

- a worker's working directory must resolve (symlinks followed) inside one of the configured
  workspace roots (``MCP_COLLAB_WORKSPACE_ROOTS``, default: the user's home directory); a path with
  ``..`` in it, or one whose symlinks lead outside, is refused with the roots named;
- what was checked is what is used: when a step starts, its directory is opened again component by
  component without following any symlink (``pin``), checked against the roots, and the child starts
  in exactly that open directory; a directory swapped for a symlink after dispatch fails the step;
- secrets never reach the store, a log, a tool result or an error message: the values of the
  server's credential variables (stripped of surrounding whitespace, and in their JSON-escaped,
  percent-encoded and base64 forms) and common key shapes are replaced by ``[REDACTED]``.
"""

from __future__ import annotations

import base64
import errno
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from .errors import InvalidRequestError, shown

REDACTED = "[REDACTED]"
# Variables whose values are credentials, by name.
SECRET_NAME = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|AUTH|COOKIE)", re.I)
# Shorter values are too likely to be ordinary words to replace everywhere.
MIN_SECRET_CHARS = 8
# Characters of text a scrub remembers as clean, so a run's outputs (up to a MiB each, saved again at
# every later state change) are scanned once; past this it forgets and starts over (bounded memory).
CLEAN_MEMORY_CHARS = 8 << 20
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


# JSON escapes these with a backslash ('/' only optionally: PHP and some encoders do); JSON inside
# a JSON string (a CLI event quoting a command's JSON output) doubles the backslashes, so any number
# of them is accepted.
_JSON_ESCAPED = frozenset('"\\/')


def _char_forms(char: str) -> str:
    """A regex for one character of a secret as it may appear in text: itself, JSON-escaped
    (``\\"``, ``\\/``, ``\\u20ac``, at any depth), or percent-encoded (either case of hex, ``+``
    for a space)."""
    if char.isascii() and char.isalnum():
        return re.escape(char)
    forms = [r"\\*" + re.escape(char) if char in _JSON_ESCAPED else re.escape(char)]
    if len(char.encode("utf-16-be")) == 2:
        forms.append(rf"\\+u(?i:{ord(char):04x})")
    forms.append("".join(f"%(?i:{b:02x})" for b in char.encode("utf-8")))
    if char == " ":
        forms.append(r"\+")
    return "(?:" + "|".join(forms) + ")"


def _base64_cores(value: str) -> set[str]:
    """The part of the base64 of ``value`` that does not depend on what surrounds it, for each of
    the three alignments it can have in an encoded blob (``user:KEY`` in a Basic auth header)."""
    raw = value.encode("utf-8")
    cores = set()
    for offset in range(3):
        encoded = base64.b64encode(b"\0" * offset + raw)
        first = -(-offset // 3) * 4  # the first 4-char group made of the value's bytes only
        last = (offset + len(raw)) // 3 * 4  # the end of the last such group
        core = encoded[first:last].decode("ascii")
        if len(core) >= MIN_SECRET_CHARS:
            cores.update({core, core.replace("+", "-").replace("/", "_")})
    return cores


# Values of these exact types hold no string the redactor would have to look at.
_TEXTLESS = frozenset({type(None), bool, int, float, datetime})


class Redactor:
    """Replaces credentials in text by ``[REDACTED]``.

    A known value is matched however it was set (surrounding whitespace, as keys read from files
    often carry a trailing newline, is stripped) and however it appears: raw, JSON-escaped,
    percent-encoded in a URL, or inside base64."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        values = {s.strip() for s in secrets}
        values = {v for v in values if len(v) >= MIN_SECRET_CHARS}
        forms = {"".join(_char_forms(c) for c in v) for v in values}
        forms |= {re.escape(core) for v in values for core in _base64_cores(v)}
        ordered = sorted(forms, key=len, reverse=True)  # longest first: a key that contains another
        self._known = re.compile("|".join(ordered)) if ordered else None
        self._clean: set[str] = set()
        self._clean_chars = 0

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

    def finds(self, text: str) -> bool:
        """Does ``text`` hold a credential?"""
        return self(text) != text

    def scrub(self, model: BaseModel) -> None:
        """Redact, in place, every string a model holds (nested models, lists and dicts included):
        the one pass every record goes through before the store or a caller sees it, so a field
        added later cannot be forgotten."""
        for name in type(model).model_fields:
            value = getattr(model, name)
            if type(value) in _TEXTLESS:
                continue  # most fields of a run: no string inside, nothing to walk
            cleaned = self._scrubbed(value)
            if cleaned is not value:
                setattr(model, name, cleaned)

    def _scrubbed(self, value: Any) -> Any:
        if isinstance(value, str):
            if value in self._clean:  # a run is saved at every step; its earlier outputs were read once
                return value
            cleaned = self(value)
            if self._clean_chars + len(cleaned) > CLEAN_MEMORY_CHARS:
                self._clean.clear()
                self._clean_chars = 0
            self._clean.add(cleaned)
            self._clean_chars += len(cleaned)
            return value if cleaned == value else cleaned
        if isinstance(value, BaseModel):
            self.scrub(value)
            return value
        if isinstance(value, list):
            items = [self._scrubbed(v) for v in value]
            return value if all(a is b for a, b in zip(items, value, strict=True)) else items
        if isinstance(value, dict):
            pairs = {self._scrubbed(k): self._scrubbed(v) for k, v in value.items()}
            unchanged = all(a is b for a, b in zip(pairs, value, strict=True)) and all(
                pairs[k] is value[k] for k in value
            )
            return value if unchanged else pairs
        return value


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
    allowed = _roots_text(roots)
    if any(ord(c) < 32 or c == "\x7f" for c in directory):
        # The OS cannot take such a path at all (NUL ends a C string); say so instead of failing deep inside.
        raise InvalidRequestError(
            f"{field} must not contain NUL or other control characters; send the absolute path of an "
            f"existing directory inside the workspace roots: {allowed}"
        )
    path = Path(directory)
    if not path.is_absolute():
        raise InvalidRequestError(f"{field} must be an absolute path, got {shown(directory)}")
    if ".." in path.parts:
        raise InvalidRequestError(f"{field} must not contain '..' components, got {shown(directory)}")
    try:
        real = path.resolve(strict=True)
    except (OSError, RuntimeError, ValueError):
        raise InvalidRequestError(f"{field} {shown(directory)} is not an existing directory") from None
    if not real.is_dir():
        raise InvalidRequestError(f"{field} {shown(directory)} is not an existing directory")
    if _inside(real, roots):
        return real
    via = f" (it resolves to {real})" if str(real) != str(path) else ""
    raise InvalidRequestError(
        f"{field} {shown(directory)}{via} is outside the workspace roots: {allowed}. "
        "The operator can widen them with MCP_COLLAB_WORKSPACE_ROOTS."
    )


# A child is started in the directory we hold open through this link (Linux): CPython's subprocess
# chdir()s in the child after fork and before it closes descriptors or execs (Modules/
# _posixsubprocess.c, child_exec), so the child lands in the open directory itself whatever became
# of its path, and the descriptor (O_CLOEXEC, not in pass_fds) never reaches the CLI. os.fchdir is
# no alternative: it moves the whole server, with every concurrent run and thread, at once.
_FD_LINKS = Path("/proc/self/fd")
# Whether the kernel names what a descriptor holds (Linux /proc): looked at once, not per step.
_FD_NAMES = _FD_LINKS.is_dir()
_OPEN_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class PinnedDirectory:
    """A step's directory, opened and checked when the step starts, held open until it ends."""

    path: Path  # the real path, as checked
    fd: int

    @property
    def cwd(self) -> Path:
        """What to start a child (a CLI, git) in: exactly the open directory."""
        return _FD_LINKS / str(self.fd) if _FD_NAMES else self.path

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> PinnedDirectory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def pin(directory: Path, roots: Sequence[Path], field: str = "workingDirectory") -> PinnedDirectory:
    """Open ``directory`` (a real path that ``confine`` accepted earlier) one component at a time
    from ``/`` without following any symlink, and check it still lies inside a workspace root.

    Between dispatch and the step (a queued run, a second step) any component may have been
    replaced by a symlink; following it would run the worker wherever it points. Such a change
    is a refusal naming the directory and what changed; the step never runs elsewhere."""
    if not directory.is_absolute() or ".." in directory.parts:
        raise InvalidRequestError(f"{field} {directory} is not an absolute real path; it cannot be pinned")
    fd = os.open("/", _OPEN_DIRECTORY)
    try:
        walked = Path("/")
        for part in directory.parts[1:]:
            try:
                child = os.open(part, _OPEN_DIRECTORY, dir_fd=fd)
            except OSError as exc:
                raise _changed(directory, walked / part, part, fd, exc, roots, field) from None
            os.close(fd)
            fd = child
            walked /= part
        # The kernel's name for what we hold: a component renamed during the walk shows here.
        held = Path(os.readlink(f"{_FD_LINKS}/{fd}")) if _FD_NAMES else directory
        if held != directory:
            raise InvalidRequestError(
                f"{field} {directory} changed since the run was dispatched: it was moved to {held} while "
                "the step was starting; the step was not started"
            )
        # Under a root by its very path, every component of which the walk just opened as a real
        # directory: inside it, with no root to resolve. Else the roots are resolved now (a root
        # that is a symlink may have been pointed elsewhere since the dispatch).
        if not any(directory.is_relative_to(root) for root in roots if _plain(root)) and not _inside(directory, roots):
            raise InvalidRequestError(
                f"{field} {directory} now leaves the workspace roots: {_roots_text(roots)}; "
                "a workspace root changed since the run was dispatched, and the step was not started"
            )
    except BaseException:
        os.close(fd)
        raise
    return PinnedDirectory(directory, fd)


def _changed(
    directory: Path, at: Path, part: str, parent_fd: int, exc: OSError, roots: Sequence[Path], field: str
) -> InvalidRequestError:
    """The refusal for a component that cannot be opened as a plain directory any more."""
    prefix = f"{field} {directory} changed since the run was dispatched:"
    tail = "; the step was not started"
    try:
        target: str | None = os.readlink(part, dir_fd=parent_fd)
    except OSError:
        target = None
    if target is not None:
        leads = (at.parent / target).resolve()
        where = (
            f"which leaves the workspace roots ({_roots_text(roots)})"
            if not _inside(leads, roots)
            else "(a link is never followed once the directory was checked)"
        )
        return InvalidRequestError(f"{prefix} {at} is now a symbolic link to {target} {where}{tail}")
    if exc.errno == errno.ENOENT:
        return InvalidRequestError(f"{prefix} {at} no longer exists{tail}")
    if exc.errno == errno.ENOTDIR:
        return InvalidRequestError(f"{prefix} {at} is no longer a directory{tail}")
    return InvalidRequestError(f"{prefix} {at} cannot be opened ({exc.strerror}){tail}")


def _plain(root: Path) -> bool:
    """An absolute path without ``..``: one that names a directory by its components alone."""
    return root.is_absolute() and ".." not in root.parts


def _roots_text(roots: Sequence[Path]) -> str:
    return ", ".join(str(r) for r in roots) or "(none configured)"


def _inside(real: Path, roots: Sequence[Path]) -> bool:
    for root in roots:
        try:
            real_root = root.resolve(strict=True)
        except (OSError, RuntimeError):
            continue
        if real == real_root or real.is_relative_to(real_root):
            return True
    return False
