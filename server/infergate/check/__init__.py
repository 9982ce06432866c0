"""``infergate check``: would this model repository serve cleanly? A gate for CI/CD.

Everything the server does at load, without serving, through the server's own
code: the server config (and the keys and certificates it names), every
model's ``config.yaml`` and each version's ``metadata.yaml`` (every bad field
reported, each naming file and field), version policies, checksums, loading
each version with its execution providers — falling back as the server would —
and warm-up (``load_model_version``), routing blocks against the versions that
loaded (``check_routing``), each ensemble's steps against the versions of
its step models that loaded (``check_steps``, after every other model), and
with ``smoke`` one inference per version checked for NaN/Inf
(:mod:`infergate.check.smoke`).

Versions are checked one at a time and closed before the next, so memory stays
that of the largest version.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from infergate.check.findings import Finding, Report
from infergate.check.smoke import smoke_test
from infergate.config import ServerConfig, load_server_config
from infergate.configfile import ConfigError
from infergate.errors import FailedPrecondition
from infergate.models.config import PROVIDERS, ModelConfig
from infergate.models.config_files import config_file, read_model_config
from infergate.models.ensemble import SequenceTurns, StepModel, check_steps, load_ensemble_version, load_order
from infergate.models.governance import IntegrityError, MetadataError, resolve_metadata
from infergate.models.runner import ModelLoadError
from infergate.models.spec import ModelSpec
from infergate.models.version import ModelVersion, load_model_version
from infergate.repository.catalog import version_clashes, version_dirs
from infergate.repository.loader import is_model_name, model_directories
from infergate.routing.config import Routing
from infergate.routing.router import RoutingError, answering_versions, check_routing
from infergate.startable import check_startable

__all__ = ["Finding", "Report", "check_repository"]

log = logging.getLogger(__name__)


async def check_repository(
    root: Path, server_config: Path | None = None, models: list[str] | None = None, smoke: bool = False
) -> Report:
    """Check the repository at ``root`` (only ``models`` when given) and return every finding."""
    report = Report()
    config = _check_server_config(root, server_config, report)
    names = _model_names(root, models, config, report)
    served: dict[str, dict[int, StepModel]] = {}
    routes: dict[str, Routing] = {}  # of the models whose routing fits the versions that loaded
    configs: dict[str, tuple[ModelConfig, dict[int, Path]]] = {}  # the ensembles, checked after the rest
    checked: set[str] = set()
    while names:
        for name in names:
            ensemble = await _check_model(root / name, name, smoke, report, served, routes)
            if ensemble is not None:
                configs[name] = ensemble
        checked.update(names)
        # The step models of an ensemble that --model named without them are checked too: its check needs them.
        steps = {step for config, _ in configs.values() for step in config.step_models}
        names = sorted(name for name in steps - checked if is_model_name(name) and (root / name).is_dir())
    pipelines = {name: set(config.step_models) for name, (config, _) in configs.items()}
    for layer in load_order(pipelines):  # after the models their steps run, ensembles included
        for name in layer:
            model_config, wanted = configs[name]
            for version, version_dir in wanted.items():
                _check_ensemble(root / name, name, version, version_dir, model_config, served, routes, report)
    return report


@dataclass(frozen=True, slots=True)
class _Served:
    """What an ensemble's check reads of a version that loaded (which is closed by then)."""

    spec: ModelSpec
    sequences: object | None


def _check_ensemble(
    directory: Path,
    name: str,
    version: int,
    version_dir: Path,
    config: ModelConfig,
    served: dict[str, dict[int, StepModel]],
    routes: dict[str, Routing],
    report: Report,
) -> None:
    """An ensemble version (in ``version_dir``) against the versions of its step models that loaded in
    this check; one that fits serves as a step of the ensembles checked after it."""

    def step_models(model: str, wanted: str) -> list[StepModel]:
        versions = served.get(model)
        if not versions:
            raise FailedPrecondition(f"model '{model}' did not load in this check (or is not in it)")
        # Naming none: each version the model's routing may choose, as the server routes them.
        chosen = [int(wanted)] if wanted else answering_versions(routes.get(model) or Routing(), list(versions))
        missing = [v for v in chosen if v not in versions]
        if missing:
            raise FailedPrecondition(f"model '{model}' version {missing[0]} did not load in this check")
        return [versions[v] for v in chosen]

    try:
        ensemble = load_ensemble_version(version_dir, name, version, config, SequenceTurns())
        check_steps(ensemble, step_models)
    except (ModelLoadError, MetadataError) as exc:
        report.add("ensemble", "error", f"{config_file(directory)}: {exc}", name, version)
        return
    steps = " -> ".join("+".join(step.model for step in wave) for wave in ensemble.waves)
    report.add("ensemble", "ok", f"steps fit the models they run: {steps}", name, version)
    served.setdefault(name, {})[version] = ensemble


def _check_server_config(root: Path, path: Path | None, report: Report) -> ServerConfig | None:
    if path is None:
        return None
    try:
        config = load_server_config(path, {"model_repository": root})
    except ConfigError as exc:
        report.errors("server-config", str(exc))
        return None
    try:  # what the server reads or opens when it is built: key files, certificates, exporters, the audit log
        check_startable(config)
        if config.audit_log is not None:
            _check_appendable(config.audit_log)
    except ConfigError as exc:
        report.errors("server-config", f"{path}: {exc}")
        return config
    report.add("server-config", "ok", str(path))
    return config


def _check_appendable(path: Path) -> None:
    """ConfigError unless the server could open ``path`` to append to it (without creating it here)."""
    if path.is_dir():
        raise ConfigError(f"audit_log: {path} is a directory")
    parent = path.parent
    if not parent.is_dir():
        raise ConfigError(f"audit_log: {parent} is not a directory (the server creates the file, not its folder)")
    if not os.access(path if path.exists() else parent, os.W_OK):
        raise ConfigError(f"audit_log: {path if path.exists() else parent} is not writable")


def _model_names(root: Path, wanted: list[str] | None, config: ServerConfig | None, report: Report) -> list[str]:
    found, unnamed = model_directories(root)
    for name in unnamed:
        report.add("models", "error", f"{root / name}: not a model name (a path separator in it): the server skips it")
    missing = sorted(set(wanted or []) - set(found))
    if config is not None and config.model_control_mode == "explicit":
        missing_at_start = sorted(set(config.load_models) - set(found) - {"*"})
        for name in missing_at_start:
            report.add("server-config", "error", f"load_models: no model directory {root / name}")
    for name in missing:
        report.add("models", "error", f"no model directory {root / name}", name)
    if not found:
        report.add("models", "error", f"{root}: no model directories")
    return [n for n in found if wanted is None or n in wanted]


async def _check_model(
    directory: Path,
    name: str,
    smoke: bool,
    report: Report,
    served: dict[str, dict[int, StepModel]],
    routes: dict[str, Routing],
) -> tuple[ModelConfig, dict[int, Path]] | None:
    """Check one model; an ensemble's config and the directories of its versions are returned, to check
    after the rest."""
    path = config_file(directory)  # config.yaml, or Triton's config.pbtxt
    try:
        config, found = await asyncio.to_thread(_read_model, directory)
    except ConfigError as exc:
        report.errors("config", str(exc), name)
        return None
    report.add("config", "ok", str(path) if path.exists() else "no config.yaml or config.pbtxt: every default", name)
    clashes = _clashes(directory, found)
    if clashes:  # the server refuses the model's load: none of its versions would serve
        report.add("version-policy", "error", clashes, name)
        return None
    directories = {version: paths[0] for version, paths in found.items()}
    wanted = config.version_policy.select(sorted(found))
    if not wanted:
        message = f"no version directory matches the version policy (found: {_list(sorted(found))})"
        report.add("version-policy", "error", f"{path}: version_policy: {message}", name)
        return None
    report.add("version-policy", "ok", f"serves {_list(wanted)} of {_list(sorted(found))}", name)
    if config.is_ensemble:
        return config, {version: directories[version] for version in wanted}
    versions = served.setdefault(name, {})
    loaded = [v for v in wanted if await _check_version(directories[v], name, v, config, smoke, report, versions)]
    if config.routing is None:
        return None
    if not loaded:
        report.add("routing", "error", f"{path}: routing: no version loaded to route to", name)
        served.pop(name, None)  # the server leaves the model unavailable: no ensemble step may run it
        return None
    try:
        check_routing(config.routing, loaded)
    except RoutingError as exc:
        report.add("routing", "error", f"{path}: {exc}", name)
        served.pop(name, None)
        return None
    report.add("routing", "ok", f"fits the versions that load ({_list(loaded)})", name)
    routes[name] = config.routing
    return None


def _read_model(directory: Path) -> tuple[ModelConfig, dict[int, list[Path]]]:
    """The model's config and its version directories by version, as the server's loader finds them
    (``01/`` is version 1). Raises ConfigError."""
    return read_model_config(directory), version_dirs(directory)


def _clashes(directory: Path, found: dict[int, list[Path]]) -> str:
    """What the server's loader refuses the model for: each version named by several directories
    (``1/`` and ``01/``), naming them; empty when there is none."""
    clashes = version_clashes(found)
    return f"{directory}: {'; '.join(clashes)}; the server loads no version of this model" if clashes else ""


async def _check_version(
    version_dir: Path,
    name: str,
    version: int,
    config: ModelConfig,
    smoke: bool,
    report: Report,
    served: dict[int, StepModel],
) -> bool:
    """Load (checksum, providers, warm-up) and smoke-test one version; True when it would serve
    (and then ``served[version]`` says what an ensemble's steps may read of it)."""
    try:
        given = (await asyncio.to_thread(resolve_metadata, version_dir, config)).sha256 is not None
        model = await asyncio.to_thread(load_model_version, version_dir, name, version, config)
    except IntegrityError as exc:
        report.add("checksum", "error", str(exc), name, version)
        return False
    except MetadataError as exc:
        report.errors("metadata", str(exc), name, version)
        return False
    except ModelLoadError as exc:
        report.add("load", "error", str(exc), name, version)
        return False
    except Exception as exc:  # what the repository reports as "unexpected error", with the cause
        log.debug("model %s version %d failed to load", name, version, exc_info=True)
        report.add("load", "error", f"unexpected error: {type(exc).__name__}: {exc}", name, version)
        return False
    served[version] = _Served(model.spec, model.sequences)
    try:
        _report_loaded(model, config, given, report)
        if smoke:
            model.start()
            try:
                report.add("smoke", "ok", await smoke_test(model, version_dir), name, version)
            except Exception as exc:  # SmokeError, or the model failing to run
                report.add("smoke", "error", _explain(exc), name, version)
                return False
        return True
    finally:
        await model.aclose()


def _explain(exc: BaseException) -> str:
    """The error and, for an execution error (whose message points at the server log), its cause."""
    text = str(exc) or type(exc).__name__
    cause = exc.__cause__
    return f"{text}: {str(cause).strip().splitlines()[0]}" if cause is not None and str(cause).strip() else text


def _report_loaded(model: ModelVersion, config: ModelConfig, given: bool, report: Report) -> None:
    name, version = model.name, model.version
    digest = ", ".join((model.metadata.sha256 or "").splitlines())  # several files: sha256sum's lines
    report.add("checksum", "ok", f"sha256 {digest} ({'verified' if given else 'computed; none given'})", name, version)
    used = model.runner.providers[0]
    wanted = PROVIDERS[config.execution_providers[0].name]
    sizes = config.warmup.batch_sizes if model.spec.batches else [1]
    detail = f"{used}, max_batch_size {model.spec.max_batch_size}, warm-up at {_list(sizes)}"
    if used != wanted:
        report.add("load", "warning", f"{wanted} is not available here; falls back to {used}: {detail}", name, version)
    else:
        report.add("load", "ok", detail, name, version)


def _list(values: list[int]) -> str:
    return ", ".join(str(v) for v in values) or "none"
