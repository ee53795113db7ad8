"""slurm/dragon-bench.sbatch on the test cluster (slurm/start-cluster.sh): the harness runs once on the first
node, its cross-node part spans both nodes, and the JSON it writes has the cross-node figures (no timing
asserted)."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from slurm_util import no_leaked_node_segments, slurm_cluster, wait_job

# Nothing runs in this host's /dev/shm: every node has its own, checked by no_leaked_node_segments.
pytestmark = [pytest.mark.slurm, pytest.mark.allow_leaks, pytest.mark.usefixtures("no_leaked_node_segments")]
__all__ = ["no_leaked_node_segments", "slurm_cluster"]  # fixtures, imported for pytest

SBATCH = Path(__file__).resolve().parent.parent / "slurm" / "dragon-bench.sbatch"


@pytest.mark.timeout(150)
def test_sbatch_template_runs_the_bench_across_two_nodes(slurm_cluster, tmp_path):
    if shutil.which("dragon-bench") is None:
        pytest.skip("dragon-bench is not installed (pip install -e '.[bench]')")
    # the template as a user submits it, with a small quick selection as its arguments
    res = subprocess.run(
        [
            "sbatch",
            "--parsable",
            f"--chdir={tmp_path}",
            "--time=3",
            str(SBATCH),
            "channels",
            "xnode",
            "--quick",
            "--no-dragonhpc",
            "--sizes",
            "8,64K",
            "--peers",
            "dragon,mp-pipe,mpi4py",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    job = int(res.stdout.strip().split(";")[0])
    state = wait_job(job, timeout=130)
    out = tmp_path / f"dragon-bench-{job}.out"  # the template's --output
    text = out.read_text() if out.exists() else ""
    assert state == "COMPLETED", f"job {job} ended {state}:\n{text[-3000:]}"
    doc = json.loads((tmp_path / f"dragon-bench-{job}.json").read_text())
    assert doc["env"]["slurm_job_id"] == str(job)
    assert any("Slurm nodes" in n for n in doc["notes"]), doc["notes"]
    from benchmarks.util import mpicc_path

    floor = ("relay-floor",) if mpicc_path() else ()  # (benchmarks/relay_floor.c, under srun too)
    for peer in ("dragon", "mpi4py", *floor):
        figs = [f for f in doc["results"] if f["group"] == "xnode" and f["peer"] == peer]
        assert figs and all(f["median"] > 0 for f in figs), (peer, doc["skipped"])
    assert (tmp_path / f"dragon-bench-{job}.png").stat().st_size > 10_000
    assert "RATIOS" in text
