"""Paths of the tools ``make tools`` unpacks under .tools/ (no root), and a guard that fails loudly.

A missing tool fails the test that needs it, naming the script that installs it: a check
that quietly skipped on a machine without the tool would hide what it is there to find.
"""

from __future__ import annotations

from pathlib import Path

import pytest

__all__ = ["HELM", "PROMTOOL", "ROOT", "require"]

ROOT = Path(__file__).resolve().parent.parent
HELM = ROOT / ".tools" / "helm" / "helm"
PROMTOOL = ROOT / ".tools" / "prometheus" / "usr" / "bin" / "promtool"


def require(tool: Path, installer: str) -> str:
    """``tool`` as a string for subprocess, or fail the test saying how to install it."""
    if not tool.exists():
        pytest.fail(f"{tool.relative_to(ROOT)} is missing: run scripts/{installer} (make test does)")
    return str(tool)
