"""Check run INSIDE the CUDA image by scripts/build_image.sh (image's own Python); needs no GPU.

1. ``import onnxruntime`` lists CUDAExecutionProvider (it is the GPU build);
2. every shared library the CUDA provider needs, and every library of the NVIDIA wheels
   (the CUDA runtime, cuBLAS, cuFFT, cuRAND, NVRTC, cuDNN), resolves inside the image with
   the image's own LD_LIBRARY_PATH, except the driver's libcuda.so.1, which the NVIDIA
   container toolkit mounts from the host. So the host needs only the driver.

Prints what it checked; exits 1 naming each library that would be missing.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import onnxruntime

FROM_THE_HOST = {"libcuda.so.1"}  # the NVIDIA driver's, mounted into the container
NOT_FOUND = re.compile(r"^\s*(\S+) => not found", re.M)


def _libraries() -> list[Path]:
    capi = Path(onnxruntime.__file__).parent / "capi"
    nvidia = Path(onnxruntime.__file__).parent.parent / "nvidia"
    return [capi / "libonnxruntime_providers_cuda.so", *sorted(nvidia.glob("*/lib/*.so*"))]


def main() -> int:
    providers = onnxruntime.get_available_providers()
    print(f"onnxruntime {onnxruntime.__version__}: {','.join(providers)}")
    if "CUDAExecutionProvider" not in providers:
        print("FAILED: CUDAExecutionProvider is missing", file=sys.stderr)
        return 1
    libraries = _libraries()
    missing: dict[str, set[str]] = {}
    for library in libraries:
        if not library.is_file():
            missing[library.name] = {"(the file itself)"}
            continue
        ldd = subprocess.run(["ldd", str(library)], capture_output=True, text=True, check=False)
        unresolved = set(NOT_FOUND.findall(ldd.stdout)) - FROM_THE_HOST
        if ldd.returncode != 0 or unresolved:
            missing[library.name] = unresolved or {ldd.stderr.strip()}
    wheels = {library.parent.parent.name for library in libraries[1:]}
    if not {"cu13", "cudnn"} <= wheels:
        missing["the NVIDIA wheels"] = {f"nvidia/cu13 and nvidia/cudnn (found: {sorted(wheels)})"}
    print(f"{len(libraries)} libraries checked; only {', '.join(sorted(FROM_THE_HOST))} is left to the host")
    for name, needs in sorted(missing.items()):
        print(f"FAILED: {name} needs {', '.join(sorted(needs))}", file=sys.stderr)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
