"""Cold start: `mcp-collab serve` to its first answer (initialize over stdio), against a bare MCPServer.

    .venv/bin/python bench/cold_start.py

Both servers are started as fresh processes of the same Python over stdio, the way a client starts
them; the clock runs from spawn to the `initialize` response, which is what a client's start-up or
discovery probe waits for (Claude Code gives up after about 3 s). The time to the first `tools/list`
answer is printed too, for information. Target: mcp-collab's first answer at most 1.1x the bare
server's (median of several starts, alternating), which holds only while the vendor SDKs and anything
heavy are imported lazily and nothing slow runs before the first answer.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median, ms, private_dir, ratio, server_env, write_script

ROUNDS = 11
TARGET = 1.1
BARE = """
from mcp.server.mcpserver import MCPServer

server = MCPServer("bare")


@server.tool()
async def ping() -> str:
    return "pong"


server.run("stdio")
"""
INITIALIZE = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
    "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "bench", "version": "0"}}}  # fmt: skip
AFTER = [{"jsonrpc": "2.0", "method": "notifications/initialized"}, {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}]


def first_answers(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Seconds from spawn to the initialize answer, and to the first tools/list answer."""
    t = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdin and proc.stdout
    # Sent at once, as a client does: the request is waiting when the server starts to read.
    proc.stdin.write((json.dumps(INITIALIZE) + "\n").encode())
    proc.stdin.flush()
    initialized = listed = 0.0
    while not listed:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{argv} exited before answering")
        answer = json.loads(line).get("id")
        if answer == 1:
            initialized = time.perf_counter() - t
            proc.stdin.write("".join(json.dumps(m) + "\n" for m in AFTER).encode())
            proc.stdin.flush()
        elif answer == 2:
            listed = time.perf_counter() - t
    proc.stdin.close()
    proc.wait(timeout=30)
    return initialized, listed


def main() -> int:
    with private_dir("cold-start") as tmp:
        env = server_env(tmp)
        bare = write_script(tmp / "bare_server.py", BARE)
        ours_argv = [sys.executable, "-m", "mcp_collab", "serve", "--log-level", "WARNING"]
        bare_argv = [sys.executable, str(bare)]
        first_answers(bare_argv, env)  # warm the OS file cache for both
        first_answers(ours_argv, env)
        bare_times, ours_times = [], []
        for _ in range(ROUNDS):
            bare_times.append(first_answers(bare_argv, env))
            ours_times.append(first_answers(ours_argv, env))
    b_init, o_init = median([t[0] for t in bare_times]), median([t[0] for t in ours_times])
    b_list, o_list = median([t[1] for t in bare_times]), median([t[1] for t in ours_times])
    print(f"python: {sys.executable}")
    print(f"bare MCPServer, one tool:  initialize {ms(b_init)}, first tools/list {ms(b_list)} (median of {ROUNDS})")
    print(f"mcp-collab serve:          initialize {ms(o_init)}, first tools/list {ms(o_list)} (median of {ROUNDS})")
    print(f"first tools/list: {ratio(o_list, b_list)} of the bare server (for information)")
    ok = o_init <= TARGET * b_init
    print(
        f"{'PASS' if ok else 'FAIL'}: the first answer (initialize) is {ratio(o_init, b_init)} of the bare "
        f"server's (target <= {TARGET}x)"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
