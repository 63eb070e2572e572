from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import platformdirs
import pytest

from runner.config import ConfigError, Settings, build_parser, load_settings, main_error
from runner.queues.matcher import DEFAULT_MATCH
from runner.units import DURATION_FORM, SIZE_FORM

GIB = 2**30


def problems_of(argv: list[str], environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_settings(argv, environ or {})
    return caught.value.problems


# --- defaults and sources ------------------------------------------------------------------------------------------


def test_defaults_with_an_empty_environment() -> None:
    s = load_settings([], {})
    cache = platformdirs.user_cache_path("studio-runner")
    assert s.working_dir == cache / "work"
    assert s.cache_dir == cache / "artifacts"
    assert s.env_cache_dir == cache / "envs"
    assert s.queue_root == Path.home() / ".studioml" / "queue"
    assert (s.queue_match, s.queue_mismatch) == (DEFAULT_MATCH, "")
    assert s.cache_size == 10 * GIB
    assert (s.max_cores, s.max_mem, s.max_disk) == (0, 0, 0)
    assert (s.cpu_only, s.debug, s.allow_env_secrets) == (False, False, False)
    assert (s.prom_address, s.log_format) == (":9090", "auto")
    assert (s.limit_tasks, s.limit_idle_duration, s.limit_interval) == (0, 0.0, 300.0)
    assert (s.stop_grace, s.drain_timeout, s.status_interval) == (30.0, 30.0, 10.0)
    assert (s.retry_failed, s.max_deliveries, s.poll_interval) == (0, 5, 1.0)


def test_queue_root_defaults_to_the_studioml_clients_queue_under_studioml_home(tmp_path: Path) -> None:
    assert load_settings([], {"STUDIOML_HOME": str(tmp_path)}).queue_root == tmp_path / "queue"


def test_environment_fills_every_option_not_on_the_command_line(tmp_path: Path) -> None:
    env = {
        "WORKING_DIR": str(tmp_path / "w"),
        "QUEUE_MATCH": "^local_.*$",
        "QUEUE_MISMATCH": "_test$",
        "CACHE_SIZE": "2gib",
        "MAX_DISK": "100gb",
        "CPU_ONLY": "true",
        "LIMIT_TASKS": "3",
        "LIMIT_IDLE_DURATION": "10m",
        "LOG_FORMAT": "json",
        "PROM_ADDRESS": "127.0.0.1:0",
    }
    s = load_settings([], env)
    assert s.working_dir == tmp_path / "w"
    assert (s.queue_match, s.queue_mismatch) == ("^local_.*$", "_test$")
    assert (s.cache_size, s.max_disk) == (2 * GIB, 100 * 10**9)
    assert s.cpu_only is True
    assert (s.limit_tasks, s.limit_idle_duration) == (3, 600.0)
    assert (s.log_format, s.prom_address) == ("json", "127.0.0.1:0")


def test_command_line_beats_environment() -> None:
    s = load_settings(["--queue-match", "^sqs_.*$", "--debug=false"], {"QUEUE_MATCH": "^rmq_.*$", "DEBUG": "true"})
    assert (s.queue_match, s.debug) == ("^sqs_.*$", False)


def test_a_bad_environment_value_is_ignored_when_the_command_line_gives_the_option() -> None:
    assert load_settings(["--cache-size", "1gib"], {"CACHE_SIZE": "lots"}).cache_size == GIB


def test_an_empty_environment_variable_counts_as_unset() -> None:
    assert load_settings([], {"CACHE_SIZE": "", "MAX_CORES": " "}).cache_size == 10 * GIB


@pytest.mark.parametrize(
    "argv",
    [
        ["-queue-match", "^x_.*$"],
        ["-queue-match=^x_.*$"],
        ["--queue-match", "^x_.*$"],
        ["--queue-match=^x_.*$"],
    ],
)
def test_go_single_dash_and_double_dash_forms_both_work(argv: list[str]) -> None:
    assert load_settings(argv, {}).queue_match == "^x_.*$"


@pytest.mark.parametrize(("argv", "expected"), [(["-cpu-only"], True), (["-cpu-only=false"], False)])
def test_switches_take_gos_optional_value(argv: list[str], expected: bool) -> None:
    assert load_settings(argv, {"CPU_ONLY": "yes"}).cpu_only is expected


def test_a_value_that_starts_with_a_dash_is_taken_as_go_takes_it() -> None:
    assert load_settings(["-queue-mismatch", "-test$"], {}).queue_mismatch == "-test$"


@pytest.mark.parametrize("token", ["-c", "--queue", "-max"])
def test_option_names_are_never_abbreviated(token: str) -> None:
    assert any(repr(token) in p for p in problems_of([token, "1"]))


def test_build_parser_on_its_own_accepts_both_forms() -> None:
    parsed = build_parser().parse_args(["-queue-match", "a", "--cache-size", "1gb", "-debug"])
    assert (parsed.queue_match, parsed.cache_size, parsed.debug) == ("a", "1gb", "true")


# --- values ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"), [("16gib", 16 * GIB), ("512gb", 512 * 10**9), ("10Gib", 10 * GIB), ("1.5 GB", 1_500_000_000)]
)
def test_sizes_use_go_humanize_notation(text: str, size: int) -> None:
    assert load_settings(["--cache-size", text], {}).cache_size == size
    assert load_settings([], {"MAX_DISK": text}).max_disk == size


def test_cache_size_zero_disables_the_cache() -> None:
    assert load_settings([], {"CACHE_SIZE": "0"}).cache_size == 0


@pytest.mark.parametrize(("text", "seconds"), [("1h30m", 5400.0), ("90s", 90.0), ("2d", 172800.0), ("250ms", 0.25)])
def test_durations_use_go_notation_plus_days(text: str, seconds: float) -> None:
    assert load_settings(["--limit-idle-duration", text], {}).limit_idle_duration == seconds
    assert load_settings([], {"DRAIN_TIMEOUT": text}).drain_timeout == seconds


@pytest.mark.parametrize(
    ("text", "expected"),
    [("true", True), ("TRUE", True), ("1", True), ("Yes", True), ("false", False), ("0", False), ("NO", False)],
)
def test_environment_booleans(text: str, expected: bool) -> None:
    assert load_settings([], {"ALLOW_ENV_SECRETS": text}).allow_env_secrets is expected


def test_paths_expand_home_and_variables_from_the_given_environment(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path), "DATA": str(tmp_path / "data")}
    s = load_settings(["--cache-dir", "~/c", "--queue-root", "${DATA}/q", "--working-dir", "$DATA/w"], env)
    assert (s.cache_dir, s.queue_root, s.working_dir) == (tmp_path / "c", tmp_path / "data/q", tmp_path / "data/w")


def test_relative_paths_are_made_absolute() -> None:
    assert load_settings(["--working-dir", "work"], {}).working_dir == Path.cwd() / "work"


@pytest.mark.parametrize(
    ("text", "listen"),
    [
        (":9090", ("", 9090)),
        ("127.0.0.1:0", ("127.0.0.1", 0)),
        ("[::1]:9100", ("::1", 9100)),
        ("off", None),
        ("", None),
    ],
)
def test_prom_address_forms(text: str, listen: tuple[str, int] | None) -> None:
    assert load_settings(["--prom-address", text], {}).prom_listen() == listen


def test_an_empty_prom_address_in_the_environment_disables_the_http_server() -> None:
    s = load_settings([], {"PROM_ADDRESS": ""})
    assert (s.prom_address, s.prom_listen()) == ("", None)


def test_blank_queue_mismatch_excludes_nothing() -> None:
    matcher = load_settings([], {"QUEUE_MISMATCH": "  "}).queue_matcher()
    assert matcher("local_a") and not matcher("other")


def test_log_format_is_case_insensitive() -> None:
    assert load_settings(["--log-format", "JSON"], {}).log_format == "json"


# --- problems ----------------------------------------------------------------------------------------------------


def test_all_problems_are_reported_together_each_naming_option_env_var_and_form() -> None:
    problems = problems_of(["--cache-size", "abc", "--limit-idle-duration", "soon"], {"MAX_MEM": "lots"})
    assert len(problems) == 3
    size, mem, idle = (
        next(p for p in problems if p.startswith(f"--{flag} "))
        for flag in ("cache-size", "max-mem", "limit-idle-duration")
    )
    assert "(CACHE_SIZE)" in size and "'abc'" in size and SIZE_FORM in size
    assert "(from MAX_MEM)" in mem and "'lots'" in mem and SIZE_FORM in mem
    assert "(LIMIT_IDLE_DURATION)" in idle and "'soon'" in idle and DURATION_FORM in idle


def test_bad_regex_is_reported_with_the_reason() -> None:
    [problem] = problems_of([], {"QUEUE_MATCH": "(rmq"})
    assert problem.startswith("--queue-match (from QUEUE_MATCH): '(rmq' is not a valid regular expression")
    assert "expected a Python regular expression" in problem


def test_max_cores_above_the_cpu_count_is_a_problem() -> None:
    cpus = os.cpu_count() or 1
    assert load_settings(["--max-cores", str(cpus)], {}).max_cores == cpus
    [problem] = problems_of(["--max-cores", str(cpus + 1)])
    assert problem.startswith("--max-cores (MAX_CORES)") and f"{cpus} logical CPUs" in problem


def test_max_mem_above_the_machines_ram_is_a_problem() -> None:
    [problem] = problems_of([], {"MAX_MEM": "1eib"})
    assert problem.startswith("--max-mem (from MAX_MEM): '1eib' is more than the") and "of RAM" in problem


def test_invalid_environment_boolean_is_a_problem() -> None:
    [problem] = problems_of([], {"CPU_ONLY": "perhaps"})
    assert problem.startswith("--cpu-only (from CPU_ONLY): 'perhaps' is not a boolean; expected true or false")


@pytest.mark.parametrize(
    ("env", "flag"),
    [
        ({"MAX_CORES": "-1"}, "max-cores"),
        ({"RETRY_FAILED": "-2"}, "retry-failed"),
        ({"STOP_GRACE": "-5s"}, "stop-grace"),
        ({"MAX_DELIVERIES": "0"}, "max-deliveries"),
        ({"POLL_INTERVAL": "0"}, "poll-interval"),
        ({"STATUS_INTERVAL": "0s"}, "status-interval"),
        ({"LIMIT_TASKS": "many"}, "limit-tasks"),
        ({"LOG_FORMAT": "xml"}, "log-format"),
        ({"PROM_ADDRESS": "localhost"}, "prom-address"),
        ({"PROM_ADDRESS": "::1:80"}, "prom-address"),
        ({"PROM_ADDRESS": ":99999"}, "prom-address"),
    ],
)
def test_out_of_range_and_malformed_values_are_problems(env: dict[str, str], flag: str) -> None:
    [problem] = problems_of([], env)
    assert problem.startswith(f"--{flag} (from {next(iter(env))}): ") and "; expected " in problem


def test_an_unset_variable_in_a_path_is_a_problem() -> None:
    [problem] = problems_of(["--working-dir", "${SCRATCH}/w"])
    assert problem.startswith("--working-dir (WORKING_DIR): '${SCRATCH}/w' refers to $SCRATCH, which is not set")


def test_a_path_that_is_a_file_is_a_problem(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    [problem] = problems_of([], {"CACHE_DIR": str(tmp_path / "f")})
    assert "exists and is not a directory" in problem


def test_an_empty_value_on_the_command_line_is_a_problem() -> None:
    [problem] = problems_of(["--cache-size="])
    assert problem.startswith("--cache-size (CACHE_SIZE): '' is empty")


def test_unknown_arguments_are_reported_with_a_suggestion() -> None:
    problems = problems_of(["--queue-matches", "x", "--frobnicate", "stray"], {"CACHE_SIZE": "abc"})
    assert problems[0] == "unknown option '--queue-matches'; did you mean --queue-match?"
    assert problems[1].startswith("unknown option '--frobnicate'")
    assert problems[2].startswith("--cache-size (from CACHE_SIZE)")
    assert len(problems) == 3  # "x" and "stray" read as the values of the unknown options


def test_a_stray_positional_argument_is_reported() -> None:
    assert problems_of(["--debug", "stray"]) == ["unexpected argument 'stray'; options take the form --name value"]


def test_an_option_missing_its_value_is_reported_with_the_rest() -> None:
    problems = problems_of(["--max-cores", "-1", "--stop-grace"])
    assert len(problems) == 2
    assert any(p.startswith("--stop-grace (STOP_GRACE): needs a value; expected") for p in problems)


@pytest.mark.parametrize("flag", ["--help", "-h", "-help"])
def test_help_exits_0_and_names_every_environment_variable(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        load_settings([flag], {})
    assert caught.value.code == 0
    out = capsys.readouterr().out
    for env in ("QUEUE_MATCH", "CACHE_SIZE", "MAX_DISK", "CPU_ONLY", "LIMIT_IDLE_DURATION", "PROM_ADDRESS", "DEBUG"):
        assert env in out
    assert "python -m runner" in out and "default: 10gib" in out and "job mode" in out


def test_main_error_lists_one_problem_per_line() -> None:
    text = main_error(ConfigError(["first", "second"]))
    assert text == "studio-runner: invalid configuration:\n  - first\n  - second"


# --- summary -----------------------------------------------------------------------------------------------------


def test_summary_is_text_with_humanised_sizes_and_durations() -> None:
    s: Settings = load_settings(["--max-mem", "16gib", "--prom-address", "off"], {"POLL_INTERVAL": "1s"})
    summary = s.summary()
    assert set(summary) == {f.name for f in dataclasses.fields(Settings)}  # every setting, whoever adds one
    assert all(isinstance(v, str) for v in summary.values())
    assert summary["max_mem"] == "16.0 GiB" and summary["cache_size"] == "10.0 GiB"
    assert summary["max_disk"] == "0 (free space)"
    assert summary["poll_interval"] == "1s" and summary["limit_interval"] == "5m0s"
    assert summary["prom_address"] == "off" and summary["cpu_only"] == "false"
    assert summary["working_dir"] == str(s.working_dir)


def test_file_roots_are_a_comma_separated_list_of_directories(tmp_path: Path) -> None:
    assert load_settings([], {}).file_roots == ()
    s = load_settings(["--file-roots", f"{tmp_path}/a, ~/studio"], {"HOME": str(tmp_path)})
    assert s.file_roots == (tmp_path / "a", tmp_path / "studio")
    (tmp_path / "f").write_text("")
    with pytest.raises(ConfigError, match="file-roots"):
        load_settings(["--file-roots", str(tmp_path / "f")], {})
