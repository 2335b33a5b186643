"""An `openai_sdk` step against a raw `openai` call to the same loopback stub.

    .venv/bin/python bench/sdk_overhead.py

All three use the real AsyncOpenAI client over HTTP against tests/support/vendor_stub.py on
127.0.0.1: a raw `responses.create` on a client kept open, as a careful caller would; the
`openai_sdk` runtime running one step (what the runtime adds: request building, error mapping,
result normalization, client reuse); and, for information, a whole `single_worker` run through the
orchestrator (planning and two fsynced store writes on top; bench/dispatch_overhead.py owns that
budget). Target: the runtime's step at most 1.1x the raw call at the median. Rounds alternate.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import openai
from _common import median, ms, private_dir, ratio, server_env
from tests.support.vendor_stub import VendorStub

from mcp_collab.config import Settings
from mcp_collab.models import DispatchRequest, Worker, WorkerSpec
from mcp_collab.orchestrator import WorkerOrchestrator
from mcp_collab.runtimes.base import StepRequest
from mcp_collab.runtimes.openai_sdk import OpenAISDKRuntime

ROUNDS = 80


async def bench(tmp: Path, stub: VendorStub) -> tuple[list[float], list[float], list[float]]:
    env = server_env(tmp, OPENAI_API_KEY="sk-bench", OPENAI_BASE_URL=f"{stub.url}/v1")
    settings = Settings.from_env(env)
    raw_client = openai.AsyncOpenAI(api_key="sk-bench", base_url=f"{stub.url}/v1", max_retries=0)
    runtime = OpenAISDKRuntime(settings)
    worker = Worker(name="w", model="codex_cli", runtime_mode="openai_sdk", sdk_model="m")
    raw, step, whole = [], [], []
    async with WorkerOrchestrator(settings) as orch, orch.running():
        await orch.register_worker(WorkerSpec(**worker.model_dump(exclude={"created_at"})))
        for i in range(ROUNDS + 5):
            t = time.perf_counter()
            response = await raw_client.responses.create(model="m", input=f"task {i}")
            raw_s = time.perf_counter() - t
            assert response.output_text
            request = StepRequest(
                worker=worker, prompt=f"task {i}", instructions="", access="read_only", timeout_s=60, idle_timeout_s=60
            )
            t = time.perf_counter()
            result = await runtime.run(request)
            step_s = time.perf_counter() - t
            assert result.text
            t = time.perf_counter()
            run = await orch.start(DispatchRequest(task=f"task {i}"))
            run = await orch.wait(run.id, None)
            whole_s = time.perf_counter() - t
            assert run.status == "completed" and run.steps[0].runtime_mode == "openai_sdk", run.error
            if i >= 5:
                raw.append(raw_s)
                step.append(step_s)
                whole.append(whole_s)
    await raw_client.close()
    await runtime.aclose()
    return raw, step, whole


def main() -> int:
    with private_dir("sdk-overhead") as tmp, VendorStub() as stub:
        raw, step, whole = anyio.run(bench, tmp, stub)
    r, st, w = median(raw), median(step), median(whole)
    print(f"raw AsyncOpenAI responses.create:    {ms(r)} (median of {ROUNDS})")
    print(f"openai_sdk runtime, one step:        {ms(st)} ({ratio(st, r)})")
    print(f"whole single_worker run (for info):  {ms(w)} ({ratio(w, r)}; +{ms(w - r)})")
    ok = st <= 1.1 * r
    print(f"{'PASS' if ok else 'FAIL'}: an openai_sdk step is {ratio(st, r)} of a raw call (target <= 1.1x)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
