"""The Slurm recipes end to end on a real single-node Slurm (tests/slurm_cluster.py).

- ``sbatch slurm/batch.sbatch`` (2 tasks, ``srun --mpi=pmix`` and the ``mpirun`` fallback) writes the
  same JSONL as ``mpirun -hostfile hostfiles/localhost -n 2 plexus generate --json`` (greedy);
- ``sbatch slurm/serve.sbatch`` reports an endpoint that answers ``/health`` and a completion equal
  to the batch reference, and ``scancel`` ends the job cleanly;
- plain ``srun`` without PMIx (N singletons of world size 1) is refused with the clear message.

The first test needs no Slurm: it checks that the flags the scripts pass exist in the real CLI.
Slurm tests need root (the harness may apt-get install Slurm and runs slurmd); they are skipped
otherwise, unless CI=true, where they must run.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import click
import pytest

from tests.helpers import REPO_ROOT, find_mpirun, plexus_cmd, run
from tests.slurm_cluster import SlurmCluster

PROMPTS = ["Once upon a time", "The little dog", "Hello"]
MAX_TOKENS = 8
SCRIPTS = ["slurm/batch.sbatch", "slurm/serve.sbatch", "launch/batch.sh", "launch/serve.sh"]

root_or_ci = pytest.mark.skipif(os.geteuid() != 0 and os.environ.get("CI", "").lower() != "true",
                                reason="needs root to install Slurm and run slurmd (set CI=true to force)")


# ---- no Slurm needed --------------------------------------------------------------------------------

def _script_flags(path: Path) -> dict[str, set[str]]:
    """{subcommand: long flags} from the script's ``args=(generate ...)`` / ``args+=(...)`` lines and
    its ``plexus_mpirun SUB ... -- --flag`` call."""
    flags: dict[str, set[str]] = {}
    sub = None
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        m = re.search(r"\bargs=\((\w+)", line) or re.search(r"plexus_mpirun (\w+) .*--", line)
        if m:
            sub = m.group(1)
        if sub and re.search(r"\bargs\+?=\(|plexus_mpirun \w+ ", line):
            tail = line.split("--", 1)[1] if "plexus_mpirun" in line else line
            flags.setdefault(sub, set()).update(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", tail))
    return flags


def test_script_flags_exist_in_the_cli():
    from plexus.commands import main as cli

    found = {}
    for script in SCRIPTS:
        path = REPO_ROOT / script
        subprocess.run(["bash", "-n", str(path)], check=True)  # parses
        for sub, flags in _script_flags(path).items():
            found.setdefault(sub, set()).update(flags)
    assert found.get("generate", set()) >= {"--model", "--prompts-file", "--output", "--json", "--max-tokens"}, found
    assert found.get("serve", set()) >= {"--model", "--port"}, found
    for sub, flags in found.items():
        try:
            cmd = cli.main.get_command(click.Context(cli.main), sub)
        except ImportError as e:
            if sub != "generate":
                continue  # written by others; checked once it exists (the Slurm serve test needs it too)
            raise AssertionError(e) from None
        known = {o for p in cmd.params for o in p.opts + p.secondary_opts} | {"--help"}
        assert flags <= known, f"{sub}: the scripts pass {sorted(flags - known)}, unknown to 'plexus {sub}'"


def test_launch_dry_run(tmp_path):
    # The mpirun line the wrappers build: hostfile, rank count from its slots, --bind-to none, the
    # root allowance only as root, and the generate flags after the script's own.
    prompts = tmp_path / "in.jsonl"
    prompts.write_text('{"prompt": "x"}\n')
    hostfile = REPO_ROOT / "hostfiles/localhost"
    r = subprocess.run(["bash", str(REPO_ROOT / "launch/batch.sh"), "--hostfile", str(hostfile), "--dry-run",
                        str(prompts), str(tmp_path / "out.jsonl"), "--", "--max-tokens", "3"],
                       capture_output=True, text=True, timeout=30, env=dict(os.environ, PLEXUS_X="1"))
    assert r.returncode == 0, r.stderr
    argv = r.stdout.split()
    assert argv[argv.index("-n") + 1] == "2"  # localhost slots=2
    assert argv[argv.index("--bind-to") + 1] == "none"
    assert argv[argv.index("--hostfile") + 1].endswith("hostfiles/localhost")
    assert ("--allow-run-as-root" in argv) == (os.geteuid() == 0)
    assert "PLEXUS_X" in argv and argv[argv.index("PLEXUS_X") - 1] == "-x"
    tail = argv[argv.index("generate"):]
    assert tail == ["generate", "--prompts-file", str(prompts), "--output", str(tmp_path / "out.jsonl"), "--json",
                    "--max-tokens", "3"]


# ---- on a real Slurm ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster():
    with SlurmCluster() as c:
        yield c


@pytest.fixture(scope="module")
def job_inputs(tmp_path_factory):
    """A tiny demo model (``plexus demo-model``), a prompts file, and the reference completions from
    ``mpirun -hostfile hostfiles/localhost -n 2 plexus generate --json`` (greedy)."""
    d = tmp_path_factory.mktemp("slurm-e2e")
    made = run(plexus_cmd("demo-model", "--preset", "tiny", "--out", d / "tiny"), timeout=120)
    assert made.rc == 0, made.describe()
    prompts = d / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    ref = run([find_mpirun(), "-hostfile", REPO_ROOT / "hostfiles/localhost", "-n", "2",
               *plexus_cmd("generate", "--model", d / "tiny", "--prompts-file", prompts, "--json",
                           "--max-tokens", MAX_TOKENS)], timeout=120)
    assert ref.rc == 0, ref.describe()
    assert "2 rank(s)" in ref.stderr, ref.describe()
    reference = ref.json_lines()
    assert [r["prompt"] for r in reference] == PROMPTS
    return {"dir": d, "model": d / "tiny", "prompts": prompts, "reference": reference}


def _job_env(cluster, inputs, **extra) -> dict:
    return {"PLEXUS_MODEL": inputs["model"], "PLEXUS_REPO": REPO_ROOT, "PLEXUS_VENV": cluster.venv,
            "PLEXUS_MAX_TOKENS": MAX_TOKENS, **extra}


@pytest.mark.slurm
@root_or_ci
@pytest.mark.parametrize("launcher", ["srun", "mpirun"])
@pytest.mark.timeout(240)
def test_batch_job_matches_mpirun(cluster, job_inputs, launcher, tmp_path):
    out = tmp_path / "completions.jsonl"
    job = cluster.sbatch(REPO_ROOT / "slurm/batch.sbatch", cwd=tmp_path, export=_job_env(
        cluster, job_inputs, PLEXUS_PROMPTS=job_inputs["prompts"], PLEXUS_OUTPUT=out, PLEXUS_LAUNCHER=launcher))
    state = cluster.wait(job, timeout=180)
    log = cluster.job_output(job)
    assert state == "COMPLETED", f"{state}\n{log}\n{cluster.logs()}"
    assert "2 rank(s)" in log, log  # one job of two connected ranks, not two singletons
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert got == job_inputs["reference"], log


def _get(url: str, body: dict | None = None, timeout: float = 30) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, {"error": e.read().decode(errors="replace")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slurm
@root_or_ci
@pytest.mark.timeout(240)
@pytest.mark.parametrize("stop", ["drain", "scancel"])
def test_serve_job(cluster, job_inputs, tmp_path, stop):
    """drain: SIGTERM to the batch shell (what ``#SBATCH --signal=B:TERM@120`` sends before the
    time limit; ``scancel --batch --signal=TERM`` here) reaches rank 0 as SIGUSR1 through srun,
    and the job COMPLETES with exit 0; scancel: the job is CANCELLED at once, just as cleanly."""
    try:
        import plexus.serve.app  # noqa: F401
    except ImportError as e:
        pytest.skip(f"plexus serve is not there yet ({e})")
    endpoint_file = tmp_path / "endpoint.txt"
    job = cluster.sbatch(REPO_ROOT / "slurm/serve.sbatch", cwd=tmp_path, export=_job_env(
        cluster, job_inputs, PLEXUS_PORT=_free_port(), PLEXUS_ENDPOINT_FILE=endpoint_file))
    try:
        deadline = time.time() + 120
        while not endpoint_file.exists() or not endpoint_file.read_text().strip():
            state = cluster.job_info(job).get("JobState")
            assert state in ("PENDING", "CONFIGURING", "RUNNING"), f"{state}\n{cluster.job_output(job)}"
            assert time.time() < deadline, "no endpoint file\n" + cluster.job_output(job)
            time.sleep(0.2)
        endpoint = endpoint_file.read_text().strip()
        assert re.fullmatch(r"[\w.-]+:\d+", endpoint), endpoint
        assert f"PLEXUS_ENDPOINT={endpoint}" in cluster.job_output(job)
        base = f"http://{endpoint}"

        status, health = None, {}
        while time.time() < deadline:  # the file is written at job start; ready once /health answers
            try:
                status, health = _get(f"{base}/health", timeout=5)
                if status == 200:
                    break
            except (urllib.error.URLError, ConnectionError, socket.timeout):
                pass
            assert cluster.job_info(job).get("JobState") == "RUNNING", cluster.job_output(job)
            time.sleep(0.5)
        assert status == 200, f"/health never answered 200 ({health})\n{cluster.job_output(job)}"
        assert health.get("world_size") == 2, health

        ref = job_inputs["reference"][0]
        status, body = _get(f"{base}/v1/completions", {"model": health["model"], "prompt": ref["prompt"],
                                                       "max_tokens": MAX_TOKENS, "temperature": 0})
        assert status == 200, body
        assert body["choices"][0]["text"] == ref["text"], (body, ref)
        assert "2 rank(s)" in cluster.job_output(job)
        if stop == "drain":
            cluster.run(["scancel", "--batch", "--signal=TERM", str(job)])
            assert cluster.wait(job, timeout=60) == "COMPLETED", cluster.job_output(job)
            assert cluster.job_info(job).get("ExitCode") == "0:0", cluster.job_info(job)
            log = cluster.job_output(job)
            assert log.count("SIGUSR1 (a stop request): stopping: no new requests") == 1, log
    finally:
        cluster.scancel(job)
    if stop == "scancel":
        assert cluster.wait(job, timeout=60) == "CANCELLED"
    # a clean end: the endpoint is gone and no step of the job is left
    host, port = endpoint.rsplit(":", 1)
    deadline = time.time() + 30
    while time.time() < deadline:
        with socket.socket() as s:
            s.settimeout(1)
            if s.connect_ex((host, int(port))) != 0:
                break
        time.sleep(0.2)
    else:
        pytest.fail(f"{endpoint} still accepts connections after scancel")
    steps = cluster.run(["squeue", "-h", "-s", "-j", str(job)], check=False).stdout.strip()
    assert not steps, steps


@pytest.mark.slurm
@root_or_ci
@pytest.mark.timeout(120)
def test_srun_without_pmix_is_refused(cluster, job_inputs):
    python = str(cluster.venv / "bin" / "python")
    r = cluster.srun(["--mpi=none", "-n", "2", python, "-m", "plexus", "generate", "--model",
                      str(job_inputs["model"]), "--prompt", "Hello", "--max-tokens", "2"], timeout=90,
                     env={"PYTHONPATH": str(REPO_ROOT)})
    assert r.returncode != 0, r.stdout + r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("plexus: error:")]
    assert len(errors) == 2, r.stderr  # each singleton says it, none generates
    assert all("the launcher started 2 tasks but MPI sees a world of 1" in e and "srun --mpi=pmix" in e
               for e in errors), errors
    assert "Traceback" not in r.stderr and not r.stdout.strip(), r.stdout + r.stderr

