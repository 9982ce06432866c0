"""What authentication costs: infergate with auth off and with JWT auth on, interleaved in one run.

    python -m load_tests auth-overhead --rounds 4 --slices 6 --duration 3 --warmup 0.5

Variants (``--variants``, all three by default), each serving the demo repository:

* ``off``: no ``auth`` block, and calls without a token;
* ``header``: the same server, and every call carrying the token anyway (the
  server ignores it): what gRPC's carrying the header costs client and
  server, apart from auth's own work;
* ``jwt``: ``auth.enabled`` with one HS256 secret (``--algorithm RS256``: one
  RSA public key), every call carrying the same bearer token, so after the
  first call the server finds its caller in the verifier's cache.

The token's scope is ``infer:* metadata``. Servers run side by side and are
loaded in turn (``interleave``): the table gives throughput, the server's own
CPU and the client's per answered request, and each ÷ off paired slot by slot
(``ratios``: the geometric mean of the slots' ratios, ± the half-width of its
95% interval over rounds), the interval the "within 3%" target is read from.
On a machine whose cores the client shares, the client's CPU is throughput
too: what it adds per request the server cannot serve.
"""

from __future__ import annotations

import json
import os
import pathlib
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field

from .costs import Step, step_costs
from .interleave import OverheadRun, SlotFigures, Variant, measured
from .ratios import Ratio
from .report import LoadResult, format_table, parse_variants
from .suite import REPO_ROOT, environment

__all__ = [
    "ALGORITHMS",
    "VARIANTS",
    "AuthOverheadConfig",
    "AuthOverheadReport",
    "auth_block",
    "auth_step_costs",
    "auth_steps",
    "run_auth_overhead",
]

ALGORITHMS = ("HS256", "RS256")
VARIANTS = ("off", "header", "jwt")
SCOPE = "infer:* metadata"


@dataclass(frozen=True)
class AuthOverheadConfig(OverheadRun):
    concurrency: int = 16
    duration: float = 3.0
    warmup: float = 0.5
    rounds: int = 4
    slices: int = 6
    algorithm: str = "HS256"
    variants: tuple[str, ...] = VARIANTS


@dataclass
class AuthOverheadReport(SlotFigures):
    config: AuthOverheadConfig
    runs: dict[str, list[LoadResult]] = field(default_factory=dict)  # per slot, in slot order
    cpu_us: dict[str, list[float]] = field(default_factory=dict)  # server CPU µs per request, per slot
    client_cpu_us: dict[str, list[float]] = field(default_factory=dict)  # the client's, per slot

    def paired(self) -> tuple[dict[str, Ratio], dict[str, Ratio]]:
        """Throughput and server CPU per request, each ÷ off's, slot by slot."""
        return self.paired_rates(), self.ratios(self.cpu_us)

    def table(self) -> str:
        rates, cpu = self.paired()
        rows = []
        for variant, runs in self.runs.items():
            mean = statistics.fmean(r.requests_per_s for r in runs)
            p50 = statistics.fmean(r.p50_ms for r in runs)
            rows.append(
                [variant, f"{mean:,.0f}", str(rates[variant]), f"{p50:.3f}",
                 f"{statistics.fmean(self.cpu_us[variant]):.0f}", str(cpu[variant]), self.mean_client_cpu(variant)]
            )  # fmt: skip
        headers = ["variant", "mean req/s", "paired ÷ off", "mean p50 ms", "server CPU µs/req", "paired ÷ off",
                   "client CPU µs/req"]  # fmt: skip
        return format_table(headers, ["<", ">", ">", ">", ">", ">", ">"], rows) + self.config.pinning()


def auth_block(folder: pathlib.Path, algorithm: str) -> tuple[dict[str, object], str]:
    """The server's ``auth`` block for ``algorithm`` (its key written into ``folder``) and a token it accepts."""
    import jwt

    claims = {"sub": "load-tests", "exp": int(time.time()) + 24 * 3600, "scope": SCOPE}
    if algorithm == "HS256":
        secret = os.urandom(32).hex()
        (folder / "secret").write_text(secret)
        auth = {"enabled": True, "algorithms": ["HS256"], "secret_file": str(folder / "secret")}
        return auth, jwt.encode(claims, secret, algorithm="HS256")
    if algorithm != "RS256":
        raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)}, got {algorithm!r}")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    (folder / "issuer.pem").write_bytes(public)
    auth = {"enabled": True, "algorithms": ["RS256"], "public_keys": [{"file": str(folder / "issuer.pem")}]}
    return auth, jwt.encode(claims, key, algorithm="RS256", headers={"kid": "load-tests"})


def variants(text: str) -> tuple[str, ...]:
    """``--variants``: a comma list of :data:`VARIANTS`, ``off`` (the base of every ratio) among them."""
    names = parse_variants(text, VARIANTS)
    if "off" not in names:
        raise ValueError(f"the variants must include off, the base of every ratio; got {text!r}")
    return names


def auth_step_costs(calls: int = 20_000, cold: bool = False) -> dict[str, float]:
    """CPU µs per call of what auth does for a ModelInfer with a cached HS256 token, in-process,
    warm or with ``cold`` caches (``costs.step_costs``)."""
    return step_costs(auth_steps(), calls, cold)


def auth_steps() -> dict[str, Step]:
    """Auth's two steps per call, each as a coroutine function that runs it once, and the bare call
    to subtract."""
    import asyncio

    import grpc
    import jwt

    from infergate._proto import grpc_service_pb2 as pb  # type: ignore[import-untyped,unused-ignore]
    from infergate.security.auth import TokenVerifier  # type: ignore[import-untyped,unused-ignore]
    from infergate.security.config import AuthConfig  # type: ignore[import-untyped,unused-ignore]
    from infergate.security.interceptor import AuthInterceptor  # type: ignore[import-untyped,unused-ignore]
    from infergate.security.keys import KeyStore  # type: ignore[import-untyped,unused-ignore]

    secret = os.urandom(32)
    config = AuthConfig(enabled=True, algorithms=["HS256"], secret_env="UNUSED")  # the secret is handed over below
    interceptor = AuthInterceptor(TokenVerifier(config, KeyStore(secret)), [])
    claims = {"sub": "load-tests", "exp": int(time.time()) + 3600, "scope": SCOPE}
    token = jwt.encode(claims, secret, algorithm="HS256")
    response = pb.ModelInferResponse(model_name="matmul16", model_version="1")

    async def behavior(request: object, context: object) -> object:
        return response

    handler = grpc.unary_unary_rpc_method_handler(behavior)

    class _Details:  # what gRPC hands an interceptor; a stand-in, since no RPC runs here
        method = "/inference.GRPCInferenceService/ModelInfer"
        invocation_metadata = (("authorization", f"Bearer {token}"),)

    details, request = _Details(), pb.ModelInferRequest(model_name="matmul16", id="x")
    authorized = asyncio.run(interceptor.authorize(details, handler))  # verified once: cached from now on

    # Coroutine functions, all three: the cost loop runs them in a task of its own, so the caller that
    # authorize_now sets stays in that task's context instead of leaking into the process's.
    async def cached() -> None:
        interceptor.authorize_now(details, handler)

    async def checked() -> None:
        interceptor.authorize_now(details, handler)  # sets this call's caller, as the interceptor does
        await authorized.unary_unary(request, None)

    async def bare() -> None:
        await handler.unary_unary(request, None)

    return {
        "the caller from the verifier's cache, and the handler that checks it": cached,
        "the same, then the permission check around a unary ModelInfer": checked,
        "the same unary call without auth (subtract it)": bare,
    }


def run_auth_overhead(config: AuthOverheadConfig) -> AuthOverheadReport:
    """Every variant in every slot of every round; writes auth-overhead.json and auth-overhead.md."""
    from infergate.demo import write_demo_repository  # type: ignore[import-untyped,unused-ignore]

    report = AuthOverheadReport(config, {v: [] for v in config.variants}, {v: [] for v in config.variants})
    config.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp)
        repo = folder / "models"
        write_demo_repository(repo)
        auth, token = auth_block(folder, config.algorithm)
        (folder / "auth.yaml").write_text(json.dumps({"auth": auth}))  # YAML reads JSON
        serve = (sys.executable, "-m", "infergate", "serve", "--model-repository", str(repo))
        every = {
            "off": Variant("off", serve),
            "header": Variant("header", serve, token=token),  # auth off: the server ignores the header
            "jwt": Variant("jwt", (*serve, "--config", str(folder / "auth.yaml")), token=token),
        }
        for slot, sample in measured([every[name] for name in config.variants], config, REPO_ROOT):
            report.add(slot, sample)
    _write(report)
    return report


def _write(report: AuthOverheadReport) -> None:
    rates, cpu = report.paired()
    data = {
        "environment": environment(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": {k: str(v) for k, v in vars(report.config).items()},
        **report.figures_json(),
        "paired_throughput_to_off": {v: vars(r) for v, r in rates.items()},
        "paired_server_cpu_to_off": {v: vars(r) for v, r in cpu.items()},
        "paired_client_cpu_to_off": {v: vars(r) for v, r in report.ratios(report.client_cpu_us).items()},
    }
    (report.config.out / "auth-overhead.json").write_text(json.dumps(data, indent=2, default=str))
    (report.config.out / "auth-overhead.md").write_text(report.table() + "\n")
