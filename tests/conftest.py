"""Fixtures shared by the whole suite (helpers they use live in tests/helpers.py).

- ``demo_tiny``: a ``plexus demo-model --preset tiny`` checkpoint (Llama, byte-level BPE tokenizer,
  chat template), written once per session. Treat it as read-only; copy it to mutate it.
- ``hf_checkpoint(kind, name=None, **kw)``: factory for ``helpers.make_hf_checkpoint`` checkpoints,
  cached per session by their arguments.
- ``stories_dir``: the real stories260K model (skips when the shared model is absent).
- ``copy_model(src, dst)``: a writable copy of a model directory.

Nothing here starts MPI: the same conftest is loaded by every rank of
``mpirun -n K python -m pytest --with-mpi tests/test_comm_mpi.py``.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests import helpers  # noqa: E402


@pytest.fixture(scope="session")
def demo_tiny(tmp_path_factory) -> Path:
    """The tiny demo model (random-weight Llama with a real tokenizer), built once per session."""
    from plexus.checkpoint.demo import write_demo_model

    return write_demo_model(tmp_path_factory.mktemp("demo") / "tiny", preset="tiny")


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """``hf_checkpoint(kind, name=None, **kwargs) -> Path``: a transformers-made checkpoint
    (see ``helpers.make_hf_checkpoint``), written once per session per distinct arguments."""
    cache: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("hf")

    def make(kind: str, name: str | None = None, **kwargs) -> Path:
        key = json.dumps([kind, kwargs], sort_keys=True, default=str)
        if key not in cache:
            out = root / (name or f"{kind}-{len(cache)}")
            assert not out.exists(), f"checkpoint name {out.name} used twice with different arguments"
            cache[key] = helpers.make_hf_checkpoint(kind, out, **kwargs)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    """../shared/models/stories260K (read-only). Skips if this checkout has no shared models."""
    if not (helpers.STORIES_DIR / "model.safetensors").is_file():
        pytest.skip(f"stories260K not found at {helpers.STORIES_DIR}")
    return helpers.STORIES_DIR


@pytest.fixture
def copy_model():
    """``copy_model(src, dst) -> dst``: a writable copy of a model directory."""

    def copy(src: Path, dst: Path) -> Path:
        shutil.copytree(src, dst)
        for p in Path(dst).rglob("*"):
            p.chmod(0o755 if p.is_dir() else 0o644)
        return Path(dst)

    return copy
