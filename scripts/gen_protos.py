"""Regenerate infergate's Python protobuf and gRPC code from proto/.

Usage: python scripts/gen_protos.py

One run writes the same generated modules to every folder in OUT_DIRS: the
server's server/infergate/_proto/ and the client SDK's
clients/python/infergate_client/_proto/ (the SDK installs on its own, so it
carries its own copy). They are never edited by hand. tests/test_proto.py
fails when either no longer matches proto/.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
OUT_DIR = ROOT / "server" / "infergate" / "_proto"
CLIENT_OUT_DIR = ROOT / "clients" / "python" / "infergate_client" / "_proto"
OUT_DIRS = [OUT_DIR, CLIENT_OUT_DIR]
PROTOS = ["model_config.proto", "grpc_service.proto", "infergate_admin.proto"]
INIT = '''"""Generated from proto/ by scripts/gen_protos.py. Do not edit."""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
'''


def generate(out_dir: Path = OUT_DIR) -> None:
    """Run protoc on every file in PROTOS and make the imports package-relative."""
    out_dir.mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).parent / "_proto"
    for name in PROTOS:
        args = [
            "protoc",
            f"-I{PROTO_DIR}",
            f"-I{include}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            str(PROTO_DIR / name),
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on proto/{name}")
    # protoc writes `import model_config_pb2`; inside a package it must be relative.
    for path in out_dir.glob("*_pb2*.py*"):
        text = path.read_text()
        fixed = re.sub(r"^import (\w+_pb2) as", r"from . import \1 as", text, flags=re.M)
        fixed = re.sub(r"^import (\w+_pb2)$", r"from . import \1", fixed, flags=re.M)
        # A private descriptor pool: tritonclient registers the same file and
        # message names (package `inference`) in the default pool, and both must
        # be importable in one process (tests, users embedding infergate).
        fixed = fixed.replace("_descriptor_pool.Default()", "_POOL")
        if "_POOL" in fixed:
            fixed = fixed.replace(
                "from google.protobuf import descriptor_pool as _descriptor_pool\n",
                "from google.protobuf import descriptor_pool as _descriptor_pool\nfrom . import POOL as _POOL\n",
            )
        path.write_text(fixed)
    (out_dir / "__init__.py").write_text(INIT)


if __name__ == "__main__":
    for target in [Path(arg) for arg in sys.argv[1:]] or OUT_DIRS:
        generate(target)
