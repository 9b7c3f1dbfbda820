"""``plexus generate`` as users and scripts call it: without mpirun (a world of one), as
``python -m plexus``, with --json / --output / --prompts-file / --chat / --stop / --max-tokens,
with the embedded default model, and under ``mpirun -n 2`` (only rank 0 prints).

Expected values come from outside Plexus: the stories260K README's published ids and text,
transformers' tokenizer, chat template and ``generate``, and the ``tokenizers`` library.
"""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer as HFTokenizer

from tests.helpers import hf_reference, plexus_cmd, python_cmd, run, run_mpi

pytestmark = pytest.mark.timeout(120)

ONCE = "Once upon a time"
ONCE_IDS = [1, 403, 407, 261, 378]  # README of stories260K
ONCE_CONTINUATION = [432, 383, 286, 261, 376, 298, 315, 421, 395, 317]  # README: greedy continuation
RECORD_TYPES = {"prompt": str, "prompt_token_ids": list, "token_ids": list, "text": str, "finish_reason": str}


def generate(model, *args, n: int = 1, env=None, timeout: float = 90):
    cmd = plexus_cmd("generate", *(["--model", model] if model else []), *args)
    r = run(cmd, timeout=timeout, env=env) if n == 1 else run_mpi(n, cmd, timeout=timeout, env=env)
    assert r.rc == 0 and not r.timed_out, r.describe()
    return r


def check_record(rec: dict) -> None:
    for key, typ in RECORD_TYPES.items():
        assert isinstance(rec[key], typ), (key, rec)
    assert all(isinstance(i, int) for i in rec["prompt_token_ids"] + rec["token_ids"])
    assert rec["finish_reason"] in ("stop", "length")


def decode(model_dir, ids) -> str:
    return HFTokenizer.from_file(str(model_dir / "tokenizer.json")).decode(ids, skip_special_tokens=True)


def test_json_without_mpirun_matches_published_tokens(stories_dir):
    """World size 1 without mpirun; --json fields and types; --max-tokens ends with "length"."""
    r = generate(stories_dir, "--prompt", ONCE, "--max-tokens", "10", "--json")
    (rec,) = r.json_lines()
    check_record(rec)
    assert set(rec) >= set(RECORD_TYPES)
    assert rec["prompt"] == ONCE
    assert rec["prompt_token_ids"] == ONCE_IDS
    assert rec["token_ids"] == ONCE_CONTINUATION
    assert rec["text"] == decode(stories_dir, ONCE_CONTINUATION)
    assert rec["finish_reason"] == "length"


def test_demo_model_greedy_matches_transformers(demo_tiny):
    """The CLI's prompt ids are the tokenizer's, and its greedy tokens are transformers' (up to
    the first EOS, where Plexus stops)."""
    prompt = "The cat sat on the mat"
    rec = generate(demo_tiny, "--prompt", prompt, "--max-tokens", "16", "--json").json_lines()[0]
    check_record(rec)
    assert rec["prompt_token_ids"] == HFTokenizer.from_file(str(demo_tiny / "tokenizer.json")).encode(prompt).ids
    want = hf_reference(demo_tiny, rec["prompt_token_ids"], 16)["tokens"]
    if 1 in want:  # the demo's EOS id
        want = want[:want.index(1) + 1]
    assert rec["token_ids"] == want
    assert rec["finish_reason"] == ("stop" if want[-1] == 1 else "length")


def test_python_dash_m_plexus_with_output_file(stories_dir, tmp_path):
    """``python -m plexus`` runs the same CLI; --output writes the JSON lines there, not to stdout."""
    out = tmp_path / "out.jsonl"
    r = run(python_cmd("-m", "plexus", "generate", "--model", stories_dir, "--prompt", ONCE, "--max-tokens", "6",
                       "--output", out), timeout=90)
    assert r.rc == 0, r.describe()
    assert r.stdout.strip() == ""
    lines = out.read_text().splitlines()
    assert len(lines) == 1
    rec = json.loads(lines[0])
    check_record(rec)
    assert rec["token_ids"] == ONCE_CONTINUATION[:6]


def test_python_dash_m_plexus_beside_a_plexus_folder(demo_tiny, tmp_path):
    """``python -m plexus`` from a directory holding a plexus/ folder (the clone, say), with
    Plexus found through the install alone: the folder must not stand in for the package."""
    (tmp_path / "plexus").mkdir()
    r = run(python_cmd("-m", "plexus", "generate", "--model", demo_tiny, "--prompt", "Hi", "--max-tokens", "3",
                       "--json"), timeout=90, cwd=tmp_path, env={"PYTHONPATH": ""})
    assert r.rc == 0, r.describe()
    (rec,) = r.json_lines()
    check_record(rec)
    assert len(rec["token_ids"]) <= 3


def test_prompts_file_with_prompt_and_messages_lines(demo_tiny, tmp_path):
    from transformers import AutoTokenizer

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Hello"}) + "\n\n" + json.dumps({"messages": messages}) + "\n")
    recs = generate(demo_tiny, "--prompts-file", prompts, "--max-tokens", "4", "--json").json_lines()
    assert len(recs) == 2
    for rec in recs:
        check_record(rec)
    plain, chat = recs
    assert plain["prompt"] == "Hello" and "messages" not in plain
    hf = AutoTokenizer.from_pretrained(str(demo_tiny))
    assert chat["messages"] == messages
    assert chat["prompt"] == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    want_ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"]
    assert chat["prompt_token_ids"] == want_ids
    assert chat["prompt_token_ids"].count(0) == 1 and chat["prompt_token_ids"][0] == 0  # one BOS


def test_chat_flag_wraps_prompt_in_template(demo_tiny):
    from transformers import AutoTokenizer

    rec = generate(demo_tiny, "--chat", "--prompt", "Hi there", "--max-tokens", "4", "--json").json_lines()[0]
    hf = AutoTokenizer.from_pretrained(str(demo_tiny))
    messages = [{"role": "user", "content": "Hi there"}]
    assert rec["prompt"] == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rec["prompt_token_ids"] == hf.apply_chat_template(messages, tokenize=True,
                                                             add_generation_prompt=True)["input_ids"]


def test_stop_string_cuts_text(stories_dir):
    """``ttle gi`` spans the tokens of "little" and " girl" in the published continuation
    ", there was a little girl named Lily"."""
    stop = "ttle gi"
    full = decode(stories_dir, ONCE_CONTINUATION)
    want = full[:full.index(stop)]
    rec = generate(stories_dir, "--prompt", ONCE, "--max-tokens", "10", "--stop", stop, "--json").json_lines()[0]
    assert rec["text"] == want
    assert rec["finish_reason"] == "stop"
    assert rec["token_ids"] == ONCE_CONTINUATION[:len(rec["token_ids"])]
    assert decode(stories_dir, rec["token_ids"][:-1]).find(stop) == -1  # stopped at the first token that completes it


def test_stop_string_in_streamed_text(stories_dir):
    """Plain output streams text as it becomes stable; the stop string ("Lily", completed by the
    last allowed token) is never printed."""
    full = decode(stories_dir, ONCE_CONTINUATION)
    assert full.endswith("Lily")
    plain = generate(stories_dir, "--prompt", ONCE, "--max-tokens", "10", "--stop", "xyz", "--stop", "Lily")
    assert plain.stdout == full[:-len("Lily")] + "\n"


def test_eos_finish_reason_stop(stories_dir):
    """stories260K ends a story with BOS (id 1, an EOS id in its generation_config, not in
    config.json): a long greedy run stops there with finish_reason "stop"."""
    rec = generate(stories_dir, "--prompt", "The end.", "--max-tokens", "400", "--json").json_lines()[0]
    check_record(rec)
    assert rec["finish_reason"] == "stop"
    assert rec["token_ids"][-1] in (1, 2) and len(rec["token_ids"]) < 400
    assert not {1, 2} & set(rec["token_ids"][:-1])
    assert rec["text"] == decode(stories_dir, rec["token_ids"])


def test_default_model_in_plexus_cache(tmp_path, demo_tiny, monkeypatch):
    cache = tmp_path / "cache"
    r = generate(None, "--prompt", "Hello", "--max-tokens", "5", "--json", env={"PLEXUS_CACHE": str(cache)})
    assert "embedded tiny demo model" in r.stderr
    made = cache / "demo-tiny"
    check_record(r.json_lines()[0])
    # the embedded default is the tiny demo preset, byte for byte
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (made / f).read_bytes() == (demo_tiny / f).read_bytes(), f
    # created once: a second use finds it and writes nothing
    from plexus.checkpoint.demo import ensure_default_model

    mtime = (made / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setenv("PLEXUS_CACHE", str(cache))
    assert ensure_default_model(log=lambda _: None) == made
    assert (made / "model.safetensors").stat().st_mtime_ns == mtime


def test_only_rank_zero_prints_under_mpirun(stories_dir, tmp_path):
    text = decode(stories_dir, ONCE_CONTINUATION)
    plain = generate(stories_dir, "--prompt", ONCE, "--max-tokens", "10", n=2)
    assert plain.stdout == text + "\n"
    # two prompts, each cut early by a stop string: the worker rank must be released from the
    # first generation and follow the second one in step
    prompts = tmp_path / "two.jsonl"
    prompts.write_text((json.dumps({"prompt": ONCE}) + "\n") * 2)
    js = generate(stories_dir, "--prompts-file", prompts, "--max-tokens", "10", "--stop", "girl", "--json", n=2)
    recs = js.json_lines()
    assert len(recs) == 2
    for rec in recs:
        assert rec["text"] == text[:text.index("girl")] and rec["finish_reason"] == "stop"
        assert rec["token_ids"] == ONCE_CONTINUATION[:len(rec["token_ids"])]
    assert "Traceback" not in js.stderr
