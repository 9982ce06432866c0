"""Write requirements/runtime-{cpu,cuda}.txt: exact pins of what the tested venv runs.

    .venv/bin/python scripts/lock_requirements.py      # after `make test` passed on that venv

The container image installs from these files, so it runs the very versions the
test suite ran on. We walk infergate's runtime dependencies (not the dev extra)
through the installed distributions and pin each at its installed version. The
CUDA file is the same set with onnxruntime swapped for onnxruntime-gpu, which
installs the same ``onnxruntime`` package and trails it by a release or so:
ONNXRUNTIME_GPU names the newest one on PyPI (``pip index versions onnxruntime-gpu``).
It also pins the CUDA and cuDNN libraries that build needs, as NVIDIA's pip wheels
(CUDA_WHEELS), so the image needs nothing from the host but the driver
(docs/deploy.md, "The CUDA variant"). They are what onnxruntime-gpu's ``cuda`` and
``cudnn`` extras resolve to, with their own dependencies:

    pip install --dry-run --ignore-installed --report report.json "onnxruntime-gpu[cuda,cudnn]==$ONNXRUNTIME_GPU"
"""

from __future__ import annotations

import importlib.metadata as metadata
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ONNXRUNTIME_GPU = "1.31.1"
# onnxruntime-gpu 1.31 is a CUDA 13 build (its extras ask for nvidia-cuda-runtime~=13.0 and
# nvidia-cudnn-cu13~=9.0). CUDA 13's wheels install into site-packages/nvidia/cu13/lib, cuDNN's
# into nvidia/cudnn/lib: the Dockerfile puts both on LD_LIBRARY_PATH.
CUDA_WHEELS = {
    "nvidia-cublas": "13.10.0.20",
    "nvidia-cuda-nvrtc": "13.5.37",
    "nvidia-cuda-runtime": "13.5.37",
    "nvidia-cudnn-cu13": "9.28.1.4",
    "nvidia-cufft": "12.5.0.14",
    "nvidia-curand": "10.4.5.25",
    "nvidia-nvjitlink": "13.5.37",
}
OUT = Path(__file__).resolve().parent.parent / "requirements"
HEADER = (
    "# Exact pins of infergate's runtime dependencies as tested; regenerate with\n"
    "# .venv/bin/python scripts/lock_requirements.py\n"
)


def _closure(root: str) -> dict[str, str]:
    """Every distribution ``root`` needs at run time (markers evaluated here), name -> version."""
    pinned: dict[str, str] = {}
    todo = [root]
    while todo:
        dist = metadata.distribution(todo.pop())
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue  # an extra's requirement, or another platform's
            name = canonicalize_name(req.name)
            if name not in pinned:
                pinned[name] = metadata.version(name)
                todo.append(name)
    return pinned


def _write(name: str, pins: dict[str, str]) -> None:
    lines = [f"{dist}=={version}\n" for dist, version in sorted(pins.items())]
    (OUT / name).write_text(HEADER + "".join(lines), encoding="utf-8")
    print(f"wrote requirements/{name}: {len(lines)} pins")


def main() -> int:
    pins = _closure("infergate")
    if "onnxruntime" not in pins:
        print("onnxruntime is not a dependency of the installed infergate", file=sys.stderr)
        return 1
    OUT.mkdir(exist_ok=True)
    _write("runtime-cpu.txt", pins)
    cuda = {k: v for k, v in pins.items() if k != "onnxruntime"} | {"onnxruntime-gpu": ONNXRUNTIME_GPU} | CUDA_WHEELS
    _write("runtime-cuda.txt", cuda)
    return 0


if __name__ == "__main__":
    sys.exit(main())
