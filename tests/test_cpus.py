"""How many CPUs a process's models share (models/cpus.py), which sets onnxruntime's thread counts.

A container's CPU quota is read from real cgroup files, laid out here in a
temporary folder as the kernel lays them out (cgroup v2's ``cpu.max``, v1's
``cpu.cfs_quota_us`` and ``cpu.cfs_period_us``); ``--workers N`` processes on the same
CPUs each get an Nth. The runner's tests read the resulting threads back from
onnxruntime (tests/test_instance_count.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from infergate.models.cpus import cgroup_cpu_limit, cpu_share, model_cpus, usable_cpus


def _cgroups(tmp_path: Path, membership: str, files: dict[str, str]) -> tuple[Path, Path]:
    """A /proc/self/cgroup with ``membership`` and a cgroup tree holding ``files``."""
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text(membership)
    root = tmp_path / "sys-fs-cgroup"
    for relative, text in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(text + "\n")
    return proc, root


@pytest.mark.parametrize(
    ("membership", "files", "limit"),
    [
        pytest.param("0::/\n", {"cpu.max": "200000 100000"}, 2.0, id="v2 container"),
        pytest.param("0::/\n", {"cpu.max": "150000 100000"}, 1.5, id="v2 fraction"),
        pytest.param("0::/\n", {"cpu.max": "max 100000"}, None, id="v2 no quota"),
        pytest.param(
            "0::/kubepods/pod1/c1\n",
            {"kubepods/pod1/c1/cpu.max": "400000 100000", "kubepods/pod1/cpu.max": "100000 100000"},
            1.0,
            id="v2 a tighter quota above",
        ),
        pytest.param(
            "2:cpu,cpuacct:/docker/abc\n",
            {"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "50000", "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000"},
            0.5,
            id="v1",
        ),
        pytest.param(
            "1:cpu:/\n0::/\n",
            {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"},
            None,
            id="v1 unlimited, hybrid layout",
        ),
        pytest.param("4:memory:/x\n", {"memory/x/memory.max": "1"}, None, id="no cpu controller"),
        pytest.param("0::/\n", {"cpu.max": "garbage"}, None, id="unreadable"),
    ],
)
def test_the_cpu_quota_is_read_from_the_processs_cgroups(
    tmp_path: Path, membership: str, files: dict[str, str], limit: float | None
) -> None:
    proc, root = _cgroups(tmp_path, membership, files)
    assert cgroup_cpu_limit(proc, root) == limit


def test_no_cgroup_file_means_no_quota(tmp_path: Path) -> None:
    assert cgroup_cpu_limit(tmp_path / "missing", tmp_path) is None


@pytest.mark.parametrize(
    ("affinity", "limit", "workers", "share"),
    [
        pytest.param(64, None, 1, None, id="the whole machine: onnxruntime's own choice"),
        pytest.param(64, 2.0, 1, 2, id="a 2-CPU quota on a 64-CPU node"),
        pytest.param(64, 1.5, 1, 2, id="a quota rounds up"),
        pytest.param(64, 0.5, 1, 1, id="at least one"),
        pytest.param(16, None, 4, 4, id="four workers"),
        pytest.param(16, 8.0, 4, 2, id="four workers under a quota"),
        pytest.param(2, None, 4, 1, id="more workers than CPUs"),
        pytest.param(1, None, 2, None, id="one CPU: all of it"),
    ],
)
def test_a_processs_models_share_its_cpus_cut_to_its_quota_and_among_its_workers(
    affinity: int, limit: float | None, workers: int, share: int | None
) -> None:
    assert cpu_share(affinity, limit, workers) == share


def test_on_this_machine_one_process_shares_what_it_may_use() -> None:
    usable = usable_cpus()
    assert usable >= 1
    assert model_cpus(1) in (None, usable)
    assert model_cpus(2 * usable) in (None, 1)
