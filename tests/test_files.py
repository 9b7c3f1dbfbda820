"""Files Plexus writes for the user get the modes the user's umask gives any other tool's: the
demo models (`plexus demo-model`, the embedded default, bench presets) and the kernel cache."""

from __future__ import annotations

import stat
import sys
from pathlib import Path

import pytest

from tests.helpers import run

CODE = """
import os, sys
os.umask(int(sys.argv[1], 8))
os.environ["PLEXUS_CACHE"] = sys.argv[2]
import torch
from plexus.checkpoint import demo
from plexus.models import kernels
demo.write_demo_model(sys.argv[2] + "/out", "tiny")
demo.ensure_default_model(log=lambda _: None)
try:
    print(kernels.build(dtype=torch.float32))
except RuntimeError:  # no C compiler here
    print("")
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("umask, file_mode, dir_mode", [("022", 0o644, 0o755), ("077", 0o600, 0o700)])
def test_written_files_follow_the_umask(tmp_path, umask, file_mode, dir_mode):
    r = run([sys.executable, "-c", CODE, umask, str(tmp_path)], timeout=110)
    assert r.rc == 0, r.describe()
    for d in (tmp_path / "out", tmp_path / "demo-tiny"):
        assert stat.S_IMODE(d.stat().st_mode) == dir_mode, d
        files = sorted(d.iterdir())
        assert {f.name for f in files} >= {"config.json", "model.safetensors", "tokenizer.json"}
        for f in files:
            assert stat.S_IMODE(f.stat().st_mode) == file_mode, (f, oct(f.stat().st_mode))
    lib = r.stdout.strip()
    if lib:  # a shared library: executable where the umask allows
        assert stat.S_IMODE(Path(lib).stat().st_mode) == dir_mode, lib
