"""The command-line tools name the same thing the same way.

``infergate-client`` and the load harness (``python -m load_tests closed|open``) both reach a
server with ``--url HOST:PORT`` (default 127.0.0.1:8001, where ``make demo`` serves) and share
``--token``, ``--timeout`` and ``--input NAME=@FILE.npy``. The harness still accepts its older
``--target`` spelling, unlisted.
"""

from __future__ import annotations

import argparse

import pytest

from infergate_client.cli import build_parser as client_parser
from load_tests.cli import build_parser as harness_parser

URL = "10.0.0.7:9001"


def _help(parser: argparse.ArgumentParser, *command: str) -> str:
    for name in command:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return parser.format_help()


@pytest.mark.parametrize("loop", ["closed", "open"])
def test_both_tools_take_the_server_as_url_with_the_same_default(loop: str) -> None:
    rate = ["--rate", "10"] if loop == "open" else []
    harness = harness_parser()
    assert harness.parse_args([loop, "--url", URL, "--model", "m", *rate]).target == URL
    assert harness.parse_args([loop, "--model", "m", *rate]).target == "127.0.0.1:8001"
    client = client_parser()
    assert client.parse_args(["--url", URL, "models"]).url == URL
    assert client.parse_args(["models"]).url == "127.0.0.1:8001"
    assert "--url" in _help(harness, loop) and "--url" in _help(client)
    assert "--target" not in _help(harness, loop)


@pytest.mark.parametrize("command", ["sequences", "soak"])
def test_harness_commands_that_start_their_own_server_take_another_one_as_url(command: str) -> None:
    harness = harness_parser()
    assert harness.parse_args([command, "--url", URL]).target == URL
    assert harness.parse_args([command, "--target", URL]).target == URL  # the older spelling, unlisted
    assert harness.parse_args([command]).target is None  # then they start one
    assert "--url" in _help(harness, command) and "--target" not in _help(harness, command)


def test_the_harness_still_accepts_the_older_target_spelling() -> None:
    args = harness_parser().parse_args(["closed", "--target", URL, "--model", "m"])
    assert args.target == URL


def test_shared_options_have_one_spelling() -> None:
    harness = _help(harness_parser(), "closed")
    client = _help(client_parser()) + _help(client_parser(), "infer")
    for option in ("--url", "--token", "--timeout", "--input", "NAME=@FILE.npy"):
        assert option in harness and option in client, option
