"""Cost of a run's worktree: inspect + create + remove through mcp_collab.worktrees, against the bare
`git worktree add -b` + `git worktree remove` on the same repository of 10,000 files.

    .venv/bin/python bench/worktree_cost.py [--files 10000] [--reps 7]

Target: at most 1.2x (median of alternating repetitions, both sides spawning git the same way).
Ours also snapshots the user's working tree (for uncommitted changes) and deletes the branch; the
baseline runs git the ordinary way, with the repository's config and hooks (none are planted here).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median, ms, private_dir, ratio, server_env

from mcp_collab import worktrees

TARGET = 1.2
# Files per directory of the generated repository, as source trees are spread out.
PER_DIR = 100


def build(top: Path, files: int, env: dict[str, str]) -> None:
    import subprocess

    top.mkdir()
    for i in range(files):
        d = top / f"pkg{i // PER_DIR:03d}"
        d.mkdir(exist_ok=True)
        (d / f"mod{i % PER_DIR:03d}.py").write_text(f"# module {i}\nVALUE = {i}\n" + "x = 1\n" * 20, encoding="utf-8")
    for args in (["init", "-q", "-b", "main"], ["add", "."], ["commit", "-qm", "init"]):
        subprocess.run(["git", "-c", "user.name=b", "-c", "user.email=b@b", *args], cwd=top, env=env, check=True)


async def bare(top: Path, path: Path, branch: str, env: dict[str, str]) -> float:
    t = time.perf_counter()
    await anyio.run_process(["git", "worktree", "add", "-q", "-b", branch, str(path)], cwd=top, env=env)
    await anyio.run_process(["git", "worktree", "remove", str(path)], cwd=top, env=env)
    return time.perf_counter() - t


async def ours(top: Path, roots: tuple[Path, ...], base_dir: Path, run_id: str) -> tuple[float, float, float, float]:
    t0 = time.perf_counter()
    repo = await worktrees.inspect(top, roots)
    assert repo is not None and not repo.dirty
    t1 = time.perf_counter()
    wt = await worktrees.create(repo, run_id=run_id, label=None, base_dir=base_dir)
    t2 = time.perf_counter()
    await worktrees.remove(wt)
    t3 = time.perf_counter()
    return t3 - t0, t1 - t0, t2 - t1, t3 - t2


async def main_async(files: int, reps: int) -> int:
    with private_dir("worktree-cost") as tmp:
        env = server_env(tmp)
        env["GIT_CONFIG_NOSYSTEM"] = "1"
        os.environ.update({"HOME": env["HOME"]})  # the server's git never reads it; the baseline's does
        top = tmp / "repo"
        t = time.perf_counter()
        build(top, files, env)
        print(f"repository of {files} files built in {time.perf_counter() - t:.1f} s")
        base_dir = tmp / "worktrees"
        # One of each first: the page cache and git's own start-up warm for both sides alike.
        await bare(top, tmp / "warm", "warm", env)
        await ours(top, (tmp,), base_dir, "warm")
        bare_times: list[float] = []
        our_times: list[tuple[float, float, float, float]] = []
        for i in range(reps):
            # Alternating, so that drift of a shared machine falls on both sides.
            if i % 2:
                our_times.append(await ours(top, (tmp,), base_dir, f"run-{i}"))
                bare_times.append(await bare(top, tmp / f"bare-{i}", f"bare-{i}", env))
            else:
                bare_times.append(await bare(top, tmp / f"bare-{i}", f"bare-{i}", env))
                our_times.append(await ours(top, (tmp,), base_dir, f"run-{i}"))
    total = median([o[0] for o in our_times])
    baseline = median(bare_times)
    print(f"bare git worktree add + remove        {ms(baseline):>10}  (median of {reps})")
    print(f"inspect + create + remove (ours)      {ms(total):>10}  {ratio(total, baseline)}")
    for label, k in (
        ("  inspect (snapshot of the user tree)", 1),
        ("  create (register + checkout)", 2),
        ("  remove", 3),
    ):
        print(f"{label:38}{ms(median([o[k] for o in our_times])):>10}")
    ok = total <= TARGET * baseline
    print(
        f"{'PASS' if ok else 'FAIL'}: a run's worktree costs {ratio(total, baseline)} of bare git (target <= {TARGET}x)"
    )
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    return anyio.run(main_async, args.files, args.reps)


if __name__ == "__main__":
    sys.exit(main())
