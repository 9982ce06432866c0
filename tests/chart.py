"""Rendering the Helm chart (helm/infergate) with the real helm binary, and finding things in the result.

Shared by the chart tests (test_deploy_helm.py, test_chart_runs.py, test_chart_monitoring.py).
``make test`` installs helm into .tools (scripts/install_helm.sh); a missing helm fails the test.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml
from tools import HELM, ROOT, require

__all__ = [
    "CHART",
    "CI_VALUES",
    "FULL_VALUES",
    "Manifests",
    "container",
    "helm",
    "one",
    "refused",
    "render",
    "server_config_map",
]

CHART = ROOT / "helm" / "infergate"
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
FULL_VALUES = CHART / "ci" / "full-values.yaml"

Manifests = list[dict[str, Any]]


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require(HELM, "install_helm.sh"), *args], capture_output=True, text=True, timeout=60)


def _template_args(values: Path | None, sets: tuple[str, ...]) -> list[str]:
    args = ["template", "demo", str(CHART), "--namespace", "inference"]
    if values is not None:
        args += ["-f", str(values)]
    for item in sets:
        args += ["--set", item]
    return args


def render(values: Path | None = None, *sets: str) -> Manifests:
    result = helm(*_template_args(values, sets))
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def refused(values: Path | None = None, *sets: str) -> str:
    """helm template must fail; returns its error output."""
    result = helm(*_template_args(values, sets))
    assert result.returncode != 0, f"helm template accepted {sets}:\n{result.stdout[:2000]}"
    return result.stderr


def one(manifests: Manifests, kind: str, name: str | None = None) -> dict[str, Any]:
    found = [m for m in manifests if m["kind"] == kind and (name is None or m["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[m['metadata']['name'] for m in found]}"
    return found[0]


def container(manifests: Manifests) -> dict[str, Any]:
    pod = one(manifests, "Deployment")["spec"]["template"]["spec"]
    return next(c for c in pod["containers"] if c["name"] == "infergate")


def server_config_map(manifests: Manifests) -> dict[str, str]:
    """The data of the ConfigMap holding server.yaml (and the models' config.yaml files)."""
    (found,) = [m for m in manifests if m["kind"] == "ConfigMap" and "server.yaml" in m.get("data", {})]
    data: dict[str, str] = found["data"]
    return data
