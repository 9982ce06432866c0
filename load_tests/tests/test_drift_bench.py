"""The drift-overhead benchmark's repositories: one per sample_fraction, each loading as the server loads it."""

from __future__ import annotations

import pathlib

import pytest

from infergate.models.config import load_model_config
from infergate.models.version import load_model_version
from load_tests.cli import build_parser
from load_tests.drift import VARIANTS, build_repositories


@pytest.fixture(scope="module")
def repositories(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    return build_repositories(tmp_path_factory.mktemp("drift-bench"), "matmul16", 500, tuple(VARIANTS))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_variant_loads_with_its_sample_fraction(repositories: dict[str, pathlib.Path], variant: str) -> None:
    directory = repositories[variant] / "matmul16"
    model = load_model_version(directory / "1", "matmul16", 1, load_model_config(directory / "config.yaml"))
    try:
        fraction = VARIANTS[variant]
        if fraction is None:
            assert model.monitor is None
        else:
            assert model.monitor is not None and model.monitor.drift is not None
            assert (model.monitor.drift.config.sample_fraction, model.monitor.drift.config.window) == (fraction, 500)
    finally:
        model.runner.close()


def test_the_command_parses_with_one_line() -> None:
    args = build_parser().parse_args(["drift-overhead", "--variants", "off,0.1", "--rounds", "1"])
    assert (args.command, args.variants, args.rounds, args.model) == ("drift-overhead", ("off", "0.1"), 1, "matmul16")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["drift-overhead", "--variants", "0.5"])
