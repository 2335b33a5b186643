"""Cold start: `mcp-collab serve` to its first tools/list answer, against a bare MCPServer with one tool.

    .venv/bin/python bench/cold_start.py

Both servers are started as fresh processes over stdio, the same way a client starts them; the
clock runs from spawn to the tools/list response. Target: mcp-collab at most 1.3x the bare server
(median of several starts), which holds only while the vendor SDKs are imported lazily.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median, ms, private_dir, ratio, server_env, write_script

ROUNDS = 7
BARE = """
from mcp.server.mcpserver import MCPServer

server = MCPServer("bare")


@server.tool()
async def ping() -> str:
    return "pong"


server.run("stdio")
"""
MESSAGES = [
    {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "bench", "version": "0"}}},
    {"jsonrpc": "2.0", "method": "notifications/initialized"},
    {"jsonrpc": "2.0", "id": 2, "method": "tools/list"},
]  # fmt: skip


def first_tools_list(argv: list[str], env: dict[str, str]) -> float:
    t = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdin and proc.stdout
    proc.stdin.write("".join(json.dumps(m) + "\n" for m in MESSAGES).encode())
    proc.stdin.flush()
    while True:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{argv} exited before answering tools/list")
        if json.loads(line).get("id") == 2:
            elapsed = time.perf_counter() - t
            break
    proc.stdin.close()
    proc.wait(timeout=30)
    return elapsed


def main() -> int:
    with private_dir("cold-start") as tmp:
        env = server_env(tmp)
        bare = write_script(tmp / "bare_server.py", BARE)
        ours_argv = [sys.executable, "-m", "mcp_collab", "serve", "--log-level", "WARNING"]
        bare_argv = [sys.executable, str(bare)]
        first_tools_list(bare_argv, env)  # warm the OS file cache for both
        first_tools_list(ours_argv, env)
        bare_times, ours_times = [], []
        for _ in range(ROUNDS):
            bare_times.append(first_tools_list(bare_argv, env))
            ours_times.append(first_tools_list(ours_argv, env))
    b, o = median(bare_times), median(ours_times)
    print(f"bare MCPServer, one tool:  {ms(b)} (median of {ROUNDS})")
    print(f"mcp-collab serve:          {ms(o)} (median of {ROUNDS})")
    ok = o <= 1.3 * b
    print(
        f"{'PASS' if ok else 'FAIL'}: cold start to the first tools/list is {ratio(o, b)} of the bare server (target <= 1.3x)"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
