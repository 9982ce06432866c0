"""The ways a model can run that the check compares, and a repository for each.

A *variant* is a few lines appended to every demo model's config.yaml: the
execution providers and ``device_execution``. Each variant gets its own
repository whose version folders link to one copy of the demo models, so the
models are written once.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from dataclasses import dataclass

from infergate.demo import DEMO_MODEL_NAMES, write_demo_repository  # type: ignore[import-untyped,unused-ignore]

__all__ = ["CPU_VARIANTS", "GPU_VARIANTS", "GRAPH_SIZES", "SERVED_MODELS", "Variant", "write_variant"]

# The models the load runs use: servers load only these, so they start sooner and hold less memory.
SERVED_MODELS = ("matmul16", "mlp")

# Models whose tensors all have fixed shapes besides the batch (no BYTES): they can replay CUDA graphs.
# Sizes are powers of two up to each model's max_batch_size, so padding at most doubles a batch.
GRAPH_SIZES: dict[str, list[int]] = {
    "matmul16": [1, 2, 4, 8, 16, 32, 64],
    "mlp": [1, 2, 4, 8, 16, 32, 64],
    "cnn": [1, 2, 4, 8, 16, 32],
}

_CUDA = "execution_providers:\n  - {name: cuda, options: {device_id: 0}}\n"


@dataclass(frozen=True)
class Variant:
    """``name``: a label; ``what``: one line for the report; ``graphs``: capture CUDA graphs where a model can."""

    name: str
    what: str
    providers: str  # the execution_providers block
    io_binding: str  # auto | true | false
    graphs: bool = False

    def config(self, model: str) -> str:
        """The lines this variant appends to ``model``'s config.yaml."""
        lines = [self.providers, "device_execution:\n", f"  io_binding: {self.io_binding}\n"]
        if self.graphs and model in GRAPH_SIZES:
            lines.append(f"  cuda_graph_batch_sizes: {GRAPH_SIZES[model]}\n")
        return "".join(lines)


GPU_VARIANTS = (
    Variant("cuda", "CUDA EP, IO binding (the default on a GPU)", _CUDA, "auto"),
    Variant("cuda_run", "CUDA EP, session.run (IO binding off)", _CUDA, "false"),
    Variant("cuda_graphs", "CUDA EP, IO binding and CUDA graphs", _CUDA, "auto", graphs=True),
)
CPU_VARIANTS = (
    Variant("cpu_bound", "CPU EP, IO binding forced on", "execution_providers: [{name: cpu}]\n", "true"),
    Variant("cpu", "CPU EP, session.run", "execution_providers: [{name: cpu}]\n", "auto"),
    Variant(
        "cuda_fallback",
        "cuda then cpu with CUDA graphs asked for: falls back to the CPU with a warning",
        "execution_providers: [{name: cuda}, {name: cpu}]\n",
        "auto",
        graphs=True,
    ),
)


def write_variant(
    models: pathlib.Path,
    root: pathlib.Path,
    variant: Variant,
    names: Sequence[str] = DEMO_MODEL_NAMES,
    suffix: str = "",
) -> pathlib.Path:
    """A repository ``root/<variant><suffix>`` of ``names``, linking to the demo models written in ``models``."""
    if not (models / DEMO_MODEL_NAMES[0]).is_dir():
        write_demo_repository(models)
    repo = root / f"{variant.name}{suffix}"
    for name in names:
        model_dir = repo / name
        model_dir.mkdir(parents=True, exist_ok=True)
        link = model_dir / "1"
        if not link.exists():
            link.symlink_to((models / name / "1").resolve(), target_is_directory=True)
        base = (models / name / "config.yaml").read_text(encoding="utf-8")
        (model_dir / "config.yaml").write_text(base + variant.config(name), encoding="utf-8")
    return repo
