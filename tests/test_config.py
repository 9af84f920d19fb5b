"""`.agent/config.yaml`: defaults, both spellings, clamping, and an exact message for every bad value."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent_parallel.config import Config, ConfigError, load_config, parse_duration, parse_size
from agent_parallel.errors import PathOutsideWorkspace, QueueError

MIB = 1024 * 1024


def write_config(root: Path, text: str | bytes) -> None:
    path = root / ".agent" / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)


def test_missing_file_means_defaults(tmp_path: Path) -> None:
    config, warnings = load_config(tmp_path)
    assert config == Config()
    assert warnings == []
    assert (config.level, config.max_parallel, config.continue_on_error) == ("L2", 5, None)
    assert (config.min_free_memory, config.max_load, config.queue_dir) == (256 * MIB, None, ".agent/queue")
    assert (config.wait_cap_s, config.log_cap_bytes, config.max_tasks) == (50, 64 * MIB, 10_000)
    assert config.stops_on_first_failure


def test_empty_file_means_defaults(tmp_path: Path) -> None:
    write_config(tmp_path, "# nothing set\n")
    assert load_config(tmp_path) == (Config(), [])


def test_every_key(tmp_path: Path) -> None:
    write_config(tmp_path, """
autonomy:
  level: L3
  max_parallel: 3
  continue_on_error: true
runner:
  command: ["claude", "-p"]
  timeout: 2h
queue:
  dir: work/queue
resources:
  min_free_memory: 512MiB
  max_load: 6.5
tasks:
  wait_cap: 40s
  log_cap: 8MB
  max_tasks: 50
""")
    config, warnings = load_config(tmp_path)
    assert warnings == []
    assert config == Config(level="L3", max_parallel=3, continue_on_error=True, runner_command=["claude", "-p"],
                            runner_timeout_s=7200, queue_dir="work/queue", min_free_memory=512 * MIB,
                            max_load=6.5, wait_cap_s=40, log_cap_bytes=8_000_000, max_tasks=50)
    assert not config.stops_on_first_failure


def test_origin_l3_settings_are_read_where_autonomy_keys_are_absent(tmp_path: Path) -> None:
    write_config(tmp_path, "autonomy:\n  level: L3\n  l3_settings:\n    max_parallel: 4\n    continue_on_error: true\n")
    config, _ = load_config(tmp_path)
    assert (config.max_parallel, config.continue_on_error) == (4, True)


def test_autonomy_keys_win_over_l3_settings(tmp_path: Path) -> None:
    write_config(tmp_path, "autonomy:\n  max_parallel: 2\n  continue_on_error: false\n"
                           "  l3_settings:\n    max_parallel: 9\n    continue_on_error: true\n")
    config, _ = load_config(tmp_path)
    assert (config.max_parallel, config.continue_on_error) == (2, False)


def test_runner_command_string_is_split_like_a_shell(tmp_path: Path) -> None:
    write_config(tmp_path, "runner:\n  command: claude -p --model 'big one'\n  timeout: 90\n")
    config, _ = load_config(tmp_path)
    assert config.runner_command == ["claude", "-p", "--model", "big one"]
    assert config.runner_timeout_s == 90 * 60  # a bare number is minutes


def test_resource_limits_default_to_a_memory_floor_and_no_load_limit(tmp_path: Path) -> None:
    assert (Config().min_free_memory, Config().max_load) == (256 * MIB, None)


def test_resource_limits_under_autonomy_win_over_resources(tmp_path: Path) -> None:
    write_config(tmp_path, "autonomy:\n  min_free_memory: 1GiB\n  max_load: 3\n"
                           "resources:\n  min_free_memory: 1MiB\n  max_load: 9\n")
    config, warnings = load_config(tmp_path)
    assert (config.min_free_memory, config.max_load, warnings) == (1024 * MIB, 3.0, [])


@pytest.mark.parametrize(("value", "used", "warning"), [
    (0, 1, "max_parallel 0 is outside 1..64; using 1"),
    (-3, 1, "max_parallel -3 is outside 1..64; using 1"),
    (100, 64, "max_parallel 100 is outside 1..64; using 64"),
])
def test_max_parallel_is_clamped_with_a_warning(tmp_path: Path, value: int, used: int, warning: str) -> None:
    write_config(tmp_path, f"autonomy:\n  max_parallel: {value}\n")
    config, warnings = load_config(tmp_path)
    assert config.max_parallel == used
    assert warnings == [warning]


def test_continue_on_error_below_l3_is_ignored_with_a_warning(tmp_path: Path) -> None:
    write_config(tmp_path, "autonomy:\n  level: L2\n  continue_on_error: true\n")
    config, warnings = load_config(tmp_path)
    assert config.stops_on_first_failure
    assert warnings == ["continue_on_error is true but level is L2; it is honoured at L3 only, "
                        "so the first failure stops the run (at L3 runs continue past failures unless "
                        "continue_on_error is false)"]


def test_unknown_keys_are_ignored_with_a_suggestion(tmp_path: Path) -> None:
    write_config(tmp_path, "autonomy:\n  max_paralel: 3\ncolour: blue\n")
    config, warnings = load_config(tmp_path)
    assert config.max_parallel == 5
    assert warnings == [
        "unknown key colour ignored (known: autonomy, runner, queue, resources, tasks, worktree, integration, executor, ray)",
        "unknown key autonomy.max_paralel ignored; did you mean max_parallel?",
    ]


@pytest.mark.parametrize(("text", "message"), [
    ("- a\n- b\n", ".agent/config.yaml: must be a mapping of settings (key: value lines), not a list"),
    ("just text\n", ".agent/config.yaml: must be a mapping of settings (key: value lines), not a string"),
    ("autonomy: 3\n", ".agent/config.yaml: autonomy must be a mapping of settings, not a number"),
    ("autonomy:\n  l3_settings: yes\n", ".agent/config.yaml: autonomy.l3_settings must be a mapping of settings, "
                                        "not true/false"),
    ("autonomy:\n  level: L4\n", ".agent/config.yaml: autonomy.level must be L1, L2 or L3, not 'L4'"),
    ("autonomy:\n  max_parallel: five\n", ".agent/config.yaml: autonomy.max_parallel must be a whole number, not 'five'"),
    ("autonomy:\n  max_parallel: 2.5\n", ".agent/config.yaml: autonomy.max_parallel must be a whole number, not 2.5"),
    ("autonomy:\n  l3_settings:\n    max_parallel: true\n",
     ".agent/config.yaml: autonomy.l3_settings.max_parallel must be a whole number, not True"),
    ("autonomy:\n  continue_on_error: 'yes'\n",
     ".agent/config.yaml: autonomy.continue_on_error must be true or false, not 'yes'"),
    ("runner:\n  command: {a: 1}\n", ".agent/config.yaml: runner.command must be a list of strings (an argv), not a mapping"),
    ("runner:\n  command: []\n", ".agent/config.yaml: runner.command must name a program; it is empty"),
    ("runner:\n  command: \"claude 'unclosed\"\n",
     ".agent/config.yaml: runner.command cannot be split into arguments: No closing quotation"),
    ("runner:\n  timeout: soon\n", ".agent/config.yaml: runner.timeout is not valid: 'soon' is not a duration "
                                   "(write 45s, 30m, 2h, 1h30m, 1:30, or a number of minutes)"),
    ("runner:\n  timeout: 0s\n", ".agent/config.yaml: runner.timeout must be longer than 0, not '0s'"),
    ("worktree:\n  setup_timeout: soon\n", ".agent/config.yaml: worktree.setup_timeout is not valid: 'soon' is not a "
                                          "duration (write 45s, 30m, 2h, 1h30m, 1:30, or a number of minutes)"),
    ("integration:\n  verify_timeout: 0\n",
     ".agent/config.yaml: integration.verify_timeout must be longer than 0, not 0"),
    ("queue:\n  dir: ''\n", ".agent/config.yaml: queue.dir must be a non-empty string, not ''"),
    ("resources:\n  min_free_memory: lots\n", ".agent/config.yaml: resources.min_free_memory is not valid: 'lots' is "
                                              "not a size (write a number of bytes, or 256MiB, 64MB, 1GiB)"),
    ("resources:\n  max_load: -1\n", ".agent/config.yaml: resources.max_load must be a number above 0, not -1"),
    ("tasks:\n  log_cap: 0\n", ".agent/config.yaml: tasks.log_cap must be at least 64KiB (65536 bytes), not 0: "
                              "a smaller cap keeps almost nothing of a task's output"),
    ("tasks:\n  max_tasks: 0\n", ".agent/config.yaml: tasks.max_tasks must be at least 1, not 0"),
])
def test_bad_values_name_the_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    write_config(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path)
    assert str(caught.value) == message
    assert isinstance(caught.value, QueueError)


def test_invalid_yaml_says_where(tmp_path: Path) -> None:
    write_config(tmp_path, "autonomy: [1, 2\n")
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path)
    # The problem text comes from libyaml or PyYAML, whichever is installed; the frame is ours.
    assert str(caught.value).startswith(".agent/config.yaml: is not valid YAML: ")
    assert str(caught.value).endswith(" (line 2, column 1)")


def test_non_utf8_config(tmp_path: Path) -> None:
    write_config(tmp_path, b"autonomy:\n  level: L\xff\n")
    with pytest.raises(ConfigError, match=r"^\.agent/config\.yaml: is not valid UTF-8 \(byte 0xff at offset 20\)$"):
        load_config(tmp_path)


def test_huge_config(tmp_path: Path) -> None:
    write_config(tmp_path, "# x\n" * 300_000)
    with pytest.raises(ConfigError, match=r"is larger than 1048576 bytes; it should be a few lines$"):
        load_config(tmp_path)


def test_config_symlinked_outside_the_workspace_is_refused(tmp_path: Path) -> None:
    root, outside = tmp_path / "ws", tmp_path / "elsewhere.yaml"
    (root / ".agent").mkdir(parents=True)
    outside.write_text("autonomy:\n  level: L3\n")
    (root / ".agent" / "config.yaml").symlink_to(outside)
    with pytest.raises(PathOutsideWorkspace, match="^config file '.agent/config.yaml' resolves outside"):
        load_config(root)


def test_repository_example_config() -> None:
    config, warnings = load_config(Path(__file__).resolve().parents[1])
    assert (config.level, config.max_parallel, config.continue_on_error, warnings) == ("L3", 3, True, [])


@pytest.mark.parametrize(("text", "seconds"), [
    ("45s", 45), ("30m", 1800), ("2h", 7200), ("1h30m", 5400), ("1h 30m", 5400), ("1.5h", 5400),
    ("90", 5400), (90, 5400), (0.5, 30), ("1:30", 5400), ("0:00:45", 45), ("2 hours", 7200),
    ("10 min", 600), ("500ms", 0.5), ("1d", 86400), (" 45S ", 45), ("0", 0),
])
def test_parse_duration(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(("value", "message"), [
    ("soon", "'soon' is not a duration (write 45s, 30m, 2h, 1h30m, 1:30, or a number of minutes)"),
    ("", "'' is not a duration (write 45s, 30m, 2h, 1h30m, 1:30, or a number of minutes)"),
    ("5 parsecs", "'5 parsecs' is not a duration (write 45s, 30m, 2h, 1h30m, 1:30, or a number of minutes)"),
    ("-5m", "'-5m' is not a duration (write 45s, 30m, 2h, 1h30m, 1:30, or a number of minutes)"),
    (-1, "-1 is not a duration: it must be a finite number, not negative"),
    (float("inf"), "inf is not a duration: it must be a finite number, not negative"),
    (True, "True is not a duration (write 45s, 30m, 2h, 1h30m, 1:30, or a number of minutes)"),
    ([1], "a duration must be text or a number, not a list (write 45s, 30m, 2h, 1h30m, 1:30, or a number of minutes)"),
])
def test_parse_duration_rejects(value: object, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_duration(value)
    assert str(caught.value) == message


@pytest.mark.parametrize(("text", "size"), [
    (10, 10), ("256MiB", 256 * MIB), ("64MB", 64_000_000), ("1G", 1024**3), ("2 KiB", 2048), ("5b", 5),
])
def test_parse_size(text: object, size: int) -> None:
    assert parse_size(text) == size


def test_server_settings_have_one_source_of_defaults(tmp_path: Path) -> None:
    """ServerSettings() is what a user without a config file gets (it used to hold no start for low
    memory while users got 256 MiB), and the server and the CLI both go through for_workspace."""
    from agent_parallel.server import ServerSettings
    assert ServerSettings() == ServerSettings.from_config(Config()) == ServerSettings.for_workspace(tmp_path)
    assert ServerSettings().min_free_memory == 256 * MIB
    write_config(tmp_path, "tasks:\n  wait_cap: 20s\n  max_tasks: 7\n")
    settings = ServerSettings.for_workspace(tmp_path, wait_cap_s=5)
    assert (settings.wait_cap_s, settings.max_records) == (5.0, 7)
    write_config(tmp_path, "autonomy: [\n")  # unusable: the defaults, and the overrides still apply
    assert ServerSettings.for_workspace(tmp_path, wait_cap_s=5) == ServerSettings(wait_cap_s=5)


def test_setup_and_verify_timeouts(tmp_path: Path) -> None:
    write_config(tmp_path, "worktree:\n  setup_timeout: 20m\nintegration:\n  verify_timeout: 1h30m\n")
    config, warnings = load_config(tmp_path)
    assert (config.worktree_setup_timeout_s, config.integration_verify_timeout_s, warnings) == (1200, 5400, [])
    assert (Config().worktree_setup_timeout_s, Config().integration_verify_timeout_s) == (None, None)  # no limit


def test_clock_durations_are_hours_and_minutes_not_base_60_numbers(tmp_path: Path) -> None:
    """YAML 1.1 reads ``1:30:00`` as the base-60 number 5400, which as minutes was 90 hours; a
    duration's ``h:mm(:ss)`` is read from the text instead (and ``1:30`` stays 1h30m)."""
    write_config(tmp_path, "runner:\n  timeout: 1:30:00\nworktree:\n  setup_timeout: 1:30\n")
    config, warnings = load_config(tmp_path)
    assert (config.runner_timeout_s, config.worktree_setup_timeout_s, warnings) == (5400, 5400, [])
    write_config(tmp_path, "runner:\n  retry_delay: 1:30.5\n")
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path)
    assert str(caught.value) == (".agent/config.yaml: runner.retry_delay is not valid: '1:30.5' is not a duration "
                                 "(write 45s, 30m, 2h, 1h30m, 1:30, or a number of minutes)")
