"""Authentication and authorization on a real server, with real clients.

One server runs with the ``auth:`` block on: an HMAC secret from an
environment variable, RSA and EC P-256 PEM keys, and a JWKS file with an
Ed25519 key. Calls come from tritonclient (``headers=``) and from raw grpc
stubs with metadata. Health, ServerLive and ServerReady answer without a token;
everything else needs one, and each method needs its permission on the model
it names.
"""

from __future__ import annotations

import json
import queue
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from conftest import ServerProcess, launch_server, wait_until
from security import (
    AUDIENCE,
    ISSUER,
    SECRET,
    bearer,
    claims,
    ec_key,
    ed25519_key,
    jwk,
    public_pem,
    rsa_key,
    token,
)
from test_auth_verify import hs256_with, unsigned
from test_health_reflection import _grpcurl_binary
from tritonclient.utils import InferenceServerException

from infergate._proto import grpc_service_pb2 as pb
from infergate._proto import grpc_service_pb2_grpc as pb_grpc
from infergate_client import Client, PermissionDenied, Unauthenticated

HANG_GUARD_S = 30.0  # how long a call may take before the test calls it a hang; not a performance bound


@dataclass
class Keys:
    rsa: Any
    other_rsa: Any
    ec: Any
    ed: Any


@dataclass
class AuthServer:
    server: ServerProcess
    keys: Keys

    def token(self, scope: str = "infer:* metadata", **extra: Any) -> str:
        return token(self.keys.rsa, "RS256", claims(scope, **extra), kid="rsa")


@pytest.fixture(scope="module")
def auth_server(demo_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthServer]:
    keys = Keys(rsa_key(), rsa_key(), ec_key(), ed25519_key())
    directory = tmp_path_factory.mktemp("auth")
    (directory / "rsa.pem").write_bytes(public_pem(keys.rsa))
    (directory / "ec.pem").write_bytes(public_pem(keys.ec))
    (directory / "jwks.json").write_text(json.dumps({"keys": [jwk(keys.ed, "ed")]}))
    config = directory / "server.yaml"
    config.write_text(
        json.dumps(  # JSON is YAML
            {
                "auth": {
                    "enabled": True,
                    "algorithms": ["HS256", "RS256", "ES256", "EdDSA"],
                    "secret_env": "INFERGATE_TEST_JWT_SECRET",
                    "public_keys": [
                        {"file": str(directory / "rsa.pem"), "kid": "rsa"},
                        {"file": str(directory / "ec.pem"), "kid": "ec"},
                    ],
                    "jwks": {"file": str(directory / "jwks.json")},
                    "issuer": ISSUER,
                    "audience": AUDIENCE,
                }
            }
        )
    )
    server = launch_server(
        demo_repository, directory, "--config", str(config), env={"INFERGATE_TEST_JWT_SECRET": SECRET.decode()}
    )
    try:
        yield AuthServer(server, keys)
    finally:
        assert server.terminate() == 0, server.log()


@pytest.fixture(scope="module")
def triton(auth_server: AuthServer) -> Iterator[grpcclient.InferenceServerClient]:
    client = grpcclient.InferenceServerClient(auth_server.server.url)
    yield client
    client.close()


@pytest.fixture(scope="module")
def stub(auth_server: AuthServer) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(auth_server.server.url) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def matmul_input() -> grpcclient.InferInput:
    x = grpcclient.InferInput("x", [1, 16], "FP32")
    x.set_data_from_numpy(np.arange(16, dtype=np.float32).reshape(1, 16))
    return x


def infer_request(model: str = "matmul16") -> pb.ModelInferRequest:
    return pb.ModelInferRequest(
        model_name=model,
        inputs=[pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1, 16])],
        raw_input_contents=[np.ones(16, dtype=np.float32).tobytes()],
    )


def triton_status(call: Callable[[], Any]) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as caught:
        call()
    return str(caught.value.status()), caught.value.message()


def stub_status(call: Callable[[], Any]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    error: Any = caught.value
    return error.code(), error.details()


# --------------------------------------------------------------------------- exempt


def test_health_and_liveness_need_no_token(auth_server: AuthServer, triton: grpcclient.InferenceServerClient) -> None:
    # launch_server already waited for grpc.health.v1 SERVING without a token.
    assert triton.is_server_live()
    assert triton.is_server_ready()


# --------------------------------------------------------------------------- authentication


def _now() -> int:
    return int(time.time())


REFUSED: dict[str, Callable[[Keys], dict[str, str]]] = {
    "missing header": lambda k: {},
    "not Bearer": lambda k: {"authorization": "Basic dXNlcjpwYXNz"},
    "malformed token": lambda k: bearer("not.a.jwt"),
    "bad signature": lambda k: bearer(token(k.other_rsa, "RS256", kid="rsa")),
    "alg none": lambda k: bearer(unsigned("none", claims())),
    "key confusion (HS256 with the RSA public key)": lambda k: bearer(hs256_with(public_pem(k.rsa), claims())),
    "algorithm outside the allow-list": lambda k: bearer(token(k.rsa, "RS512", kid="rsa")),
    "expired": lambda k: bearer(token(k.rsa, "RS256", claims(exp=_now() - 3600), kid="rsa")),
    "not yet valid": lambda k: bearer(token(k.ec, "ES256", claims(nbf=_now() + 3600), kid="ec")),
    "wrong issuer": lambda k: bearer(token(k.ed, "EdDSA", claims(iss="https://evil.test"), kid="ed")),
    "wrong audience": lambda k: bearer(token(SECRET, "HS256", claims(aud="elsewhere"))),
    "unknown kid": lambda k: bearer(token(k.rsa, "RS256", kid="gone")),
}


@pytest.mark.parametrize("headers", REFUSED.values(), ids=REFUSED.keys())
def test_tritonclient_with_a_refused_token_gets_unauthenticated(
    auth_server: AuthServer, triton: grpcclient.InferenceServerClient, headers: Callable[[Keys], dict[str, str]]
) -> None:
    status, message = triton_status(
        lambda: triton.infer("matmul16", [matmul_input()], headers=headers(auth_server.keys))
    )
    assert status == "StatusCode.UNAUTHENTICATED", message
    assert "BEGIN" not in message and SECRET.decode() not in message


@pytest.mark.parametrize("headers", REFUSED.values(), ids=REFUSED.keys())
def test_a_raw_stub_with_a_refused_token_gets_unauthenticated(
    auth_server: AuthServer, stub: pb_grpc.GRPCInferenceServiceStub, headers: Callable[[Keys], dict[str, str]]
) -> None:
    metadata = list(headers(auth_server.keys).items())
    code, _ = stub_status(lambda: stub.ModelMetadata(pb.ModelMetadataRequest(name="mlp"), metadata=metadata))
    assert code == grpc.StatusCode.UNAUTHENTICATED


def test_the_refusal_says_what_was_wrong(auth_server: AuthServer, triton: grpcclient.InferenceServerClient) -> None:
    expired = bearer(auth_server.token(exp=_now() - 3600))
    assert "expired" in triton_status(lambda: triton.infer("matmul16", [matmul_input()], headers=expired))[1]
    assert "authorization" in triton_status(lambda: triton.infer("matmul16", [matmul_input()]))[1]


VALID: dict[str, Callable[[Keys], str]] = {
    "HS256 (secret from the environment)": lambda k: token(SECRET, "HS256", claims()),
    "RS256 (PEM)": lambda k: token(k.rsa, "RS256", claims(), kid="rsa"),
    "ES256 (PEM)": lambda k: token(k.ec, "ES256", claims(), kid="ec"),
    "EdDSA (JWKS file)": lambda k: token(k.ed, "EdDSA", claims(), kid="ed"),
}


@pytest.mark.parametrize("make", VALID.values(), ids=VALID.keys())
def test_a_valid_token_of_every_key_kind_infers(
    auth_server: AuthServer, triton: grpcclient.InferenceServerClient, make: Callable[[Keys], str]
) -> None:
    result = triton.infer("matmul16", [matmul_input()], headers=bearer(make(auth_server.keys)))
    assert result.as_numpy("y").shape == (1, 16)


# --------------------------------------------------------------------------- authorization


def test_infer_permission_patterns_pick_the_models(
    auth_server: AuthServer, triton: grpcclient.InferenceServerClient
) -> None:
    headers = bearer(auth_server.token("infer:matmul* metadata"))
    assert triton.infer("matmul16", [matmul_input()], headers=headers).as_numpy("y") is not None
    x = grpcclient.InferInput("x", [1, 512], "FP32")
    x.set_data_from_numpy(np.zeros((1, 512), dtype=np.float32))
    status, message = triton_status(lambda: triton.infer("mlp", [x], headers=headers))
    assert status == "StatusCode.PERMISSION_DENIED"
    assert "'infer:mlp'" in message


def test_metadata_needs_the_metadata_permission(
    auth_server: AuthServer, triton: grpcclient.InferenceServerClient
) -> None:
    infer_only = bearer(auth_server.token("infer:*"))
    for call in (triton.get_model_metadata, triton.get_model_config, triton.get_inference_statistics):
        status, message = triton_status(lambda call=call: call("mlp", headers=infer_only))  # type: ignore[misc]
        assert status == "StatusCode.PERMISSION_DENIED"
        assert "'metadata'" in message
    assert triton.get_model_metadata("mlp", headers=bearer(auth_server.token("metadata"))).name == "mlp"


def test_server_metadata_needs_only_a_valid_token(
    auth_server: AuthServer, triton: grpcclient.InferenceServerClient
) -> None:
    assert triton.get_server_metadata(headers=bearer(auth_server.token(""))).name == "infergate"
    assert triton_status(lambda: triton.get_server_metadata())[0] == "StatusCode.UNAUTHENTICATED"


def test_a_stream_ends_with_permission_denied_at_the_first_forbidden_model(
    auth_server: AuthServer, stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    metadata = [("authorization", f"Bearer {auth_server.token('infer:matmul16')}")]
    requests = [infer_request(), infer_request(), infer_request("mlp"), infer_request()]
    call = stub.ModelStreamInfer(iter(requests), metadata=metadata, timeout=HANG_GUARD_S)
    answers = []
    with pytest.raises(grpc.RpcError) as caught:
        for answer in call:
            answers.append(answer)
    assert [a.error_message for a in answers] == ["", ""]
    error: Any = caught.value
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "'infer:mlp'" in error.details()


def test_a_stream_of_allowed_models_is_answered(
    auth_server: AuthServer, stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    metadata = [("authorization", f"Bearer {auth_server.token('infer:matmul16')}")]
    answers = list(stub.ModelStreamInfer(iter([infer_request()] * 3), metadata=metadata, timeout=HANG_GUARD_S))
    assert [a.error_message for a in answers] == ["", "", ""]


def test_a_stream_ends_unauthenticated_once_its_token_expires(
    auth_server: AuthServer, stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    """A stream keeps the rights of its token only while the token is valid: the request after it
    expired (plus the server's 30 s leeway) ends the stream, as a new call with it would be refused."""
    valid_until = int(time.time()) + 2  # exp 28 s ago: valid for 2 s more, within the leeway
    metadata = [("authorization", f"Bearer {auth_server.token('infer:matmul16', exp=valid_until - 30)}")]
    sent: queue.Queue[pb.ModelInferRequest | None] = queue.Queue()
    sent.put(infer_request())
    call = stub.ModelStreamInfer(iter(sent.get, None), metadata=metadata, timeout=HANG_GUARD_S)
    assert next(call).error_message == ""
    wait_until(lambda: time.time() > valid_until + 0.5, "the token's time over")
    sent.put(infer_request())
    with pytest.raises(grpc.RpcError) as caught:
        next(call)
    error: Any = caught.value
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error.details()
    assert "expired" in error.details()


# --------------------------------------------------------------------------- admin and audit


def audit_lines(server: ServerProcess, method: str, count: int) -> list[dict[str, Any]]:
    """The ``admin`` audit events for ``method`` (on the ``infergate.audit`` logger), once ``count`` are in the log."""

    def mine() -> list[dict[str, Any]]:
        records = [
            json.loads(line.split("infergate.audit: ", 1)[1])
            for line in server.log().splitlines()
            if "infergate.audit: " in line
        ]
        return [r for r in records if r["event"] == "admin" and r["detail"]["method"] == method]

    wait_until(lambda: len(mine()) >= count, f"{count} audit lines for {method}")
    return mine()


def test_admin_calls_need_admin_and_are_audited(
    auth_server: AuthServer, stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    request = pb.RepositoryModelLoadRequest(model_name="mlp")
    user = [("authorization", f"Bearer {auth_server.token('infer:* metadata')}")]
    code, message = stub_status(lambda: stub.RepositoryModelLoad(request, metadata=user))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "'admin'" in message
    admin = [("authorization", f"Bearer {auth_server.token('admin')}")]
    code, _ = stub_status(lambda: stub.RepositoryModelLoad(request, metadata=admin))
    assert code == grpc.StatusCode.FAILED_PRECONDITION  # not in explicit mode; the permission check ran first
    code, _ = stub_status(lambda: stub.RepositoryModelLoad(request))
    assert code == grpc.StatusCode.UNAUTHENTICATED

    records = audit_lines(auth_server.server, "RepositoryModelLoad", 3)
    assert [(r["principal"], r["detail"]["client_id"], r["model"], r["outcome"]) for r in records[-3:]] == [
        ("alice", "svc-a", "mlp", "PERMISSION_DENIED"),
        ("alice", "svc-a", "mlp", "FAILED_PRECONDITION"),
        ("anonymous", None, "", "UNAUTHENTICATED"),  # its request is never read
    ]


def test_log_settings_need_admin_to_read_or_change_and_are_audited(
    auth_server: AuthServer, stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    verbose = pb.LogSettingsRequest(settings={"log_verbose_level": pb.LogSettingsRequest.SettingValue(uint32_param=1)})
    user = [("authorization", f"Bearer {auth_server.token('infer:* metadata')}")]
    for request in (pb.LogSettingsRequest(), verbose):
        code, message = stub_status(lambda r=request: stub.LogSettings(r, metadata=user))  # type: ignore[misc]
        assert code == grpc.StatusCode.PERMISSION_DENIED and "'admin'" in message
    admin = [("authorization", f"Bearer {auth_server.token('admin')}")]
    assert stub.LogSettings(pb.LogSettingsRequest(), metadata=admin).settings["log_verbose_level"].uint32_param == 0

    records = audit_lines(auth_server.server, "LogSettings", 3)
    assert [(r["principal"], r["outcome"]) for r in records[-3:]] == [
        ("alice", "PERMISSION_DENIED"),
        ("alice", "PERMISSION_DENIED"),
        ("alice", "OK"),
    ]


# --------------------------------------------------------------------------- grpcurl


def test_grpcurl_lists_without_a_token_and_calls_with_one(auth_server: AuthServer) -> None:
    binary = _grpcurl_binary()
    url = auth_server.server.url
    method = "inference.GRPCInferenceService/ModelMetadata"

    def grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([binary, "-plaintext", *args], capture_output=True, text=True, timeout=HANG_GUARD_S)

    listed = grpcurl(url, "list")  # reflection is exempt
    assert listed.returncode == 0 and "inference.GRPCInferenceService" in listed.stdout, listed.stderr
    refused = grpcurl("-d", '{"name": "mlp"}', url, method)
    assert refused.returncode != 0 and "Unauthenticated" in refused.stderr
    header = f"authorization: Bearer {auth_server.token('metadata')}"
    served = grpcurl("-H", header, "-d", '{"name": "mlp"}', url, method)
    assert served.returncode == 0 and json.loads(served.stdout)["name"] == "mlp", served.stderr


def test_a_caller_sees_only_its_models_in_the_repository_index(
    auth_server: AuthServer, stub: pb_grpc.GRPCInferenceServiceStub
) -> None:
    def names(scope: str) -> set[str]:
        metadata = [("authorization", f"Bearer {auth_server.token(scope)}")]
        return {m.name for m in stub.RepositoryIndex(pb.RepositoryIndexRequest(), metadata=metadata).models}

    everything = names("infer:*")
    assert {"mlp", "matmul16", "cnn"} <= everything
    assert names("infer:mlp") == {"mlp"}
    assert names("infer:m*") == {m for m in everything if m.startswith("m")}
    assert names("metadata") == set()
    code, _ = stub_status(lambda: stub.RepositoryIndex(pb.RepositoryIndexRequest()))
    assert code == grpc.StatusCode.UNAUTHENTICATED


def test_the_sdk_carries_static_and_refreshed_tokens(auth_server: AuthServer) -> None:
    x = {"x": np.ones((1, 16), dtype=np.float32)}
    with Client(auth_server.server.url, token=auth_server.token()) as client:
        assert client.infer("matmul16", x)["y"].shape == (1, 16)
    issued: list[str] = []

    def fresh() -> str:
        issued.append(auth_server.token())
        return issued[-1]

    with Client(auth_server.server.url, token=fresh) as client:
        assert client.infer("matmul16", x)["y"].shape == (1, 16)
    assert issued  # the callable was asked for the token
    with Client(auth_server.server.url, token="not-a-jwt") as client, pytest.raises(Unauthenticated) as refused:
        client.infer("matmul16", x)
    assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
    with Client(auth_server.server.url, token=auth_server.token("metadata")) as client:
        with pytest.raises(PermissionDenied) as denied:
            client.infer("matmul16", x)
    assert "infer" in denied.value.details


def test_streams_without_a_token_are_unauthenticated_whatever_they_send_after_the_refusal(
    auth_server: AuthServer,
) -> None:
    """A valid request then bytes that do not parse: the refusal does not read them. (A grpc.aio client
    sometimes reports INTERNAL here instead of the status the server sent, when its own write lands after
    the server ended the call: grpc/grpc#36066. The synchronous client reports what the server sent.)"""
    junk = b"\x0a\x05abc"  # field 1, five bytes long, with only three to read
    with grpc.insecure_channel(auth_server.server.url) as channel:
        stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")
        codes = set()
        for _ in range(100):
            with pytest.raises(grpc.RpcError) as caught:
                list(stream(iter([infer_request().SerializeToString(), junk]), timeout=HANG_GUARD_S))
            codes.add(caught.value.code())
    assert codes == {grpc.StatusCode.UNAUTHENTICATED}
