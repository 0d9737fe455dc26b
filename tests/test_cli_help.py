"""Every `tensorgate` command and option explains itself: a description per command, help per
argument, defaults shown, -c/--config wherever a config is taken, --log-level with its choices
(a wrong one is a usage error, not a traceback); and docs/config.schema.json is the proto's."""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess

import pytest

from gateway.cli import LOG_LEVELS, build_parser
from tests.backends.triton import REPO_ROOT
from tests.gateway_process import TENSORGATE


def commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command path, its parser) for every command and subcommand."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from commands(sub, (*path, name))


ALL = list(commands(build_parser()))
IDS = [" ".join(path) or "tensorgate" for path, _ in ALL]


def test_every_command_is_listed():
    names = {" ".join(path) for path, _ in ALL}
    for expected in ("serve", "check-config", "envoy-bootstrap", "drift baseline", "admin routes",
                     "admin apply", "admin rollout", "admin backends", "admin drain"):  # fmt: skip
        assert expected in names


@pytest.mark.parametrize(("path", "parser"), ALL, ids=IDS)
def test_every_command_has_a_description_and_every_argument_help(path, parser):
    assert parser.description and len(parser.description) > 20, path
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._VersionAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                assert choice.help, (path, choice.dest)
            continue
        assert action.help, (path, action.dest)


@pytest.mark.parametrize(("path", "parser"), ALL, ids=IDS)
def test_defaults_are_shown(path, parser):
    text = parser.format_help()
    for action in parser._actions:
        default = action.default
        if not action.option_strings or default in (None, False, "", argparse.SUPPRESS):
            continue
        shown = str(default)
        assert shown in text, (path, action.option_strings, shown)


@pytest.mark.parametrize(
    ("command", "defaults"),
    [
        (["admin", "--help"], ["default: 127.0.0.1:8002", "default: TENSORGATE_ADMIN_TOKEN"]),
        (["admin", "rollout", "--help"], ["default: 5,25,50,100", "default: 30.0"]),
        (["serve", "--help"], ["DEBUG,INFO,WARNING,ERROR,CRITICAL", "default: INFO"]),
    ],
)
def test_named_defaults_in_the_help_text(command, defaults):
    run = subprocess.run([TENSORGATE, *command], capture_output=True, text=True, timeout=30)
    assert run.returncode == 0
    text = " ".join(run.stdout.split())
    for expected in defaults:
        assert expected in text, (command, expected, run.stdout)


def test_top_level_help_says_what_tensorgate_is():
    run = subprocess.run([TENSORGATE, "--help"], capture_output=True, text=True, timeout=30)
    assert "gRPC inference gateway" in run.stdout and "check-config" in run.stdout
    assert "serve, check-config" not in run.stdout  # the stale one-liner


def test_every_command_that_takes_a_config_takes_dash_c():
    for path, parser in ALL:
        options = {o for action in parser._actions for o in action.option_strings}
        takes_config = any(a.dest in ("config", "file") for a in parser._actions)
        if takes_config and path[:1] != ("admin",):
            assert {"-c", "--config"} <= options, path


def test_check_config_takes_the_file_either_way(tmp_path):
    config = REPO_ROOT / "deploy" / "demo" / "gateway.yaml"
    for args in (["check-config", config], ["check-config", "-c", config],
                 ["check-config", "--config", config]):  # fmt: skip
        run = subprocess.run([TENSORGATE, *map(str, args)], capture_output=True, text=True)
        assert run.returncode == 0 and ": OK (1 backends, 3 routes, 5 variants)" in run.stdout
    both = subprocess.run([TENSORGATE, "check-config", config, "-c", config], capture_output=True,
                          text=True)  # fmt: skip
    assert both.returncode == 2 and "once" in both.stderr


def test_a_wrong_log_level_is_a_usage_error_not_a_traceback(tmp_path):
    run = subprocess.run(
        [TENSORGATE, "serve", "-c", "x.yaml", "--log-level", "verbose"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "invalid choice: 'VERBOSE'" in run.stderr and "WARNING" in run.stderr
    assert LOG_LEVELS == ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def test_config_schema_matches_the_proto():
    spec = importlib.util.spec_from_file_location(
        "gen_config_schema", REPO_ROOT / "scripts" / "gen_config_schema.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    committed = (REPO_ROOT / "docs" / "config.schema.json").read_text()
    assert committed == module.render(), "run scripts/gen_config_schema.py"
    schema = json.loads(committed)
    variant = schema["$defs"]["Variant"]["properties"]
    assert variant["weight"] == {"type": "integer", "minimum": 0, "maximum": 4294967295}
    assert (
        "backend_model" in variant and schema["$defs"]["Variant"]["additionalProperties"] is False
    )
    kind = schema["$defs"]["Backend"]["properties"]["kind"]["enum"]
    assert "BACKEND_KIND_TRITON" in kind
    timeout = schema["$defs"]["Backend"]["properties"]["per_try_timeout"]
    assert timeout["type"] == "string" and timeout["pattern"].endswith("s$")
