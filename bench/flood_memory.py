"""Server memory while a worker prints 1 GiB to stdout, through the orchestrator's real cli runtime.

The worker is tests/fake_clis/flood (CODEX_FAKE_FLOOD_BYTES=1 GiB of 1 KiB lines, then the final
codex events); it writes about 1 GB/s, fast enough for the time budget.

Figure: growth of this process's peak resident memory (VmHWM minus VmRSS at the start of the
phase; the peak is reset by writing "5" to /proc/self/clear_refs before each phase) during the run.
Baseline (same process): the growth while the same 1 GiB is drained from a raw subprocess into
/dev/null with a plain os.read loop.
Target: growth of at most 64 MB, and the run completes with its answer whole (the flood is noise
around the answer: the answer is stored as printed, nothing appended, outputTruncated false).
Second phase: the same 1 GiB with no newline at all, one line, which is spooled to a temporary file
up to MCP_COLLAB_MAX_ANSWER_BYTES and then dropped: growth of at most 64 MB again, and the step fails
naming that cap rather than completing without its answer.

Run: .venv/bin/python bench/flood_memory.py
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import anyio
from _common import FAKE_CLIS, mb, private_dir, proc_status, ratio, server_env, verdict

from mcp_collab.config import Settings
from mcp_collab.models import DispatchRequest, Run, WorkerSpec
from mcp_collab.orchestrator import WorkerOrchestrator

FLOOD_BYTES = 1 << 30
# A small flood run first, unmeasured, so one-time costs (lazy imports, the store's first open) of a
# server that has been up a while are not counted; then once more, measured, as a per-run control.
SMALL_FLOOD_BYTES = 1 << 20
TARGET_GROWTH_KB = 64 * 1024
FLOOD = str(FAKE_CLIS / "flood")
_READ_CHUNK = 64 * 1024
# The cross-check sampler's period: coarse, so it costs the measured process next to nothing.
SAMPLE_S = 0.005
CAP_NAMED = re.compile(r"over the \d+-byte cap .*MCP_COLLAB_MAX_ANSWER_BYTES")


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where it is not permitted."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


class RssSampler:
    """Samples VmRSS in a thread: a cross-check of VmHWM, and the figure where HWM cannot be reset."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, proc_status()["VmRSS"])
            time.sleep(SAMPLE_S)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, proc_status()["VmRSS"])


@dataclass
class Phase:
    growth_kb: int  # VmHWM after minus VmRSS before (or the sampled peak if HWM could not be reset)
    sampled_kb: int  # the sampler's peak minus VmRSS before
    rss_after_kb: int
    seconds: float
    hwm_reset: bool


def measure(fn: Callable[[], None]) -> Phase:
    hwm_reset = reset_peak()
    before = proc_status()["VmRSS"]
    t0 = time.perf_counter()
    with RssSampler() as sampler:
        fn()
    seconds = time.perf_counter() - t0
    after = proc_status()
    sampled = sampler.peak - before
    growth = after["VmHWM"] - before if hwm_reset else sampled
    return Phase(growth, sampled, after["VmRSS"], seconds, hwm_reset)


def raw_drain(env: dict[str, str]) -> int:
    proc = subprocess.Popen([FLOOD], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, env=env)
    assert proc.stdout is not None
    total = 0
    fd = proc.stdout.fileno()
    sink = os.open(os.devnull, os.O_WRONLY)
    try:
        while chunk := os.read(fd, _READ_CHUNK):
            total += len(chunk)
            os.write(sink, chunk)
    finally:
        os.close(sink)
        proc.stdout.close()
        proc.wait()
    return total


async def orchestrated(settings: Settings, out: list[Run]) -> None:
    async with WorkerOrchestrator(settings) as orch, orch.running():
        if not any(w.name == "flood" for w in await orch.list_workers()):
            await orch.register_worker(WorkerSpec(name="flood", model="codex_cli"))
        run = await orch.start(DispatchRequest(task="print a flood", workers=["flood"]))
        await orch.wait(run.id, None)
        out.append(await orch.get_run(run.id))  # the run as the store holds it


def main() -> None:
    with private_dir("flood") as tmp:
        env = server_env(tmp, MCP_COLLAB_CODEX_BIN=FLOOD, CODEX_FAKE_FLOOD_BYTES=str(FLOOD_BYTES))
        settings = Settings.from_env(env)
        small = Settings.from_env({**env, "CODEX_FAKE_FLOOD_BYTES": str(SMALL_FLOOD_BYTES)})
        small_runs: list[Run] = []
        cold = measure(lambda: anyio.run(orchestrated, small, small_runs))  # warm-up
        drained: list[int] = []
        base = measure(lambda: drained.append(raw_drain(settings.child_env())))
        control = measure(lambda: anyio.run(orchestrated, small, small_runs))
        runs: list[Run] = []
        orch = measure(lambda: anyio.run(orchestrated, settings, runs))
        one_line = Settings.from_env({**env, "CODEX_FAKE_FLOOD_NO_NEWLINE": "1"})
        line_runs: list[Run] = []
        line = measure(lambda: anyio.run(orchestrated, one_line, line_runs))

    run = runs[0]
    step = run.steps[0]
    line_step = line_runs[0].steps[0]
    expected = f"flooded {FLOOD_BYTES} bytes"
    how = "VmHWM (reset via /proc/self/clear_refs)" if orch.hwm_reset else "sampled VmRSS peak (HWM reset refused)"
    print(f"flood_memory: a worker prints {FLOOD_BYTES / (1 << 30):g} GiB to stdout; growth = {how} - VmRSS before")
    print(
        f"  orchestrator run : +{mb(orch.growth_kb)} (sampled peak +{mb(orch.sampled_kb)}), "
        f"{orch.seconds:.1f} s, {FLOOD_BYTES / orch.seconds / 1e9:.2f} GB/s; RSS after {mb(orch.rss_after_kb)}"
    )
    print(
        f"  baseline raw read: +{mb(base.growth_kb)} (sampled peak +{mb(base.sampled_kb)}), "
        f"{base.seconds:.1f} s, {drained[0] / base.seconds / 1e9:.2f} GB/s, {drained[0]} bytes drained"
    )
    print(
        f"  control, orchestrator run of a {SMALL_FLOOD_BYTES >> 20} MiB flood: +{mb(control.growth_kb)} "
        f"(what any run costs, whatever it prints); "
        f"the same run as the first of this process (cold: lazy imports, store opened): +{mb(cold.growth_kb)}"
    )
    # A baseline growth of a few pages would make the ratio meaningless; floor it at 1 MB.
    print(f"  ratio (growth / max(baseline growth, 1 MB)): {ratio(orch.growth_kb, max(base.growth_kb, 1024))}")
    print(
        f"  run {run.status}; step {step.status}, exit code {step.exit_code}, outputTruncated={step.output_truncated}"
    )
    shown = step.output if len(step.output) <= 160 else step.output[:80] + " ... " + step.output[-80:]
    print(f"  step output ({len(step.output)} chars): {shown!r}")
    print(f"  run result: {run.result!r}")
    print(
        f"  the same 1 GiB as one line (no newline): +{mb(line.growth_kb)} (sampled peak +{mb(line.sampled_kb)}), "
        f"{line.seconds:.1f} s; step {line_step.status}: {line_step.error!r}"
    )
    whole = run.status == "completed" and step.output == expected and not step.output_truncated
    refused = line_step.status == "failed" and CAP_NAMED.search(line_step.error or "") is not None
    ok = whole and refused and max(orch.growth_kb, line.growth_kb) <= TARGET_GROWTH_KB
    verdict(
        ok,
        f"server grew {mb(orch.growth_kb)} while a worker printed 1 GiB in lines, {mb(line.growth_kb)} as one line "
        f"(target <= {mb(TARGET_GROWTH_KB)}); answer whole: {whole}; one-line flood failed naming the cap: {refused}",
    )


if __name__ == "__main__":
    main()
