#!/usr/bin/env python3
"""What authentication costs per request: the same server with and without the auth block.

Starts ``infergate serve`` on loopback twice per round (auth off, then JWT auth
on with ``--algorithm``, HS256 by default; alternating which goes first), drives
each with the load harness (``python -m load_tests closed``, the token sent with
``--token``), and prints the harness's tables plus two comparisons per round:
throughput, and the server's own CPU time per answered request (from /proc and
ModelStatistics), which a busy shared machine disturbs less than throughput.
Last, the mean of each over the rounds with twice its standard error: enough
rounds make that interval narrower than the effect being asked about. Run from
the repository root:

    python scripts/bench_auth.py --model matmul16 --concurrency 16 --duration 8 --rounds 12
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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

from infergate._proto import grpc_service_pb2 as pb
from infergate._proto import grpc_service_pb2_grpc as pb_grpc


def _keys(directory: Path, algorithm: str) -> tuple[dict[str, object], str]:
    """The server's auth block and a token it accepts, for ``algorithm`` (HS256 or RS256)."""
    claims = {"sub": "bench", "exp": int(time.time()) + 3600, "scope": "infer:* metadata"}
    if algorithm == "HS256":
        secret = os.urandom(32).hex()
        (directory / "secret").write_text(secret)
        auth = {"enabled": True, "algorithms": ["HS256"], "secret_file": str(directory / "secret")}
        return auth, jwt.encode(claims, secret, algorithm="HS256")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    (directory / "issuer.pem").write_bytes(pem)
    auth = {"enabled": True, "algorithms": ["RS256"], "public_keys": [{"file": str(directory / "issuer.pem")}]}
    return auth, jwt.encode(claims, key, algorithm="RS256", headers={"kid": "bench"})


def _configs(directory: Path, auth: dict[str, object], label: str) -> dict[str, Path]:
    paths = {"no auth": directory / "plain.yaml", label: directory / "auth.yaml"}
    paths["no auth"].write_text("{}\n")
    paths[label].write_text(json.dumps({"auth": auth}))
    return paths


def _mean_and_margin(values: list[float]) -> str:
    """``mean ± 2 standard errors`` (the margin needs two rounds or more)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.3f}"
    return f"{mean:.3f} ± {2 * statistics.stdev(values) / len(values) ** 0.5:.3f}"


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


def _server_cpu_and_count(pid: int, port: int, model: str, token: str | None) -> tuple[float, int]:
    """The server's CPU seconds so far and the requests it answered successfully for ``model``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    metadata = [("authorization", f"Bearer {token}")] if token else None
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name=model), metadata=metadata, timeout=30)
    return cpu, sum(s.inference_stats.success.count for s in stats.model_stats)


def _load(args: argparse.Namespace, label: str, token: str | None, out: Path) -> dict[str, object]:
    command = [
        *("python -m load_tests closed --url".split()),
        f"127.0.0.1:{args.port}",
        *("--model", args.model, "--concurrency", str(args.concurrency), "--duration", str(args.duration)),
        *("--label", label, "--json", str(out)),
    ]
    shown = " ".join(command) + (" --token $TOKEN" if token else "")
    print(f"$ {shown}", flush=True)
    extra = ["--token", token] if token else []
    subprocess.run([sys.executable, *command[1:], *extra], check=True)
    (result,) = json.loads(out.read_text())["runs"]
    return dict(result)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-repository", type=Path, default=Path("demo-models"))
    parser.add_argument("--model", default="matmul16")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--port", type=int, default=18110)
    parser.add_argument("--algorithm", choices=["HS256", "RS256"], default="HS256")
    args = parser.parse_args()
    if not args.model_repository.exists():
        subprocess.run([sys.executable, "-m", "infergate", "demo-repository", str(args.model_repository)], check=True)
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        auth, token = _keys(directory, args.algorithm)
        label_on = f"JWT {args.algorithm}"
        configs = _configs(directory, auth, label_on)
        rates: dict[str, list[float]] = {label: [] for label in configs}
        cpu_us: dict[str, list[float]] = {label: [] for label in configs}
        for round_ in range(args.rounds):
            order = list(configs) if round_ % 2 == 0 else list(reversed(configs))
            for label in order:
                server = _serve(args.model_repository, configs[label], args.port)
                try:
                    out = directory / f"{label}-{round_}.json"
                    sent = token if label != "no auth" else None
                    cpu0, count0 = _server_cpu_and_count(server.pid, args.port, args.model, sent)
                    result = _load(args, label, sent, out)
                    cpu1, count1 = _server_cpu_and_count(server.pid, args.port, args.model, sent)
                    rates[label].append(float(result["requests_per_s"]))  # type: ignore[arg-type]
                    cpu_us[label].append((cpu1 - cpu0) / max(count1 - count0, 1) * 1e6)
                finally:
                    server.terminate()
                    server.wait(60)
    for label in configs:
        print(
            f"{label:>9}: req/s {', '.join(f'{v:,.0f}' for v in rates[label])}; "
            f"server CPU per request (us) {', '.join(f'{v:,.0f}' for v in cpu_us[label])}"
        )
    ratio = [a / p for a, p in zip(rates[label_on], rates["no auth"], strict=True)]
    cpu_ratio = [a / p for a, p in zip(cpu_us[label_on], cpu_us["no auth"], strict=True)]
    extra = [a - p for a, p in zip(cpu_us[label_on], cpu_us["no auth"], strict=True)]
    print(f"throughput auth / no auth, per round: {', '.join(f'{r:.2f}' for r in ratio)}")
    print(f"server CPU added by auth per request (us), per round: {', '.join(f'{e:+,.0f}' for e in extra)}")
    print(f"throughput auth / no auth, mean over {len(ratio)} rounds: {_mean_and_margin(ratio)}")
    print(f"server CPU per request auth / no auth, mean: {_mean_and_margin(cpu_ratio)}")
    print(f"cpus: {os.cpu_count()}, load average at the end: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
