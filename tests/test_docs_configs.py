"""Every configuration shown in the README and docs/ loads as written.

A ```yaml block whose first line is a comment naming ``config.yaml`` is a
model's config.yaml: it must validate, and its routing must fit the versions
its version policy serves out of versions 1 to N on disk (N: the highest
version the block names). A block whose first line names ``server.yaml`` is a
server configuration and must validate too. Examples cannot drift from the
code they describe.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from infergate.config import load_server_config
from infergate.models.config import load_model_config
from infergate.routing.router import check_routing

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"```ya?ml\n(.*?)```", re.S)


def blocks(kind: str) -> list[pytest.param]:
    found = []
    for document in DOCUMENTS:
        text = document.read_text(encoding="utf-8")
        for match in BLOCK.finditer(text):
            body = match.group(1)
            first = body.splitlines()[0] if body.strip() else ""
            if first.startswith("#") and kind in first.split("(")[0]:
                line = text[: match.start()].count("\n") + 1
                found.append(pytest.param(body, id=f"{document.name}:{line}"))
    return found


def test_the_documents_show_model_and_server_configs() -> None:
    assert len(blocks("config.yaml")) >= 4 and len(blocks("server.yaml")) >= 4


@pytest.mark.parametrize("text", blocks("config.yaml"))
def test_a_model_config_in_the_documents_loads_and_its_routing_fits(text: str, tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    config = load_model_config(path)
    if config.routing is None:
        return
    named = config.routing.versions().values()
    on_disk = list(range(1, max(named, default=1) + 1))
    check_routing(config.routing, config.version_policy.select(on_disk))


@pytest.mark.parametrize("text", blocks("server.yaml"))
def test_a_server_config_in_the_documents_loads(text: str, tmp_path: Path) -> None:
    assert isinstance(yaml.safe_load(text), dict)
    path = tmp_path / "server.yaml"
    path.write_text(text, encoding="utf-8")
    load_server_config(path, {})
