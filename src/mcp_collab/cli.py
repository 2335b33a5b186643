"""The ``mcp-collab`` command: serve, doctor, runs, dispatch, workers.

Only ``serve`` speaks MCP; the other commands drive the same orchestrator and store directly,
with the same semantics as the tools. Under ``serve`` nothing but JSON-RPC reaches stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

import anyio
from pydantic import ValidationError

from . import __version__
from .config import Settings
from .errors import CollabError
from .models import RUNTIME_MODES, WORKER_MODELS, DispatchRequest, Run, WorkerSpec, describe_validation_error
from .orchestrator import WorkerOrchestrator
from .security import RedactingFilter
from .strategies import STRATEGIES


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mcp-collab", description="An MCP server that puts several AI coding agents to work together."
    )
    parser.add_argument("--version", action="version", version=f"mcp-collab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the MCP server (stdio by default)")
    serve.add_argument("--transport", choices=("stdio", "http"), default="stdio")
    serve.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8765, help="HTTP port (default 8765)")
    serve.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))

    doctor = sub.add_parser("doctor", help="check what can run here, with a hint for each failure")
    doctor.add_argument("--json", action="store_true", help="print the report as JSON")

    runs = sub.add_parser("runs", help="list recent runs, or `runs show ID`")
    runs.add_argument("action", nargs="?", choices=("list", "show", "prune"), default="list")
    runs.add_argument("run_id", nargs="?")
    runs.add_argument("--status")
    runs.add_argument("--strategy")
    runs.add_argument("--worker")
    runs.add_argument("--limit", type=int, default=20)
    runs.add_argument("--json", action="store_true")
    runs.add_argument("--max-runs", type=int, help="prune: keep the newest N finished runs (default: settings)")
    runs.add_argument("--max-age-days", type=float, help="prune: drop finished runs older than D days")

    dispatch = sub.add_parser("dispatch", help="run a task from the terminal with live progress")
    dispatch.add_argument("task", help="the task text (use - to read it from stdin)")
    dispatch.add_argument("--strategy", default="single_worker", choices=tuple(STRATEGIES))
    dispatch.add_argument("--worker", action="append", dest="workers", help="worker name, in role order")
    dispatch.add_argument("--runtime-mode", choices=RUNTIME_MODES)
    dispatch.add_argument("--fallback-policy", choices=("on_error", "never"))
    dispatch.add_argument("--working-directory")
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
    return parser


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
        handler = {"doctor": _doctor, "runs": _runs, "dispatch": _dispatch, "workers": _workers}[args.command]
        return anyio.run(handler, settings, args)
    except CollabError as exc:
        print(f"mcp-collab: {exc}", file=sys.stderr)
        return 1
    except ValidationError as exc:
        print(f"mcp-collab: {describe_validation_error(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _serve(args: argparse.Namespace) -> int:
    logging.basicConfig(
        stream=sys.stderr, level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings = Settings.from_env()
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactingFilter(settings.redact))  # no secret reaches the log
    from .server import build_server
    from .store import JsonStore

    # Opened before any client connects: a broken state directory is one clear line and exit 1.
    store = JsonStore(settings.store_dir)
    store.check_writable()
    server = build_server(settings, store=store)
    if args.transport == "stdio":
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


def _table(rows: list[list[str]], headers: list[str]) -> str:
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
        print(report.model_dump_json(by_alias=True, indent=2))
        return 0 if report.ok else 1
    rows = [[_mark(c.ok, c.required), c.name, c.detail, c.hint or ""] for c in report.checks]
    print(_table(rows, ["", "check", "detail", "how to fix"]))
    print()
    print(f"default runtime: {report.default_runtime}   fallback policy: {report.fallback_policy}")
    for r in report.runtimes:
        print(f"  {'ready' if r.ready else 'not ready':9}  {r.mode:10}  {r.worker_model:10}  {r.reason}")
    return 0 if report.ok else 1


def _step_summary(run: Run) -> str:
    parts = []
    for s in run.steps:
        mode: str = s.runtime_mode or "-"
        if s.fallback_from:
            mode = f"{s.fallback_from}->{mode}"
        parts.append(f"{s.worker_name}[{mode}]:{s.status}")
    return " ".join(parts)


async def _runs(settings: Settings, args: argparse.Namespace) -> int:
    orchestrator = WorkerOrchestrator(settings, runtimes={})
    if args.action == "prune":
        pruned = await orchestrator.prune(max_runs=args.max_runs, max_age_days=args.max_age_days)
        print(
            f"pruned {len(pruned)} runs"
            + (f": {', '.join(pruned[:10])}" + (" ..." if len(pruned) > 10 else "") if pruned else "")
        )
        return 0
    if args.action == "show":
        if not args.run_id:
            print("mcp-collab: runs show needs a run id", file=sys.stderr)
            return 2
        run = await orchestrator.get_run(args.run_id)
        if args.json:
            print(run.model_dump_json(by_alias=True, indent=2))
        else:
            _print_run(run)
        return 0
    page = await orchestrator.list_runs(
        status=args.status, strategy=args.strategy, worker=args.worker, limit=args.limit
    )
    if args.json:
        print(page.model_dump_json(by_alias=True, indent=2))
        return 0
    if not page.runs:
        print("no runs yet")
        return 0
    rows = [
        [r.id, r.created_at.strftime("%Y-%m-%d %H:%M:%S"), r.strategy, r.status, _step_summary(r)] for r in page.runs
    ]
    print(_table(rows, ["run", "created (UTC)", "strategy", "status", "steps"]))
    return 0


def _print_run(run: Run) -> None:
    print(f"run       {run.id}")
    print(f"strategy  {run.strategy}")
    print(f"status    {run.status}" + (f"  ({run.error})" if run.error else ""))
    if run.verdict:
        print(f"verdict   {run.verdict}")
    for finding in run.findings:
        print(f"finding   {finding}")
    print(f"task      {run.task[:500]}")
    for s in run.steps:
        fell = f" (fell back from {s.fallback_from})" if s.fallback_from else ""
        print(f"\n--- step {s.index + 1}: {s.role} {s.worker_name} via {s.runtime_mode}{fell}: {s.status}")
        for a in s.attempts:
            err = f" {a.error_kind}: {a.error}" if a.error else ""
            print(f"    attempt {a.runtime_mode}: {a.status} in {a.duration_ms} ms{err}")
        if s.usage:
            print(f"    tokens in/out: {s.usage.input_tokens}/{s.usage.output_tokens}")
        if s.output:
            print(s.output)


async def _dispatch(settings: Settings, args: argparse.Namespace) -> int:
    task = sys.stdin.read() if args.task == "-" else args.task
    request = DispatchRequest(
        task=task,
        strategy=args.strategy,
        workers=args.workers,
        runtime_mode=args.runtime_mode,
        fallback_policy=args.fallback_policy,
        working_directory=args.working_directory,
    )
    async with WorkerOrchestrator(settings) as orchestrator, orchestrator.running():
        run = await orchestrator.start(request)
        print(f"… run {run.id} {run.status}", file=sys.stderr)
        run = await orchestrator.wait(run.id, None, on_progress=lambda m: print(f"… {m}", file=sys.stderr))
    if args.json:
        print(run.model_dump_json(by_alias=True, indent=2))
    else:
        _print_run(run)
    return 0 if run.status == "completed" else 1


async def _workers(settings: Settings, args: argparse.Namespace) -> int:
    orchestrator = WorkerOrchestrator(settings, runtimes={})
    if args.action == "list":
        workers = await orchestrator.list_workers()
        if not workers:
            print("no workers registered; add one with `mcp-collab workers add NAME --model codex_cli`")
            return 0
        rows = [[w.name, w.model, w.runtime_mode or "(default)", w.fallback_policy or "(default)"] for w in workers]
        print(_table(rows, ["name", "model", "runtime", "fallback"]))
        return 0
    if not args.name:
        print(f"mcp-collab: workers {args.action} needs a NAME", file=sys.stderr)
        return 2
    if args.action == "remove":
        await orchestrator.remove_worker(args.name)
        print(f"removed {args.name}")
        return 0
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
    print(json.dumps(worker.model_dump(mode="json", by_alias=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
