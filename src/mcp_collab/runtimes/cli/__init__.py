"""The ``cli`` runtime: the vendor's own CLI as a supervised subprocess."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import anyio

from ...config import Settings
from ...errors import RuntimeFatal, RuntimeTransient, RuntimeUnavailable
from ...models import RuntimeMode
from ..base import RuntimeResult, StepRequest, structured_from_text
from .supervisor import SPOOL_AFTER_BYTES, ProcessOutcome, ProcessSpec, run_process
from .vendors import VENDORS, EndpointPlan, Parsed, Vendor

__all__ = ["CLIRuntime", "find_binary", "prepare_endpoint"]

_TAIL_CHARS = 600
# Where the schema files handed to a CLI live, under the state dir: named by their content, so steps
# share them and the set stays as small as the set of judging roles and their labels.
SCHEMA_DIR = "output-schemas"
# How far up from the binary's real path a CLI's package.json is looked for (npm puts the entry
# point one or two directories below it: bin/codex.js, bundle/gemini.js).
PACKAGE_SEARCH_DEPTH = 4


def cli_version(binary: str, vendor: Vendor) -> str | None:
    """The CLI's version, from the package.json of the npm package it belongs to: read, not asked
    (running a binary to ask costs a process per step, and an unknown one may not answer), and
    remembered per binary and the file it leads to (its inode and modification time: one ``stat``
    per step), so an upgrade is seen."""
    try:
        target = os.stat(binary)
    except OSError:
        return None
    return _package_version(binary, (target.st_dev, target.st_ino, target.st_mtime_ns), vendor.package)


@functools.lru_cache(maxsize=64)
def _package_version(binary: str, target: tuple[int, int, int], package: str) -> str | None:
    del target  # part of the cache key only
    try:
        real = os.path.realpath(binary)
    except OSError:
        return None
    directory = Path(real).parent
    for _ in range(PACKAGE_SEARCH_DEPTH):
        try:
            data = json.loads((directory / "package.json").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            data = None
        if isinstance(data, dict) and data.get("name") == package and isinstance(data.get("version"), str):
            return f"{package} {data['version'][:40]}"
        directory = directory.parent
    return None


def find_binary(settings: Settings, vendor: Vendor) -> str | None:
    """The configured binary (MCP_COLLAB_<VENDOR>_BIN), else the one on PATH."""
    configured = settings.cli_bins.get(vendor.name)
    if configured:
        return configured if os.access(configured, os.X_OK) else None
    return shutil.which(vendor.name, path=settings.environ.get("PATH"))


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` owner-only and atomically (steps running at once may write the same
    file: each reader sees a whole one); unchanged content is not rewritten."""
    try:
        if path.read_text(encoding="utf-8") == text:
            return
    except (FileNotFoundError, UnicodeDecodeError):
        pass
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mkstemp: mode 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def prepare_endpoint(settings: Settings, vendor: Vendor) -> EndpointPlan:
    """What the vendor's CLI needs to call the endpoint the user set, in place (its files written);
    a CLI that cannot call it fails here, as unavailable, before anything runs."""
    plan = vendor.endpoint(settings)
    if plan.problem:
        raise RuntimeUnavailable(plan.problem, code="endpoint_unsupported")
    for path, text in plan.files:
        try:
            write_private(path, text)
        except OSError as exc:
            raise RuntimeUnavailable(
                f"cannot write {path.name} for the {vendor.name} CLI under the state dir ({exc.strerror or exc}); "
                "make MCP_COLLAB_STATE_DIR writable",
                code="cli_home",
            ) from exc
    return plan


def compose_prompt(request: StepRequest) -> str:
    # The CLIs take no separate system prompt in headless mode; standing instructions lead.
    if request.instructions:
        return f"{request.instructions}\n\n---\n\n{request.prompt}"
    return request.prompt


class CLIRuntime:
    mode: RuntimeMode = "cli"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def aclose(self) -> None:
        """Nothing held between steps: each step's process tree is reaped when the step ends."""
        return None

    async def run(self, request: StepRequest) -> RuntimeResult:
        vendor = VENDORS[request.worker.model]
        binary = find_binary(self.settings, vendor)
        if binary is None:
            where = self.settings.cli_bins.get(vendor.name) or "PATH"
            raise RuntimeUnavailable(
                f"the {vendor.name} CLI was not found on {where}; install it with `npm install -g {vendor.package}` "
                f"or set MCP_COLLAB_{vendor.name.upper()}_BIN",
                code="missing_binary",
            )
        plan = prepare_endpoint(self.settings, vendor)
        if request.output_schema is not None and vendor.schema_option is not None:
            plan = dataclasses.replace(plan, argv=(*plan.argv, *self._schema_argv(vendor, request.output_schema)))
        model = request.worker.cli_model
        resume = request.resume
        resume_argv = (
            vendor.resume_argv(binary, request, model, plan.argv, resume.session_id) if resume is not None else None
        )
        if resume is not None and resume_argv is not None:
            resumed = await self._attempt(vendor, binary, plan, request, resume_argv, resume.message, resuming=True)
            if resumed is not None:
                return dataclasses.replace(resumed, cli_version=cli_version(binary, vendor))
            request.on_progress(
                f"{request.worker.name}: {vendor.name} could not resume session {resume.session_id}; "
                "continuing from the recorded history"
            )
        result = await self._attempt(
            vendor, binary, plan, request, vendor.argv(binary, request, model, plan.argv), compose_prompt(request)
        )
        assert result is not None
        return dataclasses.replace(result, cli_version=cli_version(binary, vendor))

    def _schema_argv(self, vendor: Vendor, schema: dict[str, Any]) -> tuple[str, ...]:
        """The CLI's option that shapes its final answer by ``schema`` (a file for codex)."""
        assert vendor.schema_option is not None
        option, how = vendor.schema_option
        text = json.dumps(schema, ensure_ascii=False, sort_keys=True)
        if how == "text":
            return option, text
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]
        path = self.settings.state_dir / SCHEMA_DIR / f"{digest}.json"
        try:
            write_private(path, text)
        except OSError as exc:
            raise RuntimeUnavailable(
                f"cannot write the output schema for the {vendor.name} CLI under the state dir "
                f"({exc.strerror or exc}); make MCP_COLLAB_STATE_DIR writable",
                code="cli_home",
            ) from exc
        return option, str(path)

    async def _attempt(
        self,
        vendor: Vendor,
        binary: str,
        plan: EndpointPlan,
        request: StepRequest,
        argv: list[str],
        prompt: str,
        *,
        resuming: bool = False,
    ) -> RuntimeResult | None:
        """One run of the CLI. Resuming, a failure before the CLI did anything (no event of its
        work: the session is gone, or was made elsewhere) is None, so the caller starts afresh."""
        parser = vendor.parser(self.settings.max_answer_bytes)

        giving_up = anyio.CancelScope()

        def on_line(line: str) -> None:
            message = parser.feed(line)
            parsed = parser.parsed
            request.partial.text = parsed.text or "\n\n".join(parsed.messages)
            if message:
                request.on_progress(f"{request.worker.name}: {message}")
            if parsed.unreachable is not None:
                giving_up.cancel()  # the process tree is killed on the way out, as on any cancel

        spec = ProcessSpec(
            argv=argv,
            env={**self.settings.child_env(vendor.env_prefixes), **plan.env},
            cwd=request.child_cwd or request.working_directory,
            stdin=prompt.encode("utf-8"),  # a resumed session already has the standing instructions
            timeout_s=request.timeout_s,
            idle_timeout_s=request.idle_timeout_s,
            capture_bytes=self.settings.capture_bytes,
            max_line_bytes=self.settings.max_answer_bytes,
        )
        via = f" (calling {plan.url}, from {plan.source})" if plan.custom else ""
        request.on_progress(f"{request.worker.name}: starting {vendor.name}{via}")
        try:
            with giving_up:
                outcome = await run_process(spec, on_line=on_line, on_start=request.on_spawn)
        except OSError as exc:
            raise RuntimeUnavailable(
                f"cannot start the {vendor.name} CLI ({binary}): {exc}", code="spawn_failed"
            ) from exc
        finally:
            # Also when cancelled: the partial output a cancel keeps is all that was read.
            parser.close()
            request.partial.text = parser.parsed.text or "\n\n".join(parser.parsed.messages)
        if giving_up.cancelled_caught:
            raise RuntimeTransient(
                f"the {vendor.name} CLI cannot reach {plan.url} ({plan.source}) and would keep retrying: "
                f"{parser.parsed.unreachable}; its whole process group was killed. Check that the endpoint "
                "is up (`mcp-collab doctor` tries it)",
                code="unreachable",
                output=request.partial.text,
            )
        if resuming and outcome.exit_code != 0 and not parser.parsed.finished and not parser.parsed.messages:
            return None
        result = self._result(vendor, request, outcome, parser.parsed)
        return dataclasses.replace(result, resumed=True) if resuming else result

    def _result(self, vendor: Vendor, request: StepRequest, outcome: ProcessOutcome, parsed: Parsed) -> RuntimeResult:
        partial = parsed.text or "\n\n".join(parsed.messages) or outcome.stdout
        if outcome.limit_hit == "timeout":
            raise RuntimeFatal(
                f"the {vendor.name} CLI hit the step's wall-clock limit of {request.timeout_s:g}s "
                "(timeoutSeconds / MCP_COLLAB_STEP_TIMEOUT); its whole process group was killed",
                code="timeout",
                exit_code=outcome.exit_code,
                output=partial,
            )
        if outcome.limit_hit == "idle":
            raise RuntimeFatal(
                f"the {vendor.name} CLI printed nothing for {request.idle_timeout_s:g}s (idle watchdog, "
                "MCP_COLLAB_IDLE_TIMEOUT); its whole process group was killed",
                code="idle_timeout",
                exit_code=outcome.exit_code,
                output=partial,
            )
        if outcome.exit_code != 0 or parsed.error:
            detail = parsed.error or _tail(outcome.stderr) or _tail(outcome.stdout) or "no output"
            raise RuntimeFatal(
                f"the {vendor.name} CLI failed (exit code {outcome.exit_code}): {detail}",
                code="exit_code" if outcome.exit_code != 0 else "cli_error",
                exit_code=outcome.exit_code,
                output=partial,
            )
        self._check_size(vendor, outcome, parsed, partial)
        if not parsed.finished:
            raise RuntimeFatal(
                f"the {vendor.name} CLI exited 0 but printed no final event this version of mcp-collab "
                f"recognizes ({parsed.events} JSON events read); its output shape may have changed: "
                f"{_tail(outcome.stdout) or 'empty stdout'}",
                code="unknown_output",
                exit_code=outcome.exit_code,
                output=outcome.stdout,
            )
        # The answer is whole: every line reached the parser. Only the raw stream kept for a failure
        # (stdout's head and tail) is bounded, and a completed step does not store it.
        structured, why = parsed.structured, None
        if request.output_schema is not None and vendor.schema_option is not None and structured is None:
            structured, why = structured_from_text(parsed.text, f"the {vendor.name} CLI's final message")
        return RuntimeResult(
            text=parsed.text,
            usage=parsed.usage,
            session_id=parsed.session_id,
            exit_code=outcome.exit_code,
            duration_ms=outcome.duration_ms,
            structured=structured,
            structured_error=why,
            # codex does not say which model it used: the one asked for, when one was.
            model=parsed.model or request.worker.cli_model,
            cost_usd=parsed.cost_usd,
        )

    def _check_size(self, vendor: Vendor, outcome: ProcessOutcome, parsed: Parsed, partial: str) -> None:
        """A stream the parser did not read whole cannot be trusted to hold the answer: fail, and say
        which cap (and which variable) it hit, rather than complete with an answer missing or cut."""
        cap = self.settings.max_answer_bytes
        raise_it = "; raise MCP_COLLAB_MAX_ANSWER_BYTES to keep it"
        if outcome.spool_error is not None:
            message = (
                f"the {vendor.name} CLI printed a line of {outcome.longest_dropped_line} bytes that could not be "
                f"kept ({outcome.spool_error}); the answer may have been in it. Lines over "
                f"{SPOOL_AFTER_BYTES} bytes are held in a temporary file in TMPDIR: point TMPDIR at a "
                "writable directory with room"
            )
        elif outcome.dropped_lines:
            message = (
                f"the {vendor.name} CLI printed a line of {outcome.longest_dropped_line} bytes, over the "
                f"{cap}-byte cap on one line of its output (MCP_COLLAB_MAX_ANSWER_BYTES); the answer may have "
                f"been in it, so it was not read{raise_it}"
            )
        elif parsed.oversize_answer:
            message = (
                f"the {vendor.name} CLI streamed an answer of at least {parsed.oversize_answer} bytes, over the "
                f"{cap}-byte cap on an answer (MCP_COLLAB_MAX_ANSWER_BYTES){raise_it}"
            )
        else:
            return
        raise RuntimeFatal(message, code="output_too_large", exit_code=outcome.exit_code, output=partial)


def _tail(text: str) -> str:
    text = text.strip()
    return text if len(text) <= _TAIL_CHARS else "…" + text[-_TAIL_CHARS:]
