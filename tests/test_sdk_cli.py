"""``infergate-client``, run as a subprocess against a real server: output and exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ServerProcess

from load_tests.servers import free_port

CLI = Path(sys.executable).parent / "infergate-client"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(CLI), *args], capture_output=True, text=True, timeout=120, check=False)


def test_health_prints_live_and_ready_and_exits_0(demo_server: ServerProcess) -> None:
    done = _run("--url", demo_server.url, "health", "--model", "mlp")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"live": True, "ready": True, "model mlp ready": True}


def test_health_of_a_model_that_is_not_there_exits_1(demo_server: ServerProcess) -> None:
    done = _run("--url", demo_server.url, "health", "--model", "nope")
    assert done.returncode == 1
    assert json.loads(done.stdout)["model nope ready"] is False


def test_models_lists_every_served_model(demo_server: ServerProcess) -> None:
    done = _run("--url", demo_server.url, "models")
    assert done.returncode == 0, done.stderr
    names = [line.split("\t")[0] for line in done.stdout.splitlines()]
    assert {"matmul16", "mlp", "cnn", "multi_io", "identity_all"} <= set(names)


def test_metadata_prints_the_inputs_and_outputs_as_json(demo_server: ServerProcess) -> None:
    done = _run("--url", demo_server.url, "metadata", "matmul16")
    assert done.returncode == 0, done.stderr
    body = json.loads(done.stdout)
    assert body["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 16]}]


def test_infer_reads_npy_and_json_inputs_and_writes_npy_outputs(demo_server: ServerProcess, tmp_path: Path) -> None:
    a = np.array([[1.0, 2.0, 3.0, 4.0]], dtype=np.float32)
    np.save(tmp_path / "a.npy", a)
    done = _run(
        "--url", demo_server.url, "infer", "multi_io", "--input", f"a=@{tmp_path / 'a.npy'}",
        "-i", "b=[[1,2,3,4]]", "-i", "flag=[[true]]", "-i", 'text=[["x","y"]]', "--output-dir", str(tmp_path / "out"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert np.load(tmp_path / "out" / "sum.npy").tolist() == [[2.0, 4.0, 6.0, 8.0]]
    assert np.load(tmp_path / "out" / "doubled.npy").tolist() == [[2, 4, 6, 8]]
    assert np.load(tmp_path / "out" / "text_out.npy", allow_pickle=True).tolist() == [[b"x", b"y"]]


def test_infer_prints_requested_outputs_as_json(demo_server: ServerProcess) -> None:
    done = _run(
        "--url", demo_server.url, "infer", "multi_io", "-i", "a=[[0,0,0,0]]", "-i", "b=[[1,1,1,1]]",
        "-i", "flag=[[false]]", "-i", 'text=[["p","q"]]', "-o", "not_flag", "-o", "text_out",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"not_flag": [[True]], "text_out": [["p", "q"]]}


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["infer", "matmul16", "-i", "x=[[1,2]]"], 4, "INVALID_ARGUMENT"),
        (["infer", "nope", "-i", "x=[1]"], 4, "NOT_FOUND"),
        (["infer", "matmul16", "-i", "x=@/no/such/file.npy"], 2, "cannot read"),
        (["infer", "matmul16", "-i", "x=[1,"], 2, "not JSON"),
        (["infer", "matmul16", "-i", "z=[1]"], 2, "no such input"),
        (["infer", "matmul16"], 2, "at least one --input"),
        (["--key", "k.pem", "health"], 2, "both private_key and certificate_chain"),
    ],
)
def test_errors_say_what_was_wrong_with_documented_exit_codes(
    demo_server: ServerProcess, args: list[str], code: int, message: str
) -> None:
    done = _run("--url", demo_server.url, *args)
    assert done.returncode == code, done.stdout + done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("[[1,2,3,99999999999999999999]]", "--input b: [[1,2,3,99999999999999999999]] cannot be INT64:"),
        ('[["one",2,3,4]]', '--input b: [["one",2,3,4]] cannot be INT64:'),
        ("[[1,2],[3]]", "--input b: [[1,2],[3]] cannot be INT64:"),
        ("[[1.5,2,3,4]]", "--input b: [[1.5,2,3,4]] cannot be INT64: 1.5 is not a whole number"),
        ("[[1e30,2,3,4]]", "--input b: [[1e30,2,3,4]] cannot be INT64: 1e+30 is out of range"),
        ("[[true,2,3,4]]", "--input b: [[true,2,3,4]] cannot be INT64: True is not a whole number"),
    ],
)
def test_a_json_input_that_does_not_fit_its_datatype_exits_2_with_one_line(
    demo_server: ServerProcess, value: str, message: str
) -> None:
    done = _run(
        "--url", demo_server.url, "infer", "multi_io", "-i", "a=[[1,2,3,4]]", "-i", f"b={value}",
        "-i", "flag=[[true]]", "-i", 'text=[["a","b"]]',
    )  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.startswith(f"infergate-client: {message}") and done.stderr.count("\n") == 1, done.stderr


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("[[5]]", "--input flag: [[5]] cannot be BOOL: 5 is not true, false, 0 or 1"),
        ('[["false"]]', "--input flag: [[\"false\"]] cannot be BOOL: 'false' is not true, false, 0 or 1"),
    ],
)
def test_a_json_bool_input_takes_true_false_0_or_1_only(demo_server: ServerProcess, value: str, message: str) -> None:
    done = _run(
        "--url", demo_server.url, "infer", "multi_io", "-i", "a=[[1,2,3,4]]", "-i", "b=[[1,2,3,4]]",
        "-i", f"flag={value}", "-i", 'text=[["a","b"]]',
    )  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.startswith(f"infergate-client: {message}") and done.stderr.count("\n") == 1, done.stderr


@pytest.mark.parametrize(
    ("model", "value", "message"),
    [
        ("matmul16", "x=[[1e39" + ",0" * 15 + "]]", "--input x: [[1e39,0,"),
        ("identity_all", "in_FP16=[[1, 70000]]", "--input in_FP16: [[1, 70000]] cannot be FP16: 70000 is out of range"),
        (
            "identity_all",
            "in_FP32=[[-3.5e38]]",
            "--input in_FP32: [[-3.5e38]] cannot be FP32: -3.5e+38 is out of range",
        ),
        ("identity_all", "in_FP64=[[1e400]]", "--input in_FP64: [[1e400]] cannot be FP64: 1e400 is out of range"),
    ],
)
def test_a_finite_json_number_too_large_for_a_float_input_exits_2_naming_the_input(
    demo_server: ServerProcess, model: str, value: str, message: str
) -> None:
    done = _run("--url", demo_server.url, "infer", model, "-i", value)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.startswith(f"infergate-client: {message}") and done.stderr.count("\n") == 1, done.stderr


def test_infinities_and_nan_given_as_strings_and_the_largest_finite_values_are_sent(
    demo_server: ServerProcess,
) -> None:
    done = _run(
        "--url", demo_server.url, "infer", "multi_io", "-i", 'a=[["inf", "-inf", "nan", 3.4e38]]',
        "-i", "b=[[0,0,0,0]]", "-i", "flag=[[true]]", "-i", 'text=[["a","b"]]', "-o", "sum",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (row,) = json.loads(done.stdout)["sum"]
    assert row[:3] == ["inf", "-inf", "nan"] and np.float32(row[3]) == np.float32(3.4e38)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://{address}", "server address 'http://{address}': drop the scheme: give HOST:PORT, as in '{address}'"),
        ("127.0.0.1:notaport", "server address '127.0.0.1:notaport': port 'notaport' is not a number from 1 to 65535"),
        ("not a url", "server address 'not a url': expected HOST:PORT"),
    ],
)
def test_a_malformed_url_exits_2_naming_it(demo_server: ServerProcess, url: str, message: str) -> None:
    done = _run("--url", url.format(address=demo_server.url), "health")
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr == f"infergate-client: {message.format(address=demo_server.url)}\n"


def test_an_input_file_the_sdk_cannot_send_exits_2(demo_server: ServerProcess, tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.zeros((1, 16), np.complex64))
    done = _run("--url", demo_server.url, "infer", "matmul16", "-i", f"x=@{tmp_path / 'x.npy'}")
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr == (
        "infergate-client: InvalidArgument: infer('matmul16'): input 'x': numpy dtype complex64 has no"
        " Open Inference Protocol datatype\n"
    )


def test_nan_and_infinite_outputs_are_printed_as_strings_in_strict_json(demo_server: ServerProcess) -> None:
    done = _run(
        "--url", demo_server.url, "infer", "multi_io", "-i", "a=[[NaN, Infinity, -Infinity, 1.5]]",
        "-i", "b=[[0,0,0,0]]", "-i", "flag=[[true]]", "-i", 'text=[["a","b"]]', "-o", "sum", "-o", "half",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr

    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    body = json.loads(done.stdout, parse_constant=refuse)
    assert body == {"sum": [["nan", "inf", "-inf", 1.5]], "half": [["nan", "inf", "-inf", 1.5]]}
    assert np.array(body["sum"], dtype=np.float32)[0, 1] == np.inf  # numpy reads them back


def test_an_unreachable_server_exits_3() -> None:
    done = _run("--url", f"127.0.0.1:{free_port()}", "--timeout", "2", "health")
    assert done.returncode == 3
    assert "cannot reach" in done.stderr and "Traceback" not in done.stderr


def test_bad_arguments_exit_2_with_usage() -> None:
    done = _run("frobnicate")
    assert done.returncode == 2 and "usage:" in done.stderr
