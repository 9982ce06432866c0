"""What ``infergate check`` found: one :class:`Finding` per check, rendered as a table or JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

__all__ = ["Finding", "Level", "Report"]

Level = Literal["ok", "warning", "error"]


@dataclass(frozen=True, slots=True)
class Finding:
    """The outcome of one check; ``message`` names the file and field when there is one."""

    # server-config | models | config | version-policy | metadata | checksum | load | routing | ensemble | smoke
    check: str
    level: Level
    message: str
    model: str = ""
    version: str = ""


@dataclass
class Report:
    """Every finding, in the order the checks ran."""

    findings: list[Finding] = field(default_factory=list)

    def add(self, check: str, level: Level, message: str, model: str = "", version: int | str = "") -> None:
        self.findings.append(Finding(check, level, message, model, str(version)))

    def errors(self, check: str, text: str, model: str = "", version: int | str = "") -> None:
        """One error finding per problem in ``text``: a ConfigError puts each bad field on its own line,
        each starting with the file's name; other lines continue the one before (a YAML parser's excerpt)."""
        for problem in _problems(text):
            self.add(check, "error", problem, model, version)

    @property
    def ok(self) -> bool:
        """True when the repository would serve cleanly (warnings allowed)."""
        return not any(f.level == "error" for f in self.findings)

    def count(self, level: Level) -> int:
        return sum(1 for f in self.findings if f.level == level)

    def as_json(self) -> str:
        body: dict[str, Any] = {
            "ok": self.ok,
            "errors": self.count("error"),
            "warnings": self.count("warning"),
            "findings": [asdict(f) for f in self.findings],
        }
        return json.dumps(body, indent=2, ensure_ascii=False)

    def as_table(self) -> str:
        """Aligned columns MODEL VERSION CHECK RESULT, then the message; a summary line last."""
        header = ("MODEL", "VERSION", "CHECK", "RESULT")
        rows = [(f.model or "-", f.version or "-", f.check, f.level.upper(), f.message) for f in self.findings]
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + "  DETAIL"]
        for row in rows:
            lines.append("  ".join(c.ljust(w) for c, w in zip(row[:4], widths, strict=True)) + "  " + row[4])
        verdict = "would serve cleanly" if self.ok else "would NOT serve cleanly"
        lines.append(f"\n{self.count('error')} error(s), {self.count('warning')} warning(s): the repository {verdict}")
        return "\n".join(lines)


def _problems(text: str) -> list[str]:
    lines = [line.strip() for line in text.splitlines() if line.strip()] or [text]
    prefix = lines[0].split(": ", 1)[0] + ": "
    problems: list[str] = []
    for line in lines:
        if line.startswith(prefix) or not problems:
            problems.append(line)
        else:
            problems[-1] += " " + line
    return problems
