"""Export the JSON Schema of every model on the wire to ``contracts/``.

    python -m mcp_collab.contracts            # rewrite contracts/*.schema.json
    python -m mcp_collab.contracts --check    # exit 1 if contracts/ is stale

The drift test runs ``--check``'s logic: a model changed without regenerating fails the suite.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from .models import Attempt, DispatchRequest, Run, RunPage, RunSummaryPage, RuntimePolicy, Step, Worker, WorkerSpec
from .store.json_store import STORE_SCHEMA_VERSION

MODELS: dict[str, type[BaseModel]] = {
    "worker_spec": WorkerSpec,
    "worker": Worker,
    "attempt": Attempt,
    "step": Step,
    "run": Run,
    "run_page": RunPage,
    "run_summary_page": RunSummaryPage,
    "dispatch_request": DispatchRequest,
    "runtime_policy": RuntimePolicy,
}


# Models that clients send (their schema is what we accept); the rest are what we return or store.
INPUTS = frozenset({"worker_spec", "dispatch_request"})


def store_schema() -> dict[str, Any]:
    """One line of runs.jsonl: the header first, then one change per line."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "mcp-collab store log line (runs.jsonl)",
        "oneOf": [
            {
                "title": "header (first line)",
                "type": "object",
                "required": ["schemaVersion"],
                "properties": {
                    "schemaVersion": {"type": "integer", "const": STORE_SCHEMA_VERSION},
                    "kind": {"const": "mcp-collab-store"},
                },
            },
            {
                "title": "a run's latest state (step outputs longer than the preview live in outputs/RUN/N.txt)",
                "type": "object",
                "required": ["op", "run"],
                "properties": {
                    "op": {"const": "run"},
                    "run": {"$ref": "run.schema.json"},
                    "outputs": {"type": "array", "items": {"type": "integer"}},
                },
            },
            {
                "title": "a run pruned",
                "type": "object",
                "required": ["op", "id"],
                "properties": {"op": {"const": "unrun"}, "id": {"type": "string"}},
            },
            {
                "title": "a worker registered",
                "type": "object",
                "required": ["op", "worker"],
                "properties": {"op": {"const": "worker"}, "worker": {"$ref": "worker.schema.json"}},
            },
            {
                "title": "a worker removed",
                "type": "object",
                "required": ["op", "name"],
                "properties": {"op": {"const": "unworker"}, "name": {"type": "string"}},
            },
        ],
    }


def render() -> dict[str, str]:
    """File name -> exact file text for everything under contracts/."""
    files = {}
    for name, model in MODELS.items():
        mode: Literal["validation", "serialization"] = (
            "validation" if name in ("worker_spec", "dispatch_request") else "serialization"
        )
        schema = model.model_json_schema(by_alias=True, mode=mode)
        files[f"{name}.schema.json"] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    files["store.schema.json"] = json.dumps(store_schema(), indent=2, sort_keys=True) + "\n"
    return files


def default_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "contracts"


def stale(directory: Path) -> list[str]:
    problems = []
    expected = render()
    for name, text in expected.items():
        path = directory / name
        if not path.exists():
            problems.append(f"{name} is missing")
        elif path.read_text(encoding="utf-8") != text:
            problems.append(f"{name} differs from the models")
    for path in directory.glob("*.schema.json"):
        if path.name not in expected:
            problems.append(f"{path.name} has no model")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mcp_collab.contracts", description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=default_dir())
    parser.add_argument("--check", action="store_true", help="report drift instead of writing")
    args = parser.parse_args(argv)
    if args.check:
        problems = stale(args.dir)
        for problem in problems:
            print(f"contracts: {problem}", file=sys.stderr)
        if problems:
            print("contracts: run `python -m mcp_collab.contracts` to regenerate", file=sys.stderr)
        return 1 if problems else 0
    args.dir.mkdir(parents=True, exist_ok=True)
    for path in args.dir.glob("*.schema.json"):
        path.unlink()
    for name, text in render().items():
        (args.dir / name).write_text(text, encoding="utf-8")
    print(f"wrote {len(render())} schemas to {args.dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
