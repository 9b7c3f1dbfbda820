"""The scripts in launch/ as a user runs them: quickstart.sh with a prompt (and nothing from pip
on a second run), batch.sh on the example prompts file, and serve.sh ending on SIGTERM.

They run against the venv of this test run (PLEXUS_VENV=sys.prefix), which launch/test.sh made
with an editable install of this checkout; elsewhere they skip.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT, run

pytestmark = pytest.mark.timeout(180)

PIP_NOISE = ("setup: installing", "Requirement", "WARNING", "warning", "Successfully", "Obtaining", "Building")


def this_venv() -> Path:
    """The venv running the tests, if it holds an editable install of this checkout."""
    venv = Path(sys.prefix)
    import plexus

    if venv == Path(sys.base_prefix) or not Path(plexus.__file__).resolve().is_relative_to(REPO_ROOT):
        pytest.skip("needs a venv with this checkout installed (launch/test.sh makes one)")
    return venv


def script_env(tmp_path: Path, **extra) -> dict:
    """The environment a user's shell would give a launch script: this venv, a fresh cache,
    and no PYTHONPATH (the scripts must find Plexus through the venv)."""
    return {"PLEXUS_VENV": str(this_venv()), "PLEXUS_CACHE": str(tmp_path / "cache"), "PYTHONPATH": "", **extra}


def test_setup_installs_once_then_prints_nothing(tmp_path):
    env = script_env(tmp_path)
    first = run(["bash", "-c", "source launch/setup.sh test"], timeout=170, env=env, cwd=REPO_ROOT)
    assert first.rc == 0, first.describe()
    again = run(["bash", "-c", "source launch/setup.sh test && source launch/setup.sh ''"], timeout=60, env=env,
                cwd=REPO_ROOT)
    assert again.rc == 0, again.describe()
    assert again.stdout == "" and again.stderr == "", again.describe()


def test_setup_refuses_extras_that_are_not_names(tmp_path):
    r = run(["bash", "-c", "source launch/setup.sh 'Hello there'"], timeout=60, env=script_env(tmp_path),
            cwd=REPO_ROOT)
    assert r.rc == 2 and "extras must be names" in r.stderr, r.describe()


def test_quickstart_with_a_prompt(tmp_path):
    """A prompt with a space in it is the prompt, not pip extras; the venv is already set up, so
    nothing but the run itself is printed."""
    env = script_env(tmp_path)
    setup = run(["bash", "-c", "source launch/setup.sh"], timeout=170, env=env, cwd=REPO_ROOT)
    assert setup.rc == 0, setup.describe()
    r = run(["bash", str(REPO_ROOT / "launch/quickstart.sh"), "Hello there"], timeout=120, env=env, cwd=tmp_path)
    assert r.rc == 0 and not r.timed_out, r.describe()
    assert "--prompt Hello there" in r.stderr and "2 rank(s)" in r.stderr, r.describe()
    assert not [line for line in r.stderr.splitlines() if any(n in line for n in PIP_NOISE)], r.describe()
    assert r.stdout.strip(), r.describe()  # the generated text


def test_batch_sh_on_the_example_prompts(tmp_path, demo_tiny):
    """launch/batch.sh on examples/prompts.jsonl, as its header shows: one record per line, in
    order; chat lines rendered as transformers renders them; greedy tokens as transformers'."""
    from transformers import AutoTokenizer

    from tests.helpers import hf_reference

    example = REPO_ROOT / "examples" / "prompts.jsonl"
    lines = [json.loads(line) for line in example.read_text().splitlines() if line.strip()]
    assert any("prompt" in rec for rec in lines) and any("messages" in rec for rec in lines)
    out = tmp_path / "out.jsonl"
    r = run(["bash", str(REPO_ROOT / "launch/batch.sh"), "--hostfile", str(REPO_ROOT / "hostfiles/localhost"),
             str(example), str(out), "--", "--model", str(demo_tiny), "--max-tokens", "8"], timeout=150,
            env=script_env(tmp_path), cwd=tmp_path)
    assert r.rc == 0 and not r.timed_out, r.describe()
    assert "2 rank(s)" in r.stderr, r.describe()
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(got) == len(lines)
    hf = AutoTokenizer.from_pretrained(str(demo_tiny))
    for rec, want in zip(got, lines):
        if "messages" in want:
            assert rec["messages"] == want["messages"]
            assert rec["prompt"] == hf.apply_chat_template(want["messages"], tokenize=False, add_generation_prompt=True)
        else:
            assert rec["prompt"] == want["prompt"]
        tokens = hf_reference(demo_tiny, rec["prompt_token_ids"], 8)["tokens"]
        if 1 in tokens:  # the demo's EOS: Plexus stops there
            tokens = tokens[:tokens.index(1) + 1]
        assert rec["token_ids"] == tokens, rec
