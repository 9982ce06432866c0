"""``infergate profile``: run a model version on a sample and write its reference profile.

    infergate profile --model-repository DIR --model NAME [--version V] --data FILE [--output PATH]

The version loads the way the server loads it (``OnnxRunner.load`` with the
model's config.yaml: providers, session options, warm-up) and runs the
sample in batches of its ``max_batch_size`` on its own instance threads. The
profile of the inputs and of what the model answered is written to
``DIR/NAME/V/reference_profile.json`` (or the file ``monitoring.drift.profile``
names, or ``--output``). Exit status: 0 written, 2 the sample or the
arguments do not fit the model, 1 the model failed to load or run.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from tqdm import tqdm

from infergate.configfile import ConfigError
from infergate.models.config import ModelConfig
from infergate.models.config_files import read_model_config
from infergate.models.runner import BatchOutcome, ModelLoadError, OnnxRunner
from infergate.monitoring.config import DEFAULT_PROFILE_NAME
from infergate.monitoring.profile import DEFAULT_BINS, build_profile, write_profile
from infergate.monitoring.readers import Sample, SampleError, read_sample
from infergate.repository.catalog import version_directory

__all__ = ["ProfileError", "add_profile_command", "profile_main", "profile_version", "run_model"]

Tensors = dict[str, npt.NDArray[Any]]


class ProfileError(Exception):
    """The model could not be run on the sample; the message says where."""


def add_profile_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The ``profile`` subcommand's arguments (its logic is :func:`profile_main`)."""
    p = commands.add_parser(
        "profile",
        help="write a model version's reference profile from a sample (for drift monitoring)",
        description="Load a model version as the server would, run it on a sample of its inputs, and write "
        "the reference profile that drift monitoring compares live traffic with (see docs/monitoring.md). "
        "Exit status: 0 written; 2 the sample or the arguments do not fit the model; 1 the model failed "
        "to load or run.",
    )
    p.add_argument("--model-repository", type=Path, required=True, metavar="DIR", help="the model repository")
    p.add_argument("--model", required=True, metavar="NAME", help="the model's directory name")
    p.add_argument("--version", type=int, metavar="V", help="version directory (default: the newest)")
    p.add_argument("--data", type=Path, required=True, metavar="FILE", help="sample: .npy, .npz, .parquet or .csv")
    p.add_argument("--output", type=Path, metavar="PATH", help="default: DIR/NAME/V/reference_profile.json")
    p.add_argument("--max-rows", type=_positive, metavar="N", help="profile the first N rows only")
    p.add_argument("--bins", type=_positive, default=DEFAULT_BINS, help=f"PSI quantile bins (default {DEFAULT_BINS})")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def profile_main(args: argparse.Namespace) -> int:
    """Run ``infergate profile``; prints where the profile went, or why not."""
    try:
        path = profile_version(
            args.model_repository,
            args.model,
            args.version,
            args.data,
            args.output,
            max_rows=args.max_rows,
            bins=args.bins,
            progress=False if args.no_progress else None,
        )
    except (ConfigError, SampleError, ValueError) as exc:
        print(f"infergate profile: {exc}", file=sys.stderr)
        return 2
    except (ModelLoadError, ProfileError, OSError) as exc:
        print(f"infergate profile: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


def profile_version(
    repository: Path,
    model: str,
    version: int | None,
    data: Path,
    output: Path | None = None,
    *,
    max_rows: int | None = None,
    bins: int = DEFAULT_BINS,
    progress: bool | None = None,
) -> Path:
    """Profile ``model`` (``version``: the newest when None) on ``data``; returns the profile's path."""
    directory = repository / model
    if not directory.is_dir():
        raise ConfigError(f"{directory}: no such model directory")
    config = read_model_config(directory)
    version = version if version is not None else _newest(directory)
    model_file = version_directory(directory, version) / config.default_model_filename
    if not model_file.is_file():
        raise ConfigError(f"{model_file}: no such file (is version {version} in the repository?)")
    runner = OnnxRunner.load(model_file, config, model, version)
    try:
        sample = read_sample(data, runner.spec, max_rows, progress)
        outputs = asyncio.run(run_model(runner, sample, progress))
    finally:
        runner.close()
    profile = build_profile(
        runner.spec, sample.inputs, outputs, source=data.name, bins=bins, feature_names=sample.feature_names
    )
    path = output or version_directory(directory, version) / _profile_name(config)
    write_profile(profile, path)
    return path


def _newest(directory: Path) -> int:
    versions = [int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isascii() and p.name.isdecimal()]
    if not versions:
        raise ConfigError(f"{directory}: no version directory")
    return max(versions)


def _profile_name(config: ModelConfig) -> str:
    drift = config.monitoring.drift
    return drift.profile if drift is not None else DEFAULT_PROFILE_NAME


async def run_model(runner: OnnxRunner, sample: Sample, progress: bool | None = None) -> Tensors:
    """Every output for every sample row, computed on the runner's instance threads in batches."""
    spec = runner.spec
    step = max(spec.max_batch_size, 1)
    loop = asyncio.get_running_loop()
    answers: list[Tensors] = []
    disable = None if progress is None else not progress
    with tqdm(total=sample.rows, unit="rows", desc=f"running {spec.name}", disable=disable) as bar:
        for start in range(0, sample.rows, step):
            stop = min(start + step, sample.rows)
            if spec.batches:
                payload = {name: array[start:stop] for name, array in sample.inputs.items()}
            else:  # one request of the model's full shape per row
                payload = {name: array[start] for name, array in sample.inputs.items()}
            done: asyncio.Future[BatchOutcome | BaseException] = loop.create_future()
            runner.start([payload], [stop - start], done.set_result)
            outcome = await done
            if isinstance(outcome, BaseException):
                raise ProfileError(f"model {spec.name} failed on sample rows {start}-{stop - 1}: {outcome}")
            (result,), _timings = outcome
            if isinstance(result, Exception):
                cause = result.__cause__ or result
                raise ProfileError(f"model {spec.name} failed on sample rows {start}-{stop - 1}: {cause}")
            answers.append(result if spec.batches else {k: v[np.newaxis, ...] for k, v in result.items()})
            bar.update(stop - start)
    return {name: np.concatenate([a[name] for a in answers]) for name in answers[0]}
