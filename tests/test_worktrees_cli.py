"""`agent-parallel worktrees` and `agent-parallel worktrees clean [--dry-run]`, and the new config keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent_parallel.cli.main import main
from agent_parallel.config import Config, ConfigError, load_config
from agent_parallel.worktrees import integrate, prepare, release
from worktree_helpers import agent, config, git, make_repo


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = make_repo(tmp_path / "ws")
    done = prepare(root, config(), "001", "done")
    agent(done, "echo x >> a.txt")
    assert integrate(root, config(), done, "Done").ok
    work = prepare(root, config(), "002", "work")
    agent(work, "echo y >> b.txt && git commit -qam y")
    loose = prepare(root, config(), "003", "loose")
    agent(loose, "echo z > new.txt")
    for lease in (done, work, loose):
        release(root, lease)
    return root


def test_worktrees_lists_state_and_safety(repo: Path, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "250")
    assert main(["worktrees", "--root", str(repo), "--json"]) == 0
    listed = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert {name: (row["state"], row["ahead"], row["safe"]) for name, row in listed.items()} == {
        "001-done": ("clean", 0, True), "002-work": ("clean", 1, False), "003-loose": ("untracked", 0, False)}
    assert main(["worktrees", "--root", str(repo)]) == 0
    table = capsys.readouterr().out
    assert "agent/002-work" in table and "1 commit not in main" in table


def test_clean_dry_run_removes_nothing_and_clean_removes_only_safe_ones(repo: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    folder = repo / ".agent/worktrees"
    assert main(["worktrees", "clean", "--root", str(repo), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"would remove {folder / '001-done'} (its commits are in main)" in out
    assert f"kept {folder / '002-work'}: 1 commit not in main" in out
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == ["001-done", "002-work", "003-loose"]
    assert main(["worktrees", "clean", "--root", str(repo)]) == 0
    out = capsys.readouterr().out
    assert f"removed {folder / '001-done'} and branch agent/001-done" in out
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == ["002-work", "003-loose"]
    assert git(repo, "for-each-ref", "--format=%(refname:short)", "refs/heads/agent/").split() == [
        "agent/002-work", "agent/003-loose"]
    assert (folder / "003-loose/new.txt").exists()


def test_worktrees_outside_a_git_repository_is_a_clear_error(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["worktrees", "--root", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (f"agent-parallel: error: .agent/config.yaml: runner.isolation is worktree, "
                                       f"which needs the workspace {tmp_path} to be a git repository with a working "
                                       "tree; run git init there (and commit once), or set runner.isolation: none\n")


# --- configuration ---------------------------------------------------------------------------------------------


def write_config(root: Path, text: str) -> None:
    (root / ".agent").mkdir(parents=True, exist_ok=True)
    (root / ".agent/config.yaml").write_text(text)


def test_isolation_defaults(tmp_path: Path) -> None:
    cfg, _ = load_config(tmp_path)
    assert (cfg.isolation, cfg.integration_strategy, cfg.integration_target, cfg.worktree_ports) == \
        ("none", "rebase", None, None)
    assert (cfg.worktree_copy, cfg.worktree_link, cfg.worktree_setup, cfg.integration_verify) == ((), (), None, None)
    assert (cfg.integration_allow_overlap, cfg.integration_author) == (False, None)


def test_every_isolation_key(tmp_path: Path) -> None:
    write_config(tmp_path, """
runner:
  isolation: worktree
worktree:
  copy: [".env*", "config/local.yaml"]
  link: node_modules
  setup: npm ci
  ports: 4100-4199
integration:
  target: refs/heads/develop
  strategy: Squash
  verify: pytest -q
  allow_overlap: true
  author: Agent Smith <agent@example.com>
""")
    assert load_config(tmp_path) == (Config(
        isolation="worktree", worktree_copy=(".env*", "config/local.yaml"), worktree_link=("node_modules",),
        worktree_setup="npm ci", worktree_ports=(4100, 4199), integration_target="develop",
        integration_strategy="squash", integration_verify="pytest -q", integration_allow_overlap=True,
        integration_author="Agent Smith <agent@example.com>"), [])


@pytest.mark.parametrize(("text", "message"), [
    ("runner:\n  isolation: docker\n", "runner.isolation must be none or worktree, not 'docker'"),
    ("worktree:\n  copy: {a: 1}\n", "worktree.copy must be a list of paths or globs relative to the workspace root, "
                                    "not a mapping"),
    ("worktree:\n  copy: ['../secrets']\n", "worktree.copy '../secrets' must be relative to the workspace root and "
                                            "stay inside it (no leading / and no ..)"),
    ("worktree:\n  link: [/usr/lib]\n", "worktree.link '/usr/lib' must be relative to the workspace root and stay "
                                        "inside it (no leading / and no ..)"),
    ("worktree:\n  copy: [.agent/runs]\n", "worktree.copy '.agent/runs' names git's or agent-parallel's own files; "
                                           "list your project's files instead"),
    ("worktree:\n  setup: ''\n", "worktree.setup must be a non-empty string, not ''"),
    ("worktree:\n  ports: lots\n", "worktree.ports must be a range of ports, not 'lots' (write a range of ports "
                                   "such as \"4100-4199\")"),
    ("worktree:\n  ports: 4199-4100\n", "worktree.ports must be a range of ports between 1 and 65535, the first not "
                                        "above the last, not '4199-4100' (write a range of ports such as "
                                        "\"4100-4199\")"),
    ("worktree:\n  ports: 0-10\n", "worktree.ports must be a range of ports between 1 and 65535, the first not "
                                   "above the last, not '0-10' (write a range of ports such as \"4100-4199\")"),
    ("integration:\n  target: 'a..b'\n", "integration.target 'a..b' is not a valid git branch name; write a branch "
                                         "name such as main"),
    ("integration:\n  target: 'feature branch'\n", "integration.target 'feature branch' is not a valid git branch "
                                                   "name; write a branch name such as main"),
    ("integration:\n  strategy: octopus\n", "integration.strategy must be rebase, merge or squash, not 'octopus'"),
    ("integration:\n  verify: [pytest]\n", "integration.verify must be a non-empty string, not a list"),
    ("integration:\n  allow_overlap: maybe\n", "integration.allow_overlap must be true or false, not 'maybe'"),
    ("integration:\n  author: agent\n", "integration.author must be written Name <email>, not 'agent'"),
    ("worktree: [a]\n", "worktree must be a mapping of settings, not a list"),
])
def test_bad_isolation_values_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    write_config(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path)
    assert str(caught.value) == ".agent/config.yaml: " + message


def test_a_typo_in_an_isolation_key_is_a_warning_with_a_suggestion(tmp_path: Path) -> None:
    write_config(tmp_path, "integration:\n  strategi: merge\n")
    assert load_config(tmp_path)[1] == ["unknown key integration.strategi ignored; did you mean strategy?"]
