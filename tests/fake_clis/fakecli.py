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


# One unit of a long answer: quotes, a backslash, a newline and characters of two to four UTF-8 bytes,
# so the answer is escaped in JSON and its size in bytes differs from its length.
ANSWER_UNIT = 'answer "quoted" \\ ünïcödé → ✓ 🙂 ok\n'


def answer_text(size: int) -> str:
    """The long answer the size modes print: ``size`` characters, the same for the fake and a test."""
    return (ANSWER_UNIT * (size // len(ANSWER_UNIT) + 1))[:size]


def plain_text(size: int) -> str:
    """The answer text as one line: what ``size_plain`` prints, with no newline anywhere."""
    return answer_text(size).replace("\n", " ")


def write_raw(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


def emit_bytes(event: dict, *, newline: bool = True) -> None:
    """An event written in one go (a line of tens of MB is one write, as a real CLI does)."""
    write_raw(json.dumps(event, ensure_ascii=False).encode("utf-8") + (b"\n" if newline else b""))


def size_mode(mode: str) -> bool:
    """The answers of every size and shape (the ``size_*`` modes); False for any other mode.

    Sizes come in <VENDOR>_FAKE_ANSWER_CHARS, since each CLI child only sees its own vendor's variables.
    """
    if not mode.startswith("size_"):
        return False
    sys.stdin.read()
    record_pid(os.getpid())
    if mode == "size_gemini":
        # gemini -o stream-json: the answer as many small deltas, the way gemini streams it.
        text = answer_text(int(os.environ.get("GEMINI_FAKE_ANSWER_CHARS", str(5 << 20))))
        piece = int(os.environ.get("GEMINI_FAKE_PIECE_CHARS", "256"))
        emit_bytes({"type": "init", "session_id": "fake-gemini-session", "model": "gemini-fake"})
        for i in range(0, len(text), piece):
            emit_bytes({"type": "message", "role": "assistant", "content": text[i : i + piece], "delta": True})
        emit_bytes({"type": "result", "status": "success", "stats": {"input_tokens": 3, "output_tokens": 2}})
        return True
    if mode == "size_claude":
        # claude stream-json: the answer in the assistant event and again in the result, which ends
        # the output with no newline at all.
        text = answer_text(int(os.environ.get("CLAUDE_FAKE_ANSWER_CHARS", str(5 << 20))))
        emit_bytes({"type": "system", "subtype": "init", "session_id": "fake-claude-session"})
        emit_bytes({"type": "assistant", "message": {"content": [{"type": "text", "text": text}]}})
        result = {"type": "result", "subtype": "success", "is_error": False, "result": text,
                  "session_id": "fake-claude-session", "usage": {"input_tokens": 3, "output_tokens": 2}}  # fmt: skip
        emit_bytes(result, newline=False)
        return True
    chars = int(os.environ.get("CODEX_FAKE_ANSWER_CHARS", str(5 << 20)))
    if mode == "size_plain":
        # Not an event stream at all: one plain line with no newline.
        write_raw(plain_text(chars).encode("utf-8"))
        return True
    emit({"type": "thread.started", "thread_id": f"fake-{mode}"})
    noise = int(os.environ.get("CODEX_FAKE_NOISE_BYTES", "0"))
    if noise:
        write_raw(b"warning: " + b"n" * noise + b"\n")  # a huge line that is not an event
    if mode == "size_codex":
        emit_bytes({"type": "item.completed", "item": {"id": "m", "type": "agent_message", "text": answer_text(chars)}})
    else:
        # Raw bytes inside the JSON string: invalid UTF-8, a NUL, then an escaped NUL.
        head = json.dumps({"type": "item.completed", "item": {"id": "m", "type": "agent_message", "text": "@"}})
        before, after = head.encode("utf-8").split(b"@")
        write_raw(before + b"bad \xff\xfe bytes, a raw \x00 NUL and an escaped \\u0000 one" + after + b"\n")
    emit({"type": "turn.completed", "usage": {"input_tokens": 3, "output_tokens": 2}})
    return True


def daemonize() -> None:
    """The classic double fork: the grandchild leaves our session and group (``setsid``), is
    re-parented to init when its parent exits, holds none of our pipes, records its pid and
    sleeps for good."""
    ready_r, ready_w = os.pipe()
    child = os.fork()
    if child == 0:
        os.setsid()
        if os.fork() == 0:
            devnull = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(devnull, fd)
            record_pid(os.getpid())
            os.write(ready_w, b"x")
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            while True:
                time.sleep(3600)
        os._exit(0)
    os.waitpid(child, 0)
    os.read(ready_r, 1)  # the daemon's pid is on record before we go on
    os.close(ready_r)
    os.close(ready_w)


# The abandoned child of ``abandon``: leaves the leader's group, starts a grandchild, records both.
ABANDONED = """
import os, subprocess, sys, time
os.setpgid(0, 0)
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"], stdin=subprocess.DEVNULL)
with open(os.environ["CODEX_FAKE_PIDFILE"], "a", encoding="utf-8") as fh:
    fh.write(f"{os.getpid()}\\n{grandchild.pid}\\n")
print("ready", flush=True)
time.sleep(3600)
"""


def main(mode: str) -> None:
    if size_mode(mode):
        return
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
        # CODEX_FAKE_FLOOD_NO_NEWLINE: the whole flood is one line, with the final events glued on.
        end = "x" if os.environ.get("CODEX_FAKE_FLOOD_NO_NEWLINE") else "\n"
        line = ("x" * 1023 + end).encode()
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
    elif mode == "daemon":
        # Starts a detached daemon, then works until told to stop (CODEX_FAKE_SECONDS, default
        # forever) and exits 0: the daemon must not outlive the step either way.
        daemonize()
        emit({"type": "item.completed", "item": {"id": "d", "type": "agent_message", "text": "daemon started"}})
        seconds = float(os.environ.get("CODEX_FAKE_SECONDS", "inf"))
        deadline = time.monotonic() + seconds
        release = os.environ.get("CODEX_FAKE_UNTIL")  # or until this file exists
        while time.monotonic() < deadline and not (release and os.path.exists(release)):
            time.sleep(min(0.5 if not release else 0.02, max(0.0, deadline - time.monotonic())))
        finish("done; my daemon keeps running")
    elif mode == "abandon":
        # The leader exits at once and leaves children: one in its group holding our pipes, one
        # that moved to a group of its own with a grandchild. Their ppid links to the leader die
        # with it.
        child = subprocess.Popen([sys.executable, "-c", ABANDONED], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
        assert child.stdout is not None
        child.stdout.readline()  # its grandchild is started and on record
        sleeper(ignore_term=True)
        finish("left my children behind")
        os._exit(0)
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
        finish(os.environ.get("CODEX_FAKE_SAY", "fake codex did the task"))
    elif mode == "findings":
        # A red-teamer's answer of CODEX_FAKE_FINDINGS findings, each a long line.
        count = int(os.environ.get("CODEX_FAKE_FINDINGS", "3"))
        finish("VERDICT: fail\n" + "".join(f"FINDING: issue {i} {'x' * 200}\n" for i in range(count)))
    elif mode == "write":
        # A writer: a file of its own in the directory it was started in, named by CODEX_FAKE_FILE;
        # under codex's read-only sandbox (-s read-only) it writes nothing, as codex would.
        if "read-only" in sys.argv:
            finish(f"read {os.getcwd()} and wrote nothing")
            return
        # CODEX_FAKE_WRITE_LINES numbered lines more make a long diff; CODEX_FAKE_ANSWER_CHARS a long answer.
        name = os.environ.get("CODEX_FAKE_FILE", "fake-work.txt")
        with open(name, "w", encoding="utf-8") as fh:
            fh.write(f"written by the fake in {os.getcwd()}\n")
            fh.writelines(f"line {i}\n" for i in range(int(os.environ.get("CODEX_FAKE_WRITE_LINES", "0"))))
        chars = os.environ.get("CODEX_FAKE_ANSWER_CHARS")
        finish(answer_text(int(chars)) if chars else f"wrote {name} in {os.getcwd()}")
    else:
        sys.stderr.write(f"unknown fake mode {mode}\n")
        sys.exit(2)
