"""The GPU check in one go: ``python -m load_tests.gpu`` (scripts/gpu_check.sh installs and calls it).

Phases, one after another, within a time budget (a phase that would overrun
is skipped and listed in the report, never cut half way):

1. agreement: every demo model under every variant, outputs against the CPU;
2. compute: in-process onnxruntime on the device (numpy in and out), the ceiling;
3. scenarios: one server, the load harness and perf_analyzer, batch 1 and 8 at 1 to 256 in flight;
4. workers: ``--workers N`` for each N, req/s, average batch and memory per worker;
5. variants: session.run against IO binding against CUDA graphs.

``--cpu`` runs all of it on the CPU execution provider (the variants become
CPU ones), so CI keeps the check working on machines without a GPU;
``--quick`` shrinks every count and duration to a smoke run.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..compute import run_compute
from ..suite import SCENARIOS, environment
from .agreement import check_model
from .perf import find_perf_analyzer
from .phases import Budget, Scenario, Timing, scenario_runs, variant_runs, worker_runs
from .probe import cpu_count, gpu_facts
from .report import CheckReport, evaluate_targets, write_report
from .variants import CPU_VARIANTS, GPU_VARIANTS, SERVED_MODELS, Variant, write_variant

__all__ = ["Plan", "main", "plan_for", "run_check"]

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


@dataclass(frozen=True)
class Plan:
    """Everything the check does, decided up front from --cpu and --quick."""

    device_provider: str
    variants: tuple[Variant, ...]
    timing: Timing
    scenarios: tuple[Scenario, ...]
    variant_scenarios: tuple[Scenario, ...]
    harness_processes: int
    compute_batches: tuple[int, ...]
    compute_seconds: float
    worker_counts: tuple[int, ...]
    quick: bool
    budget_s: float

    @property
    def main(self) -> Variant:
        return self.variants[0]

    def worker_clients(self, workers: int) -> int:
        """Client processes for ``--workers N``: twice N where the cores allow, each with its own connection."""
        if self.quick:
            return 1
        return max(2, min(2 * workers, cpu_count() - workers))

    def worker_scenarios(self, workers: int) -> list[Scenario]:
        clients = self.worker_clients(workers)
        return [
            Scenario("matmul16", 1, max(32 * workers, 8 * clients) if not self.quick else 8),
            Scenario("mlp", 64, max(4 * workers, clients) if not self.quick else 2),
        ]


def _sweep() -> tuple[Scenario, ...]:
    """The suite's scenarios and batch 1 and 8 at 1 to 256 in flight (matmul16 at batch 1 only)."""
    wanted = [Scenario(s.model, s.batch, s.concurrency) for s in SCENARIOS]
    for model, batch in (("matmul16", 1), ("mlp", 1), ("mlp", 8)):
        wanted += [Scenario(model, batch, c) for c in (1, 16, 64, 256)]
    unique = sorted(set(wanted), key=lambda s: (s.model, s.batch, s.concurrency))
    return tuple(unique)


def plan_for(cpu: bool, quick: bool, budget_s: float | None, workers: Sequence[int] | None) -> Plan:
    variants = CPU_VARIANTS if cpu else GPU_VARIANTS
    if quick:
        return Plan(
            device_provider=CPU if cpu else CUDA,
            variants=variants,
            timing=Timing(0.3, 1.0),  # long enough to finish a batch of 64 on a busy CI machine
            scenarios=(Scenario("matmul16", 1, 1), Scenario("mlp", 8, 8)),
            variant_scenarios=(Scenario("matmul16", 1, 4),),
            harness_processes=1,
            compute_batches=(1, 8),
            compute_seconds=0.2,
            worker_counts=tuple(workers or (2,)),
            quick=True,
            budget_s=budget_s or 120.0,
        )
    return Plan(
        device_provider=CPU if cpu else CUDA,
        variants=variants,
        timing=Timing(1.0, 3.0),
        scenarios=_sweep(),
        variant_scenarios=(Scenario("matmul16", 1, 64), Scenario("mlp", 1, 64)),
        harness_processes=max(1, min(4, cpu_count() // 4)),
        compute_batches=(1, 8, 64, 256),
        compute_seconds=1.5,
        worker_counts=tuple(workers or (1, 2, 4, 8)),
        quick=False,
        budget_s=budget_s or 400.0,
    )


# Share of the budget each phase may use, in the order they run (the rest of the budget carries over).
_SLICES = {"agreement": 0.12, "compute": 0.08, "scenarios": 0.34, "workers": 0.30, "variants": 0.16}


def _environment(plan: Plan, perf_status: str) -> dict[str, str]:
    import onnxruntime as ort

    env = environment()
    env.update(gpu_facts())
    env["providers"] = ",".join(ort.get_available_providers())
    env["perf_analyzer"] = perf_status
    env["cpus"] = str(cpu_count())
    env["device_provider"] = plan.device_provider
    return env


def _agreement(report: CheckReport, plan: Plan, repos: dict[str, pathlib.Path], budget: Budget) -> None:
    from infergate.demo import DEMO_MODEL_NAMES  # type: ignore[import-untyped,unused-ignore]

    for variant in plan.variants:
        for model in DEMO_MODEL_NAMES:
            if not budget.allows(3.0):
                report.skipped.append(f"agreement {variant.name}/{model}: out of time")
                continue
            result = check_model(repos[variant.name], variant.name, model, plan.quick)
            report.agreement.append(result)
            if not result.ok:
                report.failures.append(f"agreement {variant.name}/{model}: {result.error or 'outputs differ'}")


def _compute(report: CheckReport, plan: Plan, models: pathlib.Path, budget: Budget) -> None:
    jobs = [
        ("mlp", plan.device_provider, plan.compute_batches),
        ("matmul16", plan.device_provider, plan.compute_batches),
    ]
    if plan.device_provider != CPU:
        jobs.append(("mlp", CPU, (64,)))  # the CPU's figure beside the device's
    for model, provider, sizes in jobs:
        if not budget.allows(len(sizes) * (plan.compute_seconds + 1.0)):
            report.skipped.append(f"compute {model} on {provider}: out of time")
            continue
        try:
            path = models / model / "1" / "model.onnx"
            report.compute += run_compute(path, sizes, plan.compute_seconds, name=model, provider=provider)
        except Exception as exc:
            report.failures.append(f"compute {model} on {provider}: {exc}")


def run_check(plan: Plan, out: pathlib.Path) -> CheckReport:
    """Run every phase within ``plan.budget_s``; write the report; return it."""
    out.mkdir(parents=True, exist_ok=True)
    perf_command, perf_status = find_perf_analyzer()
    mode = "cpu" if plan.device_provider == CPU else "gpu"
    report = CheckReport(mode, plan.quick, _environment(plan, perf_status), plan.budget_s)
    started = time.monotonic()
    if plan.device_provider not in report.environment["providers"].split(","):
        report.failures.append(
            f"onnxruntime here has no {plan.device_provider} (it has {report.environment['providers']}): "
            "nothing measured; install onnxruntime-gpu (scripts/gpu_check.sh does) or pass --cpu"
        )
        report.skipped.append("every phase: no device to measure")
        write_report(report, out)
        return report
    with tempfile.TemporaryDirectory(prefix="infergate-gpu-check-") as tmp:
        models = pathlib.Path(tmp) / "models"
        repos = {v.name: write_variant(models, pathlib.Path(tmp), v) for v in plan.variants}
        served = {v.name: write_variant(models, pathlib.Path(tmp), v, SERVED_MODELS, "-served") for v in plan.variants}
        main = served[plan.main.name]
        timing, skipped = plan.timing, report.skipped

        def scenarios(budget: Budget) -> None:
            processes = plan.harness_processes
            report.scenarios += scenario_runs(
                main, out, plan.main.name, plan.scenarios, timing, processes, perf_command, budget, skipped,
                perf_runs=1 if plan.quick else None,
            )  # fmt: skip

        def workers(budget: Budget) -> None:
            counts, runs, clients = plan.worker_counts, plan.worker_scenarios, plan.worker_clients
            report.workers += worker_runs(main, out, plan.main.name, counts, runs, clients, timing, budget, skipped)

        def variants(budget: Budget) -> None:
            # A quick run serves only the last variant (on the CPU: the fallback from cuda, through a server).
            chosen = {k: v for k, v in served.items() if not plan.quick or k == plan.variants[-1].name}
            scenarios = plan.variant_scenarios
            report.variants += variant_runs(chosen, out, scenarios, timing, plan.harness_processes, budget, skipped)

        phases: dict[str, Callable[[Budget], None]] = {
            "agreement": lambda budget: _agreement(report, plan, repos, budget),
            "compute": lambda budget: _compute(report, plan, models, budget),
            "scenarios": scenarios,
            "workers": workers,
            "variants": variants,
        }
        for name, phase in phases.items():
            phase_start = time.monotonic()
            slice_end = phase_start + _SLICES[name] * plan.budget_s + max(0.0, _carry(started, plan, name))
            try:
                phase(Budget(min(started + plan.budget_s, slice_end)))
            except Exception as exc:  # one phase failing must not lose the others' figures
                report.failures.append(f"{name}: {type(exc).__name__}: {exc}")
            report.phases_s[name] = time.monotonic() - phase_start
    report.failures += _run_failures(report)
    report.elapsed_s = time.monotonic() - started
    report.targets = evaluate_targets(report, plan.device_provider)
    write_report(report, out)
    return report


def _carry(started: float, plan: Plan, phase: str) -> float:
    """Budget the earlier phases left unused, handed on to ``phase``."""
    names = list(_SLICES)
    planned = sum(_SLICES[n] for n in names[: names.index(phase)]) * plan.budget_s
    return planned - (time.monotonic() - started)


def _run_failures(report: CheckReport) -> list[str]:
    runs = [*report.scenarios, *report.variants, *(r for w in report.workers for r in w.runs)]
    failures = [f"{r.tool} {r.variant} {r.model} b{r.batch} c{r.concurrency}: {r.error}" for r in runs if r.error]
    failures += [f"--workers {w.workers}: {w.error}" for w in report.workers if w.error]
    return failures


def _workers(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m load_tests.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="run everything on the CPU execution provider")
    parser.add_argument("--quick", action="store_true", help="smoke run: small counts, short runs")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("results/gpu-check"), help="report folder")
    parser.add_argument("--budget", type=float, help="seconds for all phases (default 400; quick 120)")
    parser.add_argument("--workers", type=_workers, help="--workers counts to measure (default 1,2,4,8; quick 2)")
    args = parser.parse_args(argv)
    plan = plan_for(args.cpu, args.quick, args.budget, args.workers)
    report = run_check(plan, args.out)
    print((args.out / "gpu_check.md").read_text(encoding="utf-8"))
    print(f"wrote {args.out / 'gpu_check.json'} and {args.out / 'gpu_check.md'}", file=sys.stderr)
    return 1 if report.failures else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
