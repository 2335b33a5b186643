"""Fake CLIs for the faults a real one will not produce on demand.

Each behaviour speaks enough of codex's ``exec --json`` event stream to be run as a codex worker
(point MCP_COLLAB_CODEX_BIN at the wrapper script of the same name). Process ids of everything a
fake starts are appended to the file named by CODEX_FAKE_PIDFILE, so tests can prove that nothing
survives. Tuning comes through CODEX_FAKE_* variables (the child environment passes CODEX_*).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time


def emit(event: dict) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def record_pid(pid: int) -> None:
    path = os.environ.get("CODEX_FAKE_PIDFILE")
    if path:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(f"{pid}\n")


def finish(text: str) -> None:
    emit({"type": "item.completed", "item": {"id": "item_0", "type": "agent_message", "text": text}})
    emit({"type": "turn.completed", "usage": {"input_tokens": 3, "cached_input_tokens": 0, "output_tokens": 2}})


def sleeper(ignore_term: bool) -> subprocess.Popen:
    code = "import signal,time\n"
    if ignore_term:
        code += "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    code += "time.sleep(3600)\n"
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL)
    record_pid(child.pid)
    return child


def main(mode: str) -> None:
    sys.stdin.read()  # like codex: wait for the prompt's end of file
    record_pid(os.getpid())
    emit({"type": "thread.started", "thread_id": f"fake-{mode}"})
    emit({"type": "turn.started"})
    if mode == "hang":
        # A parent that ignores SIGTERM, with children, one of them ignoring SIGTERM too.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        emit(
            {
                "type": "item.completed",
                "item": {"id": "m0", "type": "agent_message", "text": "partial work: step one done"},
            }
        )
        sleeper(ignore_term=False)
        sleeper(ignore_term=True)
        emit({"type": "item.started", "item": {"id": "c1", "type": "command_execution", "command": "sleep"}})
        while True:
            time.sleep(0.5)
            if os.environ.get("CODEX_FAKE_CHATTY"):
                emit({"type": "item.completed", "item": {"id": "r", "type": "reasoning", "text": "still going"}})
    elif mode == "silent":
        time.sleep(3600)
    elif mode == "flood":
        total = int(os.environ.get("CODEX_FAKE_FLOOD_BYTES", str(64 << 20)))
        line = ("x" * 1023 + "\n").encode()
        out = sys.stdout.buffer
        written = 0
        while written < total:
            out.write(line * 64)
            written += len(line) * 64
        out.flush()
        finish(f"flooded {written} bytes")
    elif mode == "crash":
        emit({"type": "item.completed", "item": {"id": "a", "type": "agent_message", "text": "half done"}})
        sys.stderr.write("thread 'main' panicked: simulated crash\n")
        sys.stderr.flush()
        os._exit(101)
    elif mode == "orphan":
        # The child outlives its parent: the parent reports success and exits at once.
        sleeper(ignore_term=True)
        finish("done, but I left a child behind")
    elif mode == "slow":
        seconds = float(os.environ.get("CODEX_FAKE_SECONDS", "1"))
        deadline = time.monotonic() + seconds
        n = 0
        while time.monotonic() < deadline:
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
            n += 1
            emit({"type": "item.completed", "item": {"id": f"r{n}", "type": "reasoning", "text": f"step {n}"}})
        finish(f"slow work finished after {seconds:g}s")
    elif mode == "leak":
        # A worker that prints what it can see: the keys in its environment, and a key-shaped string.
        seen = {k: v for k, v in os.environ.items() if "KEY" in k or "TOKEN" in k}
        sys.stderr.write(f"debug: environment {seen}\n")
        emit({"type": "item.completed", "item": {"id": "a", "type": "agent_message",
              "text": f"I found {seen} and sk-proj-ABCDEFGHIJKLMNOPQRSTUV123 in a file"}})  # fmt: skip
        if os.environ.get("CODEX_FAKE_FAIL"):
            sys.stderr.write(f"fatal: auth failed with key {os.environ.get('OPENAI_API_KEY')}\n")
            sys.exit(3)
        emit({"type": "turn.completed", "usage": {"input_tokens": 1, "output_tokens": 1}})
    elif mode == "argv":
        emit({"type": "item.completed", "item": {"id": "a", "type": "agent_message", "text": json.dumps(sys.argv[1:])}})
        emit({"type": "turn.completed", "usage": {"input_tokens": 1, "output_tokens": 1}})
    elif mode == "ok":
        finish("fake codex did the task")
    else:
        sys.stderr.write(f"unknown fake mode {mode}\n")
        sys.exit(2)
