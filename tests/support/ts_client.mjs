// The official TypeScript MCP SDK client (npm @modelcontextprotocol/sdk) against `mcp-collab serve`
// over stdio, on one long run. Driven by tests/test_real_mcp_clients.py:
//
//   node ts_client.mjs SDK_DIR MODE            (the server's command and env come as JSON on stdin)
//
// MODE "default": the SDK's defaults (60 s request timeout, no reset on progress). dispatch_task with
//   its default waitSeconds returns before the timeout; wait_worker_run follows up to the end.
// MODE "reset": every call with { timeout: 10 s, resetTimeoutOnProgress: true } and an onprogress
//   handler: dispatch_task with waitSeconds 55 and wait_worker_run calls each outlive the 10 s timeout
//   on the server's progress heartbeats. First, a control: the same 10 s timeout without the reset
//   on a 30 s wait_worker_run times out.
//
// Prints one JSON object on stdout: what each call returned (or the error it raised).
import { pathToFileURL } from "node:url";
import { join } from "node:path";

const [sdkDir, mode] = process.argv.slice(2);
const load = (path) => import(pathToFileURL(join(sdkDir, "dist", "esm", path)).href);
const { Client } = await load("client/index.js");
const { StdioClientTransport } = await load("client/stdio.js");
const { DEFAULT_REQUEST_TIMEOUT_MSEC } = await load("shared/protocol.js");

const chunks = [];
for await (const chunk of process.stdin) chunks.push(chunk);
const server = JSON.parse(Buffer.concat(chunks).toString("utf8"));

const SHORT_TIMEOUT_MS = 10_000; // the short client timeout: two heartbeats (5 s) fit in it
const report = { mode, defaultTimeoutMs: DEFAULT_REQUEST_TIMEOUT_MSEC, calls: [] };
const transport = new StdioClientTransport({ ...server, stderr: "inherit" });
const client = new Client({ name: "mcp-collab-ts-test", version: "1.0.0" });
await client.connect(transport);
report.serverVersion = client.getServerVersion();

async function call(name, args, options) {
  let progress = 0;
  const opts = options && { ...options, onprogress: () => { progress += 1; } };
  const entry = { name, args, options: options ?? "defaults" };
  try {
    const result = await client.callTool({ name, arguments: args }, undefined, opts);
    Object.assign(entry, { isError: result.isError ?? false, result: result.structuredContent ?? null });
  } catch (error) {
    Object.assign(entry, { error: { code: error.code ?? null, message: String(error.message) } });
  }
  entry.progress = progress;
  report.calls.push(entry);
  return entry;
}

const ended = (entry) => entry.result && !["queued", "running"].includes(entry.result.status);
await call("spawn_worker", { name: "slow", model: "codex_cli" });
if (mode === "default") {
  const started = await call("dispatch_task", { task: "a long task" });
  let entry = started;
  while (entry.result && !ended(entry)) {
    entry = await call("wait_worker_run", { runId: started.result.id });
  }
} else {
  const reset = { timeout: SHORT_TIMEOUT_MS, resetTimeoutOnProgress: true };
  const started = await call("dispatch_task", { task: "a long task", waitSeconds: 55 }, reset);
  if (started.result) {
    await call("wait_worker_run", { runId: started.result.id, timeoutSeconds: 30 }, { timeout: SHORT_TIMEOUT_MS });
    let entry = started;
    while (entry.result && !ended(entry)) {
      entry = await call("wait_worker_run", { runId: started.result.id, timeoutSeconds: 55 }, reset);
    }
  }
}
await client.close();
process.stdout.write(JSON.stringify(report) + "\n");
