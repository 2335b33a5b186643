"""Git run for the writer's diff never executes a program the repository (or the server's
environment) names, hands git no credential, and still shows the writer's change.

Each mechanism is planted in a real repository as a command that leaves a marker file outside it.
Every case first proves its plant is armed (git used the ordinary way, in the repository, runs it),
then takes the snapshots and the diff the server takes and asserts the marker never appeared.
"""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest

from mcp_collab import workspace
from mcp_collab.config import Settings
from mcp_collab.models import DispatchRequest, WorkerSpec
from mcp_collab.orchestrator import WorkerOrchestrator
from mcp_collab.runtimes.base import StepRequest
from mcp_collab.testing import Reply, ScriptedRuntime

# Generous: a snapshot of a three-file repository takes milliseconds.
DEADLINE_S = 30.0
ORIGINAL = "def parse(s):\n    return s.split()\n"
EDITED = "def parse(s):\n    if not s:\n        return []\n    return s.split()\n"
CREDENTIALS = {
    "OPENAI_API_KEY": "sk-planted-openai-0123456789abcdef",
    "GEMINI_API_KEY": "AIzaPlantedGemini0123456789",
    "ANTHROPIC_API_KEY": "sk-ant-planted-0123456789",
    "GITHUB_TOKEN": "ghp_planted0123456789abcdef",
    "AWS_SECRET_ACCESS_KEY": "planted-aws-secret",
    "MCP_COLLAB_HTTP_TOKEN": "planted-http-token-0123456789abcdef",
}


def git(cwd: Path, *args: str, env: dict[str, str] | None = None, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["git", "-c", "user.email=t@t", "-c", "user.name=t", *args],
        cwd=cwd, env=env, capture_output=True, text=True, check=False, timeout=DEADLINE_S, **kw,  # type: ignore[call-overload]
    )  # fmt: skip


@dataclass
class Lab:
    """A repository, a place for markers outside it, and a command that leaves one there."""

    tmp: Path
    repo: Path
    markers: Path
    evil: Path

    def command(self, name: str) -> str:
        return f"{shlex.quote(str(self.evil))} {name}"

    def fired(self) -> list[str]:
        return sorted(p.name for p in self.markers.iterdir())

    def config(self, key: str, value: str) -> None:
        assert git(self.repo, "config", key, value).returncode == 0

    def attributes(self, line: str, where: str = ".gitattributes") -> None:
        path = self.repo / where
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as fh:
            fh.write(line + "\n")

    def hook(self, directory: Path, name: str, marker: str | None = None) -> Path:
        """An executable ``directory/name`` that runs the planted command (for settings that take a
        program path rather than a shell command line)."""
        directory.mkdir(parents=True, exist_ok=True)
        script = directory / name
        script.write_text(f"#!/bin/sh\nexec {self.command(marker or name)}\n", encoding="utf-8")
        script.chmod(0o755)
        return script


@pytest.fixture
def lab(tmp_path: Path) -> Lab:
    markers = tmp_path / "markers"
    markers.mkdir()
    evil = tmp_path / "evil.sh"
    # Records that it ran (and with what environment), then passes its input through so that a
    # filter or textconv that did run would not also break the output.
    evil.write_text(
        f'#!/bin/sh\nenv > {shlex.quote(str(markers))}/"$1"\n'
        'case "$1" in filter_clean*|filter_smudge|filter_in_*) exec cat;; textconv) exec cat "$2";; esac\n',
        encoding="utf-8",
    )
    evil.chmod(evil.stat().st_mode | stat.S_IXUSR)
    repo = tmp_path / "repo"
    repo.mkdir()
    assert git(repo, "init", "-q", "-b", "main").returncode == 0
    (repo / "parse.py").write_text(ORIGINAL, encoding="utf-8")
    (repo / "notes.txt").write_text("notes\n", encoding="utf-8")
    assert git(repo, "add", ".").returncode == 0
    assert git(repo, "commit", "-qm", "init").returncode == 0
    return Lab(tmp=tmp_path, repo=repo, markers=markers, evil=evil)


def _pty_run(cwd: Path, *args: str) -> None:
    """git with a terminal on stdout, which is when it starts a pager."""
    controller, terminal = os.openpty()
    try:
        subprocess.run(["git", *args], cwd=cwd, stdout=terminal, stderr=subprocess.DEVNULL,
                       stdin=subprocess.DEVNULL, timeout=DEADLINE_S, check=False)  # fmt: skip
    finally:
        os.close(terminal)
        os.close(controller)


def _naive_add(lab: Lab, env: dict[str, str] | None = None) -> None:
    """What the diff used to do: `git add -A` in the repository, through a throwaway index."""
    env = {**(env or os.environ), "GIT_INDEX_FILE": str(lab.tmp / "naive-index")}
    git(lab.repo, "read-tree", "HEAD", env=env)
    git(lab.repo, "add", "-A", env=env)


def _naive_diff(lab: Lab, env: dict[str, str] | None = None) -> None:
    (lab.repo / "parse.py").write_text(EDITED, encoding="utf-8")
    git(lab.repo, "diff", "HEAD", env=env)
    (lab.repo / "parse.py").write_text(ORIGINAL, encoding="utf-8")


@dataclass(frozen=True)
class Mechanism:
    plant: Callable[[Lab], None]
    # The ordinary use of git that runs the plant: proves the case is armed and can fail.
    arm: Callable[[Lab], None]
    env: Callable[[Lab], dict[str, str]] = lambda lab: {}


def _global_config(lab: Lab) -> dict[str, str]:
    home = lab.tmp / "home"
    home.mkdir(exist_ok=True)
    (home / ".gitconfig").write_text(f"[core]\n\tfsmonitor = {lab.command('global_config')}\n", encoding="utf-8")
    return {"HOME": str(home)}


def _include(lab: Lab) -> None:
    included = lab.tmp / "included.config"
    included.write_text(f"[core]\n\tfsmonitor = {lab.command('include_path')}\n", encoding="utf-8")
    lab.config("include.path", str(included))


def _include_if(lab: Lab) -> None:
    included = lab.tmp / "included-if.config"
    included.write_text(f"[core]\n\tfsmonitor = {lab.command('include_if')}\n", encoding="utf-8")
    lab.config("includeIf.gitdir:/.path", str(included))


def _smudge(lab: Lab) -> None:
    lab.attributes("*.py filter=evil")
    lab.config("filter.evil.smudge", lab.command("filter_smudge"))


def _arm_smudge(lab: Lab) -> None:
    (lab.repo / "parse.py").unlink()
    git(lab.repo, "checkout", "--", "parse.py")


def _remote(lab: Lab, key: str, name: str) -> None:
    lab.config("remote.origin.url", "ssh://git.invalid/repo.git")
    lab.config(key, lab.command(name))


MECHANISMS: dict[str, Mechanism] = {
    "core_fsmonitor": Mechanism(lambda lab: lab.config("core.fsmonitor", lab.command("core_fsmonitor")), _naive_add),
    "hook_in_git_dir": Mechanism(
        lambda lab: lab.hook(lab.repo / ".git" / "hooks", "post-index-change", "hook_in_git_dir"), _naive_add
    ),
    "core_hooks_path": Mechanism(
        lambda lab: (
            lab.hook(lab.tmp / "hooks", "post-index-change", "core_hooks_path"),
            lab.config("core.hooksPath", str(lab.tmp / "hooks")),
        ),
        _naive_add,
    ),
    "filter_clean": Mechanism(
        lambda lab: (lab.attributes("*.py filter=evil"), lab.config("filter.evil.clean", lab.command("filter_clean"))),
        _naive_add,
    ),
    "filter_clean_required": Mechanism(
        lambda lab: (
            lab.attributes("*.py filter=evil"),
            lab.config("filter.evil.clean", lab.command("filter_clean_required")),
            lab.config("filter.evil.required", "true"),
        ),
        _naive_add,
    ),
    "filter_process": Mechanism(
        lambda lab: (lab.attributes("* filter=evil"), lab.config("filter.evil.process", lab.command("filter_process"))),
        _naive_add,
    ),
    "filter_smudge": Mechanism(_smudge, _arm_smudge),
    "filter_in_info_attributes": Mechanism(
        lambda lab: (
            lab.attributes("*.py filter=evil", where=".git/info/attributes"),
            lab.config("filter.evil.clean", lab.command("filter_in_info_attributes")),
        ),
        _naive_add,
    ),
    "diff_external": Mechanism(lambda lab: lab.config("diff.external", lab.command("diff_external")), _naive_diff),
    "textconv": Mechanism(
        lambda lab: (lab.attributes("*.py diff=evil"), lab.config("diff.evil.textconv", lab.command("textconv"))),
        _naive_diff,
    ),
    "core_pager": Mechanism(
        lambda lab: lab.config("core.pager", lab.command("core_pager")), lambda lab: _pty_run(lab.repo, "log")
    ),
    "pager_diff": Mechanism(
        lambda lab: lab.config("pager.diff", lab.command("pager_diff")),
        lambda lab: _pty_run(lab.repo, "diff", "HEAD~0"),
    ),
    "core_ssh_command": Mechanism(
        lambda lab: _remote(lab, "core.sshCommand", "core_ssh_command"),
        lambda lab: git(lab.repo, "ls-remote", "origin") and None,
    ),
    "credential_helper": Mechanism(
        lambda lab: lab.config("credential.helper", "!" + lab.command("credential_helper")),
        lambda lab: git(lab.repo, "credential", "fill", input="protocol=https\nhost=x.invalid\n\n") and None,
    ),
    "core_ask_pass": Mechanism(
        lambda lab: lab.config("core.askPass", str(lab.hook(lab.tmp / "askpass", "ask", "core_ask_pass"))),
        lambda lab: git(lab.repo, "credential", "fill", input="protocol=https\nhost=x.invalid\n\n") and None,
    ),
    "include_path": Mechanism(_include, _naive_add),
    "include_if": Mechanism(_include_if, _naive_add),
    "global_config": Mechanism(
        lambda lab: None, lambda lab: _naive_add(lab, {**os.environ, **_global_config(lab)}), _global_config
    ),
    "env_git_external_diff": Mechanism(
        lambda lab: None,
        lambda lab: _naive_diff(lab, {**os.environ, "GIT_EXTERNAL_DIFF": lab.command("env_git_external_diff")}),
        lambda lab: {"GIT_EXTERNAL_DIFF": lab.command("env_git_external_diff")},
    ),
    "env_git_config_parameters": Mechanism(
        lambda lab: None,
        lambda lab: _naive_add(lab, {**os.environ, **_config_env(lab)}),
        lambda lab: _config_env(lab),
    ),
}


def _config_env(lab: Lab) -> dict[str, str]:
    return {
        "GIT_CONFIG_COUNT": "1",
        "GIT_CONFIG_KEY_0": "core.fsmonitor",
        "GIT_CONFIG_VALUE_0": lab.command("env_git_config_parameters"),
    }


async def _writer_diff(lab: Lab, cwd: Path | None = None) -> str | None:
    """The server's view of one writer step that edits parse.py and adds a test file."""
    cwd = cwd or lab.repo
    with anyio.fail_after(DEADLINE_S):
        before = await workspace.snapshot(cwd, (lab.tmp,))
        (lab.repo / "parse.py").write_text(EDITED, encoding="utf-8")
        (lab.repo / "test_parse.py").write_text("def test_empty():\n    assert parse('') == []\n", encoding="utf-8")
        after = await workspace.snapshot(cwd, (lab.tmp,))
        assert before is not None and after is not None and before != after
        return await workspace.diff(cwd, (lab.tmp,), before, after, 100_000)


def _shows_the_writers_change(text: str | None) -> None:
    assert text is not None
    assert "+    if not s:" in text and "+        return []" in text
    assert "b/test_parse.py" in text and "+def test_empty():" in text
    assert "notes.txt" not in text, "only what the writer changed"


@pytest.mark.anyio
@pytest.mark.parametrize("name", sorted(MECHANISMS))
async def test_no_program_the_repository_names_runs_and_the_diff_is_intact(
    lab: Lab, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    mechanism = MECHANISMS[name]
    mechanism.plant(lab)
    mechanism.arm(lab)
    assert name in lab.fired(), f"the planted {name} command is not armed: ordinary git did not run it"
    for marker in lab.markers.iterdir():
        marker.unlink()
    for key, value in mechanism.env(lab).items():
        monkeypatch.setenv(key, value)

    text = await _writer_diff(lab)

    assert lab.fired() == [], "the server's git ran a planted command"
    _shows_the_writers_change(text)


@pytest.mark.anyio
async def test_git_children_get_no_credential_of_the_server(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    # A `git` first on PATH records the environment each git child was given, then runs the real git.
    real_git = subprocess.run(["sh", "-c", "command -v git"], capture_output=True, text=True, check=True).stdout.strip()
    wrapper_dir = lab.tmp / "bin"
    wrapper_dir.mkdir()
    envs = lab.tmp / "git-envs"
    envs.mkdir()
    (wrapper_dir / "git").write_text(
        f'#!/bin/sh\nenv > "$(mktemp {shlex.quote(str(envs))}/env.XXXXXX)"\nexec {shlex.quote(real_git)} "$@"\n',
        encoding="utf-8",
    )
    (wrapper_dir / "git").chmod(0o755)
    monkeypatch.setenv("PATH", f"{wrapper_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("HOME", str(lab.tmp / "home"))
    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)

    _shows_the_writers_change(await _writer_diff(lab))

    recorded = [p.read_text(encoding="utf-8") for p in envs.iterdir()]
    assert len(recorded) >= 3, "every git child went through the recording wrapper"
    for env_text in recorded:
        names = {line.partition("=")[0] for line in env_text.splitlines()}
        for key, value in CREDENTIALS.items():
            assert key not in names and value not in env_text, f"{key} reached a git child"
        assert f"HOME={lab.tmp / 'home'}\n" not in env_text, "the user's home (and its .gitconfig) stays out of reach"
        assert "GIT_CONFIG_GLOBAL=/dev/null" in env_text and "GIT_CONFIG_NOSYSTEM=1" in env_text


@pytest.mark.anyio
async def test_a_review_run_with_every_plant_at_once_shows_the_diff_and_runs_none(
    lab: Lab, make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    for mechanism in MECHANISMS.values():
        mechanism.plant(lab)
        for key, value in mechanism.env(lab).items():
            monkeypatch.setenv(key, value)
    assert lab.fired() == []

    def respond(req: StepRequest) -> Reply:
        if "You are the reviewer" in req.prompt:
            return Reply("Fine.\nVERDICT: APPROVE")
        assert req.working_directory is not None
        (req.working_directory / "parse.py").write_text(EDITED, encoding="utf-8")
        (req.working_directory / "test_parse.py").write_text("def test_empty():\n    pass\n", encoding="utf-8")
        return Reply("Handled empty input.")

    cli = ScriptedRuntime("cli", respond=respond)
    with anyio.fail_after(DEADLINE_S):
        async with WorkerOrchestrator(make_settings(), runtimes={"cli": cli}) as orch:
            await orch.register_worker(WorkerSpec(name="c", model="codex_cli"))
            await orch.register_worker(WorkerSpec(name="g", model="gemini_cli"))
            run = await orch.dispatch(
                DispatchRequest(task="t", strategy="codex_writes_gemini_reviews", working_directory=str(lab.repo))
            )
    assert run.status == "completed" and run.verdict == "approve"
    review = cli.requests[1].prompt
    assert "+    if not s:" in review and "b/test_parse.py" in review
    assert lab.fired() == [], "a planted command ran during the run"


@pytest.mark.anyio
async def test_outside_a_repository_there_is_no_snapshot(tmp_path: Path) -> None:
    with anyio.fail_after(DEADLINE_S):
        assert await workspace.snapshot(tmp_path, (tmp_path,)) is None


@pytest.mark.anyio
async def test_a_bare_repository_has_no_working_tree_to_snapshot(lab: Lab) -> None:
    bare = lab.repo / "mirror.git"  # inside a working tree: git stops at the bare repository, so do we
    assert git(lab.tmp, "clone", "-q", "--bare", str(lab.repo), str(bare)).returncode == 0
    with anyio.fail_after(DEADLINE_S):
        assert await workspace.snapshot(bare, (lab.tmp,)) is None
        assert await workspace.snapshot(lab.repo, (lab.tmp,)) is not None


@pytest.mark.anyio
async def test_a_linked_worktree_inside_the_roots_is_followed(lab: Lab) -> None:
    linked = lab.tmp / "linked"
    assert git(lab.repo, "worktree", "add", "-q", str(linked)).returncode == 0
    lab.config("core.fsmonitor", lab.command("worktree_fsmonitor"))
    with anyio.fail_after(DEADLINE_S):
        before = await workspace.snapshot(linked, (lab.tmp,))
        (linked / "parse.py").write_text(EDITED, encoding="utf-8")
        after = await workspace.snapshot(linked, (lab.tmp,))
        assert before and after
        text = await workspace.diff(linked, (lab.tmp,), before, after, 100_000)
    assert text is not None and "+    if not s:" in text
    assert lab.fired() == []


@pytest.mark.anyio
async def test_a_git_file_pointing_outside_the_roots_is_not_followed(lab: Lab) -> None:
    roots = lab.tmp / "roots"
    work = roots / "work"
    work.mkdir(parents=True)
    (work / ".git").write_text(f"gitdir: {lab.repo / '.git'}\n", encoding="utf-8")
    (work / "secret-copy.txt").write_text("written into someone else's object store?\n", encoding="utf-8")
    objects_before = sorted((lab.repo / ".git" / "objects").rglob("*"))
    with anyio.fail_after(DEADLINE_S):
        assert await workspace.snapshot(work, (roots,)) is None
    assert sorted((lab.repo / ".git" / "objects").rglob("*")) == objects_before, "nothing written outside the roots"


@pytest.mark.anyio
async def test_a_git_entry_that_is_a_fifo_or_a_climbing_ref_neither_hangs_nor_escapes(lab: Lab) -> None:
    fifo_tree = lab.tmp / "fifo"
    fifo_tree.mkdir()
    os.mkfifo(fifo_tree / ".git")
    (lab.repo / ".git" / "HEAD").write_text("ref: refs/../../../../etc/passwd\n", encoding="utf-8")
    with anyio.fail_after(DEADLINE_S):
        assert await workspace.snapshot(fifo_tree, (lab.tmp,)) is None
        text = await _writer_diff(lab)
    _shows_the_writers_change(text)


@pytest.mark.anyio
async def test_a_flood_of_diff_is_cut_to_the_limit(lab: Lab) -> None:
    with anyio.fail_after(DEADLINE_S):
        before = await workspace.snapshot(lab.repo, (lab.tmp,))
        (lab.repo / "big.txt").write_text("".join(f"line {i}\n" for i in range(200_000)), encoding="utf-8")
        after = await workspace.snapshot(lab.repo, (lab.tmp,))
        assert before and after
        text = await workspace.diff(lab.repo, (lab.tmp,), before, after, 10_000)
    assert text is not None and text.endswith("[... diff truncated ...]\n")
    assert "+line 0\n" in text and len(text) < 10_100


@pytest.mark.anyio
async def test_a_sha256_repository_is_snapshotted_in_its_own_object_format(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    assert git(tmp_path, "init", "-q", "--object-format=sha256", str(repo)).returncode == 0
    (repo / "a.txt").write_text("old\n", encoding="utf-8")
    assert git(repo, "add", ".").returncode == 0 and git(repo, "commit", "-qm", "init").returncode == 0
    with anyio.fail_after(DEADLINE_S):
        before = await workspace.snapshot(repo, (tmp_path,))
        (repo / "a.txt").write_text("new\n", encoding="utf-8")
        after = await workspace.snapshot(repo, (tmp_path,))
        assert before is not None and after is not None and len(after) == 64
        text = await workspace.diff(repo, (tmp_path,), before, after, 10_000)
    assert text is not None and "-old\n+new\n" in text
    assert git(repo, "fsck", "--no-progress").returncode == 0, "the repository's object store is sound"
