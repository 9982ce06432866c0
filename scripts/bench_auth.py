#!/usr/bin/env python3
"""What authentication costs per request: the same server with and without the auth block.

Starts ``infergate serve`` on loopback twice per round (auth off, then RS256
JWT auth on, alternating which goes first), drives each with the load harness
(``python -m load_tests closed``, the token sent with ``--header``), and prints
the harness's tables plus the ratio. Run from the repository root:

    python scripts/bench_auth.py --model matmul16 --concurrency 16 --duration 10 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from grpc_health.v1 import health_pb2, health_pb2_grpc


def _keys(directory: Path) -> str:
    """Write an RSA public key for the server; return a token signed with its private half."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    (directory / "issuer.pem").write_bytes(pem)
    claims = {"sub": "bench", "exp": int(time.time()) + 3600, "scope": "infer:* metadata"}
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": "bench"})


def _configs(directory: Path) -> dict[str, Path]:
    auth = {"enabled": True, "algorithms": ["RS256"], "public_keys": [{"file": str(directory / "issuer.pem")}]}
    paths = {"no auth": directory / "plain.yaml", "JWT RS256": directory / "auth.yaml"}
    paths["no auth"].write_text("{}\n")
    paths["JWT RS256"].write_text(json.dumps({"auth": auth}))
    return paths


def _serve(repository: Path, config: Path, port: int) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "infergate", "serve", "--model-repository", str(repository)]
    server = subprocess.Popen([*command, "--port", str(port), "--config", str(config), "--log-level", "warning"])
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(), timeout=120, wait_for_ready=True
        )
        for update in watch:
            if update.status == health_pb2.HealthCheckResponse.SERVING:
                watch.cancel()
                break
    return server


def _load(args: argparse.Namespace, label: str, token: str | None, out: Path) -> dict[str, object]:
    command = [
        *("python -m load_tests closed --target".split()),
        f"127.0.0.1:{args.port}",
        *("--model", args.model, "--concurrency", str(args.concurrency), "--duration", str(args.duration)),
        *("--label", label, "--json", str(out)),
    ]
    shown = " ".join(command) + (" --header 'authorization=Bearer $TOKEN'" if token else "")
    print(f"$ {shown}", flush=True)
    extra = ["--header", f"authorization=Bearer {token}"] if token else []
    subprocess.run([sys.executable, *command[1:], *extra], check=True)
    result: dict[str, object] = json.loads(out.read_text())
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-repository", type=Path, default=Path("demo-models"))
    parser.add_argument("--model", default="matmul16")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--port", type=int, default=18110)
    args = parser.parse_args()
    if not args.model_repository.exists():
        subprocess.run([sys.executable, "-m", "infergate", "demo-repository", str(args.model_repository)], check=True)
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        token = _keys(directory)
        configs = _configs(directory)
        rates: dict[str, list[float]] = {label: [] for label in configs}
        for round_ in range(args.rounds):
            order = list(configs) if round_ % 2 == 0 else list(reversed(configs))
            for label in order:
                server = _serve(args.model_repository, configs[label], args.port)
                try:
                    out = directory / f"{label}-{round_}.json"
                    result = _load(args, label, token if label != "no auth" else None, out)
                    rates[label].append(float(result["requests_per_s"]))  # type: ignore[arg-type]
                finally:
                    server.terminate()
                    server.wait(60)
    for label, values in rates.items():
        print(f"{label}: {', '.join(f'{v:,.0f}' for v in values)} req/s")
    ratio = [a / p for a, p in zip(rates["JWT RS256"], rates["no auth"], strict=True)]
    print(f"auth / no auth, per round: {', '.join(f'{r:.2f}' for r in ratio)}  (cpus: {os.cpu_count()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
