"""Checks the single-node Slurm harness itself: PMIx launch, sbatch, singletons.

Needs root (it may apt-get install Slurm and runs slurmd). Skipped otherwise,
unless CI=true, where it must run.
"""
import os
import sys
import textwrap
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.slurm_cluster import SlurmCluster  # noqa: E402

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(
        os.geteuid() != 0 and os.environ.get("CI", "").lower() != "true",
        reason="needs root to install Slurm and run slurmd (set CI=true to force)",
    ),
]

ALLREDUCE = ("from mpi4py import MPI; c = MPI.COMM_WORLD; "
             "print('rank', c.rank, 'size', c.size, 'sum', c.allreduce(c.rank + 1), flush=True)")


@pytest.fixture(scope="module")
def cluster():
    with SlurmCluster() as c:
        yield c


@pytest.fixture(scope="module")
def python(cluster):
    return str(cluster.venv / "bin" / "python")


def _ranks(stdout: str) -> list[str]:
    return sorted(line for line in stdout.splitlines() if line.startswith("rank"))


@pytest.mark.timeout(120)
def test_srun_pmix_allreduce(cluster, python):
    r = cluster.srun(["--mpi=pmix", "-n", "2", python, "-c", ALLREDUCE])
    assert r.returncode == 0, r.stderr + cluster.logs()
    assert _ranks(r.stdout) == ["rank 0 size 2 sum 3", "rank 1 size 2 sum 3"], r.stdout


@pytest.mark.timeout(120)
def test_srun_without_pmi_gives_singletons(cluster, python):
    # Without a PMI plugin each task is its own MPI_COMM_WORLD of size 1:
    # the misconfiguration Plexus must detect and refuse.
    code = "from mpi4py import MPI; print(MPI.COMM_WORLD.size, flush=True)"
    r = cluster.srun(["--mpi=none", "-n", "2", python, "-c", code])
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["1", "1"], r.stdout


@pytest.mark.timeout(120)
def test_sbatch_srun_and_mpirun(cluster, python, tmp_path):
    # One batch job, two launch paths: srun --mpi=pmix and mpirun inside the allocation.
    script = tmp_path / "job.sbatch"
    script.write_text(textwrap.dedent(f"""\
        #!/bin/bash
        #SBATCH --ntasks=2
        #SBATCH --time=00:02:00
        set -euo pipefail
        echo "greeting=$GREETING"
        srun --mpi=pmix {python} -c "$CODE" | sed 's/^/srun: /'
        mpirun --bind-to none {python} -c "$CODE" | sed 's/^/mpirun: /'
        """))
    job = cluster.sbatch(script, export={
        "GREETING": "hello, world",  # comma: would break a plain --export=K=V
        "CODE": ALLREDUCE,
        "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    }, cwd=tmp_path)
    state = cluster.wait(job, timeout=90)
    out = cluster.job_output(job)
    assert state == "COMPLETED", f"{state}\n{out}\n{cluster.logs()}"
    assert "greeting=hello, world" in out
    for launcher in ("srun", "mpirun"):
        lines = sorted(l for l in out.splitlines() if l.startswith(f"{launcher}: rank"))
        assert lines == [f"{launcher}: rank 0 size 2 sum 3",
                         f"{launcher}: rank 1 size 2 sum 3"], out


@pytest.mark.timeout(120)
def test_scancel(cluster, tmp_path):
    script = tmp_path / "sleep.sbatch"
    script.write_text("#!/bin/bash\n#SBATCH --ntasks=1\nsleep 300\n")
    job = cluster.sbatch(script, cwd=tmp_path)
    cluster.scancel(job)
    assert cluster.wait(job, timeout=30) == "CANCELLED"
