"""The loader against a real repository on disk: when it tries a failed version again, routers it keeps,
and the directories it loads versions from.

Each test drives a real :class:`ModelRepository` one step at a time — a load request
(``load``), a poll (``rescan``) — and reads what it serves from its catalog and what it
wrote from a real audit file, so every check is on state that a step has finished
writing.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from models import build_gather_model, save_model
from test_governance import save_external_model, swap_weights

from infergate.audit import AuditLog
from infergate.errors import FailedPrecondition
from infergate.models.governance import METADATA_FILE, file_sha256
from infergate.models.overrides import LoadOverride
from infergate.repository.catalog import version_directory
from infergate.repository.loader import ModelRepository
from infergate.routing.router import Decision, Router

RepositoryFactory = Callable[..., ModelRepository]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "models"
    path.mkdir()
    return path


@pytest.fixture
async def audit(tmp_path: Path) -> AsyncIterator[AuditLog]:
    log = AuditLog(tmp_path / "audit.jsonl")
    log.start()
    yield log
    await log.aclose()


@pytest.fixture
async def open_repository(root: Path, audit: AuditLog) -> AsyncIterator[RepositoryFactory]:
    """Makes repositories over ``root`` (closed, their versions drained, at the end of the test)."""
    made: list[ModelRepository] = []

    def make(*, explicit: bool = False) -> ModelRepository:
        repository = ModelRepository(root, drain_timeout=5.0, explicit=explicit, audit=audit)
        repository.discover()
        made.append(repository)
        return repository

    yield make
    for repository in made:
        await repository.aclose()


async def audit_events(audit: AuditLog, event: str) -> list[dict[str, Any]]:
    """The ``event`` lines written so far (closing the log flushes its writer; it reopens on start)."""
    await audit.aclose()
    assert audit.path is not None
    lines = [json.loads(line) for line in audit.path.read_text().splitlines()]
    audit.start()
    return [line for line in lines if line["event"] == event]


def write_metadata(version_dir: Path, sha256: str) -> None:
    (version_dir / METADATA_FILE).write_text(f"sha256: '{sha256}'\n")


def served(repository: ModelRepository, name: str) -> list[int]:
    return [model.version for model in repository.catalog.models(name)[0].versions.values()]


def the_version(repository: ModelRepository, name: str) -> Any:
    """The one version of ``name`` that serves (its object: a reload makes a new one)."""
    [model] = repository.catalog.models(name)[0].versions.values()
    return model


# --------------------------------------------------------------------------- a version that failed, tried again


async def test_an_explicit_load_of_a_broken_model_fails_every_time_naming_the_cause(
    root: Path, open_repository: RepositoryFactory
) -> None:
    (root / "m" / "1").mkdir(parents=True)
    (root / "m" / "1" / "model.onnx").write_bytes(b"not an onnx model")
    repository = open_repository(explicit=True)
    for attempt in range(2):
        with pytest.raises(FailedPrecondition) as refused:
            await repository.load("m", LoadOverride())
        assert "failed to load 'm'" in refused.value.message, attempt
        assert f"{root / 'm' / '1' / 'model.onnx'}" in refused.value.message, attempt
        [row] = repository.catalog.index()
        assert (row.name, row.version, row.state) == ("m", "1", "UNAVAILABLE"), attempt
        assert "model.onnx" in row.reason, attempt


async def test_an_explicit_load_tries_a_failed_version_again_once_its_metadata_is_fixed(
    root: Path, open_repository: RepositoryFactory
) -> None:
    model_file = save_model(build_gather_model(), root, "m", 1)
    write_metadata(model_file.parent, "0" * 64)
    repository = open_repository(explicit=True)
    with pytest.raises(FailedPrecondition, match="sha256 mismatch"):
        await repository.load("m", LoadOverride())

    write_metadata(model_file.parent, file_sha256(model_file))  # the model file itself is unchanged
    await repository.load("m", LoadOverride())
    assert served(repository, "m") == [1]
    assert [(row.version, row.state, row.reason) for row in repository.catalog.index()] == [("1", "READY", "")]


async def test_a_poll_skips_an_unchanged_failed_version_and_tries_it_again_once_its_metadata_changes(
    root: Path, open_repository: RepositoryFactory, audit: AuditLog
) -> None:
    model_file = save_model(build_gather_model(), root, "m", 1)
    write_metadata(model_file.parent, "0" * 64)
    repository = open_repository()
    await repository.load_all()
    await repository.rescan()  # nothing changed: not tried (nor written) again
    assert [e["version"] for e in await audit_events(audit, "load_failed")] == ["1"]
    assert served(repository, "m") == []

    write_metadata(model_file.parent, file_sha256(model_file))
    await repository.rescan()
    assert served(repository, "m") == [1]


async def test_a_poll_reloads_a_serving_version_whose_external_weights_alone_changed(
    root: Path, open_repository: RepositoryFactory
) -> None:
    """Its model file (the graph) is untouched: a version is every file in its directory, as in Triton."""
    save_external_model(root / "m" / "1")
    (root / "m" / "config.yaml").write_text("max_batch_size: 8\n")
    repository = open_repository()
    await repository.load_all()

    first = the_version(repository, "m")
    await repository.rescan()  # nothing changed: the same version object serves
    assert the_version(repository, "m") is first

    swap_weights(root / "m" / "1")
    await repository.rescan()
    reloaded = the_version(repository, "m")
    assert reloaded is not first
    assert reloaded.metadata.sha256 != first.metadata.sha256  # the weights file's digest is part of it


async def test_a_poll_reloads_a_serving_version_when_a_file_of_its_model_directory_changes_not_a_hidden_one(
    root: Path, open_repository: RepositoryFactory
) -> None:
    """The labels (like warmup/ and initial_state/) are read by every version's load, as in Triton's poll;
    a version staged under a hidden name before its ``mv`` (docs/routing.md) is not read by any."""
    save_model(build_gather_model(), root, "m", 1, "output:\n  - {name: y, label_filename: labels.txt}\n")
    (root / "m" / "labels.txt").write_text("".join(f"class {i}\n" for i in range(10)))
    repository = open_repository()
    await repository.load_all()

    first = the_version(repository, "m")
    shutil.copytree(root / "m" / "1", root / "m" / ".staging")
    await repository.rescan()
    assert the_version(repository, "m") is first

    (root / "m" / "labels.txt").write_text("".join(f"label {i}\n" for i in range(10)))
    await repository.rescan()
    assert the_version(repository, "m") is not first


async def test_a_poll_tries_a_failed_version_again_once_the_labels_file_it_needs_appears(
    root: Path, open_repository: RepositoryFactory
) -> None:
    config = "output:\n  - {name: y, label_filename: labels.txt}\n"
    save_model(build_gather_model(), root, "m", 1, config)
    repository = open_repository()
    await repository.load_all()
    [row] = repository.catalog.index()
    assert row.state == "UNAVAILABLE" and "labels.txt" in row.reason, row

    (root / "m" / "labels.txt").write_text("".join(f"class {i}\n" for i in range(10)))
    await repository.rescan()
    assert served(repository, "m") == [1]


# --------------------------------------------------------------------------- a routing block refused


CANARY = "version_policy: {all: {}}\nrouting:\n  canary: {version: 2, steps: [10, 50], step_requests: 20}\n"


def router_of(repository: ModelRepository, name: str) -> Router:
    return dict(repository.catalog.routers())[name]


async def test_a_refused_routing_keeps_the_router_in_force_with_its_canary_rolled_back(
    root: Path, open_repository: RepositoryFactory, audit: AuditLog
) -> None:
    save_model(build_gather_model(), root, "m", 1, CANARY)
    save_model(build_gather_model(), root, "m", 2)
    repository = open_repository()
    await repository.load_all()
    router = router_of(repository, "m")
    for _ in range(20):  # every canary request fails: rolled back
        router.observe(Decision(2, "canary"), False, 0.01)
    assert router.canary is not None and router.canary.state == "rolled_back"

    (root / "m" / "config.yaml").write_text(CANARY + "  shadow: {version: 3}\n")  # no version 3 on disk
    for poll in range(3):
        with pytest.raises(FailedPrecondition, match=r"routing\.shadow\.version"):
            await repository.reconcile("m", source="poll")
        assert router_of(repository, "m") is router, poll
        assert router.canary is not None and router.canary.state == "rolled_back", poll
    assert len(await audit_events(audit, "routing_rejected")) == 1


async def test_a_rolled_back_canary_stays_rolled_back_when_another_version_is_added_or_reloaded(
    root: Path, open_repository: RepositoryFactory
) -> None:
    """Only a change of the routing block starts a canary over (docs/routing.md); a new version once
    built a fresh router, and a canary rolled back for its latency took half the traffic again."""
    save_model(build_gather_model(), root, "m", 1, CANARY)
    save_model(build_gather_model(), root, "m", 2)
    repository = open_repository()
    await repository.load_all()
    for _ in range(20):
        router_of(repository, "m").observe(Decision(2, "canary"), False, 0.01)
    save_model(build_gather_model(), root, "m", 3)  # a version the routing does not name
    await repository.reconcile("m", source="poll")
    assert served(repository, "m") == [1, 2, 3]
    canary = router_of(repository, "m").canary
    assert canary is not None and (canary.state, canary.weight) == ("rolled_back", 0.0)
    assert {router_of(repository, "m").route().version for _ in range(50)} == {3}


async def test_a_ramping_canary_keeps_its_step_when_the_primary_is_reloaded(
    root: Path, open_repository: RepositoryFactory
) -> None:
    save_model(build_gather_model(), root, "m", 1, CANARY)
    save_model(build_gather_model(), root, "m", 2)
    repository = open_repository()
    await repository.load_all()
    for _ in range(20):  # a healthy first step: raised to 50%
        router_of(repository, "m").observe(Decision(2, "canary"), True, 0.01)
    primary = repository.catalog.models("m")[0].versions[1]
    rebuilt = build_gather_model()
    rebuilt.doc_string = "rebuilt"
    save_model(rebuilt, root, "m", 1, CANARY)  # the primary's model file changed: reloaded
    await repository.reconcile("m", source="poll")
    assert repository.catalog.models("m")[0].versions[1] is not primary  # reloaded
    canary = router_of(repository, "m").canary
    assert canary is not None and (canary.state, canary.step, canary.weight) == ("ramping", 1, 50.0)


# --------------------------------------------------------------------------- version directory names


async def test_a_version_directory_with_leading_zeros_loads_from_that_directory(
    root: Path, open_repository: RepositoryFactory
) -> None:
    save_model(build_gather_model(), root, "m", 1)
    (root / "m" / "1").rename(root / "m" / "001")
    repository = open_repository()
    await repository.load_all()
    assert served(repository, "m") == [1]
    assert repository.catalog.get("m", "1").version == 1


async def test_two_directories_naming_one_version_refuse_the_load_naming_both(
    root: Path, open_repository: RepositoryFactory
) -> None:
    save_model(build_gather_model(), root, "m", 1)
    repository = open_repository()
    await repository.load_all()
    assert served(repository, "m") == [1]

    shutil.copytree(root / "m" / "1", root / "m" / "01")
    with pytest.raises(FailedPrecondition) as refused:
        await repository.reconcile("m", source="poll")
    message = refused.value.message
    assert "failed to load 'm'" in message and "version 1" in message, message
    assert str(root / "m" / "1") in message and str(root / "m" / "01") in message, message
    assert served(repository, "m") == [1]  # what served keeps serving
    [row] = repository.catalog.index()
    assert str(root / "m" / "01") in row.reason, row


def test_the_command_line_tools_find_a_version_where_the_loader_does(root: Path) -> None:
    """infergate offline and infergate profile open a version's directory through the same lookup."""
    (root / "m" / "01").mkdir(parents=True)
    (root / "m" / "7").mkdir()
    assert version_directory(root / "m", 1) == root / "m" / "01"
    assert version_directory(root / "m", 7) == root / "m" / "7"
    assert version_directory(root / "m", 2) == root / "m" / "2"  # none: where it would be, for the message
