"""The ``mcp-collab`` command: serve, doctor, runs, dispatch, workers.

Only ``serve`` speaks MCP; the other commands drive the same orchestrator and store directly,
with the same semantics as the tools. Under ``serve`` nothing but JSON-RPC reaches stdout.

Everything shown to a person goes through ``terminal_safe``: workers' output, tasks, errors and
CLI version strings are text from outside, and a terminal acts on control sequences instead of
showing them. It applies whether or not stdout is a terminal, because piped output usually ends up
on one anyway (``| less -R``, ``| tee log`` then ``cat log``) and the user cannot tell the difference.
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import json
import logging
import os
import re
import signal
import sys
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, cast, get_args

import anyio
from pydantic import ValidationError

from . import __version__
from .config import Settings
from .errors import CollabError, InvalidRequestError, NoFittingWorkerError, UnknownRunError
from .models import (
    RUNTIME_MODES,
    WORKER_MODELS,
    DispatchRequest,
    Run,
    RunStatus,
    Usage,
    WorkerSpec,
    describe_validation_error,
    run_shape,
)
from .security import RedactingFilter, Redactor
from .strategies import PASSING_VERDICTS, STRATEGIES, dispatchable

if TYPE_CHECKING:
    from mcp.server.mcpserver import MCPServer

    from .orchestrator import WorkerOrchestrator

# Exit codes, so a script or CI job can tell the outcomes apart.
EXIT_OK = 0
EXIT_FAILED = 1  # the run failed, was cancelled elsewhere or interrupted; doctor: a required check failed
EXIT_REFUSED = 2  # nothing was done: the request, a setting or the store was refused
EXIT_VERDICT = 3  # the run completed, but its reviewer or red-teamer did not approve or pass it
EXIT_INTERNAL = 70  # a bug in mcp-collab (EX_SOFTWARE)
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)

EXIT_CODES_HELP = f"""exit codes:
  {EXIT_OK}    the run completed (and its verdict, if any, is approve or pass)
  {EXIT_FAILED}    the run failed, or was cancelled or interrupted elsewhere
  {EXIT_REFUSED}    refused before anything ran (unknown worker or strategy, invalid arguments, settings, store)
  {EXIT_VERDICT}    the run completed, but its verdict is request_changes, fail or unknown
  {EXIT_INTERNAL}   internal error in mcp-collab (run with --debug for the traceback)
  {EXIT_INTERRUPTED}  Ctrl-C: the run is recorded as cancelled"""

SERVE_ON_A_TERMINAL = (
    "mcp-collab serve: waiting for an MCP client on stdin (JSON-RPC); MCP clients such as Claude Desktop "
    "start this command themselves. Press Ctrl-C or Ctrl-D to stop."
)

# The core's messages name no surface; here a person at the terminal hears which command helps next.
COMMAND_HINTS: dict[type[CollabError], str] = {
    UnknownRunError: "`mcp-collab runs` lists the runs",
    NoFittingWorkerError: "register one with `mcp-collab workers add NAME --model MODEL`, or name one with --worker",
}

# What a terminal would act on instead of showing: C0 controls but newline and tab (ESC starts every
# CSI and OSC sequence: colours, screen clears, window titles, OSC 52 clipboard writes), DEL, C1
# controls (0x9b is a one-byte CSI), the bidi embeddings, overrides, isolates and marks that reorder
# what is shown ("Trojan Source"), and lone surrogates, which cannot even be encoded.
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
# JSON escapes C0 itself; these are the rest, escaped the JSON way so the document means the same.
_JSON_UNSAFE = re.compile("[\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
# An unexpected error is named in one line, never at length.
MAX_ERROR_LINE_CHARS = 300


def _visible(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"<U+{code:04X}>"


def terminal_safe(text: str) -> str:
    """``text`` with every control sequence and bidi control shown as a visible escape (``\\x1b``,
    ``<U+202E>``); newlines and tabs stay. Windows line ends become plain newlines first."""
    return _UNSAFE.sub(_visible, text.replace("\r\n", "\n"))


def json_safe(text: str) -> str:
    """A JSON document with C1 and bidi controls escaped (``\\u009b``): JSON leaves them raw."""
    return _JSON_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def _say(text: str = "") -> None:
    print(terminal_safe(text))


def _tell(text: str) -> None:
    """A line on stderr: progress, a refusal, a verdict."""
    print(terminal_safe(text), file=sys.stderr)


def _print_json(text: str) -> None:
    print(json_safe(text))


def _one_line(text: str) -> str:
    return " ".join(text.split("\n"))


class _Parser(argparse.ArgumentParser):
    """A usage mistake is one line on stderr (the usage block is a --help away), exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_REFUSED, _one_line(terminal_safe(f"{self.prog}: {message}; see `{self.prog} --help`")) + "\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mcp-collab", description="An MCP server that puts several AI coding agents to work together."
    )
    parser.add_argument("--version", action="version", version=f"mcp-collab {__version__}")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the MCP server (stdio by default)")
    serve.add_argument("--transport", choices=("stdio", "http"), default="stdio")
    serve.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8765, help="HTTP port (default 8765)")
    serve.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))

    doctor = sub.add_parser("doctor", help="check what can run here, with a hint for each failure")
    doctor.add_argument("--json", action="store_true", help="print the report as JSON")

    runs = sub.add_parser("runs", help="list recent runs, or `runs show ID`")
    runs.add_argument(
        "action", nargs="?", choices=("list", "show", "prune", "apply", "discard", "continue"), default="list"
    )
    runs.add_argument("run_id", nargs="?")
    runs.add_argument("message", nargs="?", help="continue: the follow-up (use - to read it from stdin)")
    runs.add_argument("--branch", help="apply: the label of the branch to apply (best_of_n; default: the judge's)")
    runs.add_argument("--status", choices=get_args(RunStatus))
    runs.add_argument("--strategy", help=f"one of: {', '.join(STRATEGIES)}")
    runs.add_argument("--worker", help="runs in which this worker took a step (removed workers' too)")
    runs.add_argument("--limit", type=int, default=20)
    runs.add_argument("--json", action="store_true")
    limits = runs.add_mutually_exclusive_group()
    limits.add_argument(
        "--max-runs", type=_limit(int), help="prune: keep the newest N finished runs; 0: no limit (default: settings)"
    )
    runs.add_argument(
        "--max-age-days", type=_limit(float), help="prune: drop finished runs older than D days; 0: no limit"
    )
    limits.add_argument(
        "--all", action="store_true", help="prune: forget every finished run (queued and running runs stay)"
    )

    dispatch = sub.add_parser(
        "dispatch",
        help="run a task from the terminal with live progress",
        description="Run a task with live progress on stderr and the finished run on stdout. Ctrl-C cancels it.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    dispatch.add_argument("task", help="the task text (use - to read it from stdin)")
    dispatch.add_argument("--strategy", default="single_worker", choices=tuple(dispatchable()))
    dispatch.add_argument("--worker", action="append", dest="workers", help="worker name, in role order")
    dispatch.add_argument("--runtime-mode", choices=RUNTIME_MODES)
    dispatch.add_argument("--fallback-policy", choices=("on_error", "never"))
    dispatch.add_argument("--working-directory")
    dispatch.add_argument("--max-rounds", type=int, help="review_loop: most write-and-review rounds (default 3)")
    dispatch.add_argument(
        "--max-cost-usd",
        type=float,
        help="budget in US dollars: no step starts once the run cost that much (default: MCP_COLLAB_MAX_COST_USD)",
    )
    dispatch.add_argument("--json", action="store_true", help="print the finished run as JSON")

    workers = sub.add_parser("workers", help="list, add or remove worker profiles")
    workers.add_argument("action", nargs="?", choices=("list", "add", "remove"), default="list")
    workers.add_argument("name", nargs="?")
    workers.add_argument("--model", choices=WORKER_MODELS)
    workers.add_argument("--runtime-mode", choices=RUNTIME_MODES)
    workers.add_argument("--fallback-policy", choices=("on_error", "never"))
    workers.add_argument("--instructions", default="")
    workers.add_argument("--sdk-model")
    workers.add_argument("--cli-model")
    workers.add_argument("--timeout-seconds", type=float)
    workers.add_argument("--working-directory")
    worker = sub.add_parser(
        "worker",
        help="run steps of runs on Temporal (MCP_COLLAB_ENGINE=temporal) on this machine",
        description="Serve the runs' workflows and this machine's own step queue. A dispatch whose working "
        "directory lies in this worker's roots is sent to its queue. Runs until SIGTERM or Ctrl-C.",
    )
    worker.add_argument(
        "--queue", required=True, help="this worker's step queue (workers sharing one need the same roots)"
    )
    worker.add_argument(
        "--root",
        action="append",
        dest="roots",
        help="a workspace root it serves (repeat; default MCP_COLLAB_WORKSPACE_ROOTS)",
    )
    worker.add_argument(
        "--slots", type=int, help="steps at once (default: MCP_COLLAB_MAX_CONCURRENT_RUNS, from the machine)"
    )
    worker.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    for command in (serve, doctor, runs, dispatch, workers, worker):
        # Also after the command name; SUPPRESS keeps an absent one from undoing `mcp-collab --debug CMD`.
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def _limit(kind: type[int] | type[float]) -> Any:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number; accepted: 0 (no limit) or more") from None
        if value < 0:
            raise argparse.ArgumentTypeError(f"{text!r} is negative; accepted: 0 (no limit) or more")
        return value

    return parse


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        if args.command == "serve":
            return _serve(args)
        settings = Settings.from_env()
        handler = {"doctor": _doctor, "runs": _runs, "dispatch": _dispatch, "workers": _workers, "worker": _worker}[
            args.command
        ]
        return anyio.run(handler, settings, args)
    except (Exception, KeyboardInterrupt, BaseExceptionGroup) as exc:  # the top-level handler
        return _failed(exc, debug=args.debug)


def _failed(exc: BaseException, *, debug: bool) -> int:
    """One line on stderr and an exit code for whatever ended the command.

    A task group (the orchestrator's, anyio's) wraps the error that ended it in an exception group;
    the error inside is what the user needs to hear."""
    leaves = [e for e in _leaves(exc) if not isinstance(e, asyncio.CancelledError)]
    if any(isinstance(e, KeyboardInterrupt) for e in leaves):
        return EXIT_INTERRUPTED
    if debug:
        traceback.print_exception(exc)
    error = leaves[0] if len(leaves) == 1 else exc
    if isinstance(error, CollabError):
        hint = next((h for cls, h in COMMAND_HINTS.items() if isinstance(error, cls)), None)
        _tell(_one_line(f"mcp-collab: {error}" + (f"; {hint}" if hint else "")))
        return EXIT_REFUSED
    if isinstance(error, ValidationError):
        _tell(_one_line(f"mcp-collab: {describe_validation_error(error)}"))
        return EXIT_REFUSED
    # A bug: name it in one line (its message may quote the environment, so it is redacted).
    detail = Redactor.from_environ(os.environ)(str(error)).strip().splitlines()
    named = type(error).__name__ + (f": {detail[0][:MAX_ERROR_LINE_CHARS]}" if detail else "")
    _tell(f"mcp-collab: internal error ({named})" + ("" if debug else "; run with --debug for the traceback"))
    return EXIT_INTERNAL


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


def _serve(args: argparse.Namespace) -> int:
    logging.basicConfig(
        stream=sys.stderr, level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings = Settings.from_env()
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactingFilter(settings.redact))  # no secret reaches the log
    from .server import build_server
    from .store import open_store

    # Opened before any client connects: a broken store is one clear line and exit 1.
    store = open_store(settings)
    store.check_writable()
    server = build_server(settings, store=store)
    if args.transport == "stdio":
        if sys.stdin.isatty():
            print(SERVE_ON_A_TERMINAL, file=sys.stderr)  # someone typed it: say it is not hung
            anyio.run(_serve_terminal, server)
        else:
            server.run("stdio")
        return 0
    import uvicorn

    from .http import build_http_app

    allowed = [h for h in os.environ.get("MCP_COLLAB_HTTP_ALLOWED_HOSTS", "").replace(",", " ").split() if h]
    app = build_http_app(
        server, host=args.host, port=args.port, token=os.environ.get("MCP_COLLAB_HTTP_TOKEN") or None,
        allowed_hosts=allowed, max_sessions=settings.http_max_sessions,
        session_idle_s=settings.http_session_idle_s,
    )  # fmt: skip
    # log_config=None: uvicorn's access log joins ours on stderr instead of printing to stdout.
    # app.bind.host: the address as the socket layer takes it ("[::1]" and "localhost." would not bind).
    config = uvicorn.Config(app, host=app.bind.host, port=args.port, log_config=None, log_level=args.log_level.lower())
    uvicorn.Server(config).run()
    return 0


def _real_roots(given: list[str]) -> tuple[Path, ...]:
    from .security import confine

    return tuple(confine(r, [Path(os.path.realpath(r))], field="--root") for r in given)


async def _worker(settings: Settings, args: argparse.Namespace) -> int:
    """Serve steps for runs on Temporal until SIGTERM or Ctrl-C (running steps are then cancelled
    and their process trees killed; their runs end with the step interrupted)."""
    import dataclasses

    from .engine.temporal.worker import serve_worker

    logging.basicConfig(
        stream=sys.stderr, level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactingFilter(settings.redact))
    if args.roots:
        # Each root must exist here: a worker announces real paths, the server routes by them.
        roots = await anyio.to_thread.run_sync(_real_roots, args.roots)
        settings = dataclasses.replace(settings, workspace_roots=roots)
    if args.slots is not None and args.slots < 1:
        raise InvalidRequestError(f"--slots must be 1 or more, got {args.slots}")
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:

        async def on_signals() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    stop.set()
                    return

        tg.start_soon(on_signals)
        await serve_worker(settings, args.queue, args.slots or settings.max_concurrent_runs, stop=stop)
        tg.cancel_scope.cancel()
    return EXIT_OK


def _cell(value: object) -> str:
    return terminal_safe(str(value)).replace("\n", " ").replace("\t", " ")


# One read from a terminal: a typed line is far shorter.
TERMINAL_READ_BYTES = 65_536


async def _terminal_lines(fd: int) -> AsyncIterator[str]:
    """Lines typed on a terminal, waited for in the event loop. The SDK reads stdin in a worker
    thread that nothing can interrupt, so Ctrl-C would wait for the next Enter before exiting."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pending = ""
    while True:
        await anyio.wait_readable(fd)
        chunk = os.read(fd, TERMINAL_READ_BYTES)
        pending += decoder.decode(chunk, final=not chunk)
        *lines, pending = pending.split("\n")
        for line in lines:
            yield line + "\n"
        if not chunk:  # Ctrl-D
            if pending:
                yield pending
            return


async def _serve_terminal(server: MCPServer[Any]) -> None:
    from mcp.server.stdio import stdio_server

    async with stdio_server(stdin=cast(anyio.AsyncFile[str], _terminal_lines(sys.stdin.fileno()))) as (read, write):
        # MCPServer.run_stdio_async, with a stdin that Ctrl-C can interrupt.
        lowlevel = server._lowlevel_server
        await lowlevel.run(read, write, lowlevel.create_initialization_options())


def _table(rows: list[list[str]], headers: list[str]) -> str:
    rows = [[_cell(c) for c in row] for row in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=False)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def _mark(ok: bool, required: bool) -> str:
    return "ok" if ok else ("FAIL" if required else "warn")


async def _doctor(settings: Settings, args: argparse.Namespace) -> int:
    from . import readiness

    report = await readiness.check(settings)
    if args.json:
        _print_json(report.model_dump_json(by_alias=True, indent=2))
        return EXIT_OK if report.ok else EXIT_FAILED
    rows = [[_mark(c.ok, c.required), c.name, c.detail, c.hint or ""] for c in report.checks]
    _say(_table(rows, ["", "check", "detail", "how to fix"]))
    _say()
    _say(f"default runtime: {report.default_runtime}   fallback policy: {report.fallback_policy}")
    for r in report.runtimes:
        _say(f"  {'ready' if r.ready else 'not ready':9}  {r.mode:10}  {r.worker_model:10}  {_cell(r.reason)}")
    return EXIT_OK if report.ok else EXIT_FAILED


def _step_summary(run: Run) -> str:
    return run_shape(run.steps)


async def _runs(settings: Settings, args: argparse.Namespace) -> int:
    from .orchestrator import WorkerOrchestrator  # the engine: not paid by `serve` before its first answer

    orchestrator = WorkerOrchestrator(settings, runtimes={})
    prune_options = [o for o, v in (("--max-runs", args.max_runs), ("--max-age-days", args.max_age_days),
                                     ("--all", args.all or None)) if v is not None]  # fmt: skip
    if prune_options and args.action != "prune":
        _tell(f"mcp-collab: {', '.join(prune_options)} only apply to `mcp-collab runs prune`")
        return EXIT_REFUSED
    if args.action == "prune":
        pruned = await orchestrator.prune(max_runs=args.max_runs, max_age_days=args.max_age_days, everything=args.all)
        _say(
            f"pruned {len(pruned)} runs"
            + (f": {', '.join(pruned[:10])}" + (" ..." if len(pruned) > 10 else "") if pruned else "")
        )
        return EXIT_OK
    if args.action == "continue":
        if not args.run_id or not args.message:
            _tell('mcp-collab: runs continue needs a run id and a message: runs continue RUN "what next"')
            return EXIT_REFUSED
        message = sys.stdin.read() if args.message == "-" else args.message
        return await _follow(
            settings,
            args,
            lambda orchestrator, progress: orchestrator.continue_run(
                args.run_id, message, args.worker, on_progress=progress
            ),
        )
    if args.action in ("apply", "discard"):
        if not args.run_id:
            _tell(f"mcp-collab: runs {args.action} needs a run id; `mcp-collab runs` lists the runs")
            return EXIT_REFUSED
        if args.action == "apply":
            done = await orchestrator.apply(args.run_id, args.branch)
        else:
            done = await orchestrator.discard(args.run_id)
        if args.json:
            _print_json(json.dumps({"applied": done.applied, "files": list(done.files), "message": done.message}))
        elif done.applied or args.action == "discard":
            _say(done.message)
        else:
            _tell(f"mcp-collab: {done.message}")
        return EXIT_OK if done.applied or args.action == "discard" else EXIT_REFUSED
    if args.action == "show":
        if not args.run_id:
            _tell("mcp-collab: runs show needs a run id; `mcp-collab runs` lists the runs")
            return EXIT_REFUSED
        run = await orchestrator.get_run(args.run_id)
        if args.json:
            _print_json(run.model_dump_json(by_alias=True, indent=2))
        else:
            _print_run(run)
        return EXIT_OK
    page = await orchestrator.list_runs(
        status=args.status, strategy=args.strategy, worker=args.worker, limit=args.limit
    )
    if args.json:
        _print_json(page.model_dump_json(by_alias=True, indent=2))
        return EXIT_OK
    if not page.runs:
        filtered = args.status or args.strategy or args.worker
        _say("no runs match these filters" if filtered else "no runs yet")
        return EXIT_OK
    rows = [
        [
            r.id,
            r.created_at.strftime("%Y-%m-%d %H:%M:%S"),
            r.strategy,
            r.status,
            r.verdict or "",
            _duration(r.duration_ms),
            _dollars(r.cost_usd),
            _step_summary(r),
        ]
        for r in page.runs
    ]
    _say(_table(rows, ["run", "created (UTC)", "strategy", "status", "verdict", "took", "cost", "steps"]))
    totals = page.totals
    if totals is not None and (totals.cost_usd or totals.usage.input_tokens is not None):
        whose = f"{args.worker}'s steps in " if args.worker else ""
        unknown = f"{totals.uncosted_steps} steps without a price" if totals.uncosted_steps else ""
        cost = _dollars(totals.cost_usd) + (f" (+{unknown})" if unknown else "")
        if not totals.cost_usd and unknown:
            cost = f"cost unknown ({unknown})"
        _say(f"\ntotal of {whose}{totals.runs} matching runs: {cost}, {_tokens(totals.usage)}")
    return EXIT_OK


def _duration(ms: int | None) -> str:
    if ms is None:
        return ""
    seconds = ms / 1000
    return f"{seconds:.1f}s" if seconds < 60 else f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def _dollars(usd: float | None) -> str:
    return "" if usd is None else f"${usd:.4f}"


def _tokens(usage: Usage | None) -> str:
    if usage is None:
        return "tokens not reported"
    parts = [f"{usage.input_tokens or 0} in", f"{usage.output_tokens or 0} out"]
    if usage.cached_input_tokens:
        parts.append(f"{usage.cached_input_tokens} cached")
    if usage.cache_write_tokens:
        parts.append(f"{usage.cache_write_tokens} cache-written")
    if usage.reasoning_tokens:
        parts.append(f"{usage.reasoning_tokens} reasoning")
    return "tokens " + ", ".join(parts)


def _verdict_line(run: Run) -> str | None:
    """The verdict as the run records it; an unknown one says what the judge should have said."""
    if run.verdict is None:
        return None
    if run.verdict != "unknown":
        return run.verdict
    strategy = STRATEGIES.get(run.strategy)
    judge = next((r for r in strategy.roles if r.judges), None) if strategy else None
    expected = f" (the {judge.name} gave no VERDICT line of {' or '.join(judge.verdicts)})" if judge else ""
    return f"unknown{expected}"


def _print_run(run: Run) -> None:
    from .engine.executor import step_label

    _say(f"run       {run.id}")
    _say(f"strategy  {run.strategy}")
    _say(f"status    {run.status}" + (f"  ({_cell(run.error)})" if run.error else ""))
    verdict = _verdict_line(run)
    if verdict:
        _say(f"verdict   {verdict}")
    for finding in run.findings:
        _say(f"finding   {_cell(finding)}")
    if run.duration_ms is not None:
        _say(f"took      {_duration(run.duration_ms)}")
    budget = f" (budget ${run.max_cost_usd:g})" if run.max_cost_usd is not None else ""
    if run.cost_usd is not None or run.usage is not None or budget:
        _say(f"cost      {_dollars(run.cost_usd) or 'unknown'}{budget}; {_tokens(run.usage)}")
    _say(f"task      {run.task[:500]}")
    for note in run.notes:
        _say(f"note      {_cell(note)}")
    for wt in run.worktrees:
        chosen = "  (chosen)" if run.chosen is not None and wt.label == run.chosen else ""
        label = f"[{wt.label}] " if wt.label else ""
        _say(f"worktree  {label}{wt.branch} at {wt.path}, from {wt.base_commit[:12]}: {wt.state}{chosen}")
    for s in run.steps:
        fell = f" (fell back from {s.fallback_from})" if s.fallback_from else ""
        _say(f"\n--- {step_label(s)}: {s.role} {s.worker_name} via {s.runtime_mode}{fell}: {s.status}")
        for a in s.attempts:
            err = f" {a.error_kind}: {_cell(a.error)}" if a.error else ""
            _say(f"    attempt {a.runtime_mode}: {a.status} in {a.duration_ms} ms{err}")
        if s.directory:
            _say(f"    in {s.directory}")
        made = ", ".join(x for x in (s.model and f"model {s.model}", s.cli_version) if x)
        if made:
            _say(f"    {made}")
        if s.usage or s.cost_source:
            cost = f"{_dollars(s.cost_usd)} ({s.cost_source})" if s.cost_usd is not None else "cost unknown"
            _say(f"    {_tokens(s.usage)}; {cost}")
        if s.output:
            _say(s.output)
        if s.diff:
            _say(f"    --- its diff ---\n{s.diff}")


async def _dispatch(settings: Settings, args: argparse.Namespace) -> int:
    task = sys.stdin.read() if args.task == "-" else args.task
    request = DispatchRequest(
        task=task,
        strategy=args.strategy,
        workers=args.workers,
        runtime_mode=args.runtime_mode,
        fallback_policy=args.fallback_policy,
        working_directory=args.working_directory,
        max_rounds=args.max_rounds,
        max_cost_usd=args.max_cost_usd,
    )
    return await _follow(
        settings, args, lambda orchestrator, progress: orchestrator.start(request, on_progress=progress)
    )


async def _follow(
    settings: Settings,
    args: argparse.Namespace,
    start: Callable[[WorkerOrchestrator, Callable[[str], None]], Awaitable[Run]],
) -> int:
    """Start a run (a dispatch, a follow-up) and follow it to its end with live progress."""
    from .orchestrator import WorkerOrchestrator

    interrupted = False
    # The run says its first steps while it is being started: said after the line naming it.
    early: list[str] | None = []

    def progress(message: str) -> None:
        if early is not None:
            early.append(message)
        else:
            _tell(f"… {message}")

    # Ctrl-C cancels the run (recorded as cancelled, its processes killed) instead of tearing the
    # orchestrator down under it, which would record it interrupted as if the server had died.
    with anyio.open_signal_receiver(signal.SIGINT) as signals:
        async with WorkerOrchestrator(settings) as orchestrator, orchestrator.running():
            run = await start(orchestrator, progress)
            _tell(f"… run {run.id} {run.status} (Ctrl-C cancels it)")
            said, early = early or [], None
            for message in said:
                _tell(f"… {message}")

            async def cancel_on_ctrl_c(run_id: str) -> None:
                nonlocal interrupted
                async for _ in signals:
                    interrupted = True
                    _tell(f"… cancelling run {run_id}")
                    await orchestrator.cancel(run_id, reason="cancelled from the terminal")
                    return

            async with anyio.create_task_group() as tg:
                tg.start_soon(cancel_on_ctrl_c, run.id)
                run = await orchestrator.wait(run.id, None, on_progress=progress)
                tg.cancel_scope.cancel()
    if args.json:
        _print_json(run.model_dump_json(by_alias=True, indent=2))
    else:
        _print_run(run)
    if interrupted:
        return EXIT_INTERRUPTED
    if run.status != "completed":
        return EXIT_FAILED
    if run.verdict is not None and run.verdict not in PASSING_VERDICTS:
        _tell(f"mcp-collab: run {run.id} completed, but its verdict is {run.verdict} (exit {EXIT_VERDICT})")
        return EXIT_VERDICT
    return EXIT_OK


async def _workers(settings: Settings, args: argparse.Namespace) -> int:
    from .orchestrator import WorkerOrchestrator

    orchestrator = WorkerOrchestrator(settings, runtimes={})
    if args.action == "list":
        workers = await orchestrator.list_workers()
        if not workers:
            _say("no workers registered; add one with `mcp-collab workers add NAME --model codex_cli`")
            return EXIT_OK
        rows = [[w.name, w.model, w.runtime_mode or "(default)", w.fallback_policy or "(default)"] for w in workers]
        _say(_table(rows, ["name", "model", "runtime", "fallback"]))
        return EXIT_OK
    if not args.name:
        _tell(f"mcp-collab: workers {args.action} needs a NAME")
        return EXIT_REFUSED
    if args.action == "remove":
        await orchestrator.remove_worker(args.name)
        _say(f"removed {args.name}")
        return EXIT_OK
    fields: dict[str, Any] = {
        "name": args.name,
        "model": args.model,
        "runtime_mode": args.runtime_mode,
        "fallback_policy": args.fallback_policy,
        "instructions": args.instructions,
        "sdk_model": args.sdk_model,
        "cli_model": args.cli_model,
        "timeout_seconds": args.timeout_seconds,
        "working_directory": args.working_directory,
    }
    worker = await orchestrator.register_worker(WorkerSpec(**fields))
    print(json.dumps(worker.model_dump(mode="json", by_alias=True)))  # ASCII-only: json escapes the rest
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
