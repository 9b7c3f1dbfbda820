"""``plexus perplexity`` against transformers: the same token stream (BOS + the text's tokens),
the same windows, each scored by transformers' LlamaForCausalLM with a float64 log-softmax,
must give the same perplexity at world sizes 1 and 2; on the real stories260K too. Bad input
is one clean error line before any weight is read.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.helpers import assert_clean_error, plexus_cmd, run, run_mpi

pytestmark = pytest.mark.timeout(300)
REL = 1e-4

WORDS = ("the cat sat on a mat and the dog ran far away , then it came home quickly to eat some "
         "bread with jam while the sun went down over 42 hills .").split()
STORY = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park "
         "with her friend Tom. One day, they saw a big red ball under a tree. Lily said, \"Let's play "
         "with the ball!\" Tom was happy and they played all day. When the sun went down, Lily's mom "
         "called her home. Lily gave Tom a hug and said, \"See you tomorrow!\" She went home and ate "
         "her dinner. Then she went to bed and dreamed about the big red ball.")


def reference(model_dir: Path, text: str, context: int) -> dict:
    """transformers' own tokenizer and model: BOS + the text's tokens, consecutive windows of
    ``context`` tokens (one of a single token dropped), each scored on all but its first token."""
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    ids = ([tok.bos_token_id] if tok.bos_token_id is not None else []) + tok(text, add_special_tokens=False).input_ids
    model = transformers.LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    nll, count, windows = 0.0, 0, 0
    with torch.no_grad():
        for start in range(0, len(ids), context):
            w = ids[start:start + context]
            if len(w) < 2:
                continue
            logits = model(torch.tensor([w])).logits[0, :-1].double()  # (len(w) - 1, vocab)
            nll -= torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(w[1:])[:, None]).sum().item()
            count, windows = count + len(w) - 1, windows + 1
    return {"perplexity": math.exp(nll / count), "tokens": count, "windows": windows, "stream": len(ids)}


def perplexity(world_size: int, model_dir: Path, text_file: Path, *args) -> dict:
    cmd = plexus_cmd("perplexity", "--model", model_dir, "--text-file", text_file, "--json", *args)
    r = run(cmd, timeout=120) if world_size == 1 else run_mpi(world_size, cmd, timeout=120)
    assert r.rc == 0 and not r.timed_out, r.describe()
    (out,) = r.json_lines()
    return out


@pytest.fixture(scope="module")
def llama(hf_checkpoint, demo_tiny) -> Path:
    """A random transformers Llama with 512 positions (a default window spans two of the
    engine's 256-position scoring passes) and the demo model's tokenizer."""
    return hf_checkpoint("llama", "ppl-llama", tokenizer_from=demo_tiny, max_position_embeddings=512)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    import random

    rng = random.Random(0)
    path = tmp_path_factory.mktemp("ppl") / "text.txt"
    path.write_text(" ".join(rng.choice(WORDS) for _ in range(400)))
    return path


# None: the default window (the model's 512 positions); 258 tokens: a window's 257 inputs are one
# 256-position pass and a one-token step; 100: many windows and a short last one
@pytest.mark.parametrize("world_size, context", [(1, None), (1, 258), (2, 258), (2, 100)])
def test_matches_transformers(llama, text_file, world_size, context):
    window = context or 512
    ref = reference(llama, text_file.read_text(), window)
    assert ref["windows"] >= 2 and ref["stream"] % window > 1, "the text must fill windows and a short last one"
    got = perplexity(world_size, llama, text_file, *(["--context", context] if context else []))
    assert got["tokens"] == ref["tokens"] == ref["stream"] - ref["windows"], (got, ref)
    assert got["windows"] == ref["windows"] and got["context"] == window, (got, ref)
    assert got["perplexity"] == pytest.approx(ref["perplexity"], rel=REL), (got, ref)
    # the model is random but not flat: a wrong target or position moves the number far
    assert ref["perplexity"] > 1.5


def test_world_sizes_agree_and_the_default_is_one_line(llama, text_file):
    """The same number at world sizes 1 and 2, and without --json one human line with it."""
    one = perplexity(1, llama, text_file, "--context", 300)
    r = run_mpi(2, plexus_cmd("perplexity", "--model", llama, "--text-file", text_file, "--context", 300),
                timeout=120)
    assert r.rc == 0, r.describe()
    (line,) = r.stdout.splitlines()
    assert line.startswith("perplexity ") and f"over {one['tokens']} tokens" in line, line
    assert float(line.split()[1]) == pytest.approx(one["perplexity"], rel=REL), (line, one)


def test_stories260k_matches_transformers(stories_dir, tmp_path):
    """A real trained model on a story like its training data: a modest perplexity, the same as
    transformers' at world sizes 1 (several windows) and 2 (one window)."""
    text = tmp_path / "story.txt"
    text.write_text(STORY)
    for world_size, context in ((1, 48), (2, None)):
        ref = reference(stories_dir, STORY, context or 512)
        got = perplexity(world_size, stories_dir, text, *(["--context", context] if context else []))
        assert got["tokens"] == ref["tokens"] and got["windows"] == ref["windows"], (got, ref)
        assert got["perplexity"] == pytest.approx(ref["perplexity"], rel=REL), (got, ref)
        assert math.isfinite(got["perplexity"]) and 1 < got["perplexity"] < 20, got
    assert ref["windows"] == 1


def test_windows_and_lengths():
    from plexus.commands.perplexity import window_length, windows
    from plexus.errors import PlexusError
    from plexus.models.config import ModelConfig

    assert windows(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5]]  # a one-token tail predicts nothing
    assert windows(list(range(8)), 3) == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert windows([5, 6], 512) == [[5, 6]]

    class Config:
        max_position_embeddings = 512

    config: ModelConfig = Config()  # type: ignore[assignment]
    assert window_length(config, None, None) == (512, 512)
    assert window_length(config, 100, None) == (100, 100)  # the KV cache is one window
    assert window_length(config, None, 64) == (64, 64)
    assert window_length(config, 32, 64) == (32, 64)
    for context, max_context, needle in ((1, None, "at least 2"), (513, None, "512 positions"),
                                         (128, 64, "longer than --max-context 64"),
                                         (None, 1, "nothing to score")):
        with pytest.raises(PlexusError, match=needle):
            window_length(config, context, max_context)


def test_bad_input_is_one_clean_error_before_loading(demo_tiny, tmp_path):
    """Each at world size 2, on a copy whose weights file is garbage: an error that came after
    loading would name that file instead."""
    import shutil

    d = tmp_path / "no-weights"
    shutil.copytree(demo_tiny, d)
    (d / "model.safetensors").chmod(0o644)
    (d / "model.safetensors").write_bytes(b"not a safetensors file")
    good = tmp_path / "good.txt"
    good.write_text("Hello there, a few words of text.")
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\n")
    cases = {
        "missing": (["--text-file", tmp_path / "nope.txt"], ["nope.txt", "does not exist"]),
        "empty": (["--text-file", empty], ["empty.txt", "is empty"]),
        "context-1": (["--text-file", good, "--context", 1], ["--context", "at least 2"]),
        "beyond-positions": (["--text-file", good, "--context", 4096], ["--context 4096", "512 positions"]),
    }
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {name: pool.submit(run_mpi, 2, plexus_cmd("perplexity", "--model", d, *args), 90)
                   for name, (args, _) in cases.items()}
        # the same copy with good text gets as far as the weights: the checks are not vacuous
        control = pool.submit(run, plexus_cmd("perplexity", "--model", d, "--text-file", good, "--json"), 90)
        results = {name: f.result() for name, f in futures.items()}
    for name, (_, needles) in cases.items():
        r = results[name]
        line = assert_clean_error(r, *needles)
        assert r.rc == 1, r.describe()
        assert "safetensors" not in line, line
    assert_clean_error(control.result(), "model.safetensors")
    assert not control.result().stdout, control.result().describe()


def test_the_token_stream(tmp_path):
    """BOS first when the model has one, the text without special tokens; what cannot be scored
    is refused with the file's name (a directory, no file, blank text, one token)."""
    from plexus.commands.perplexity import read_token_stream
    from plexus.errors import PlexusError

    class Tok:
        def __init__(self, bos):
            self.bos_token_id = bos

        def encode(self, text, add_special_tokens=True):
            return ([99] if add_special_tokens else []) + [len(w) for w in text.split()]

    f = tmp_path / "t.txt"
    f.write_text("a bb ccc")
    assert read_token_stream(Tok(7), str(f)) == [7, 1, 2, 3]
    assert read_token_stream(Tok(None), str(f)) == [1, 2, 3]
    f.write_text("word")
    assert read_token_stream(Tok(7), str(f)) == [7, 4]
    with pytest.raises(PlexusError, match="t.txt gives 1 token"):
        read_token_stream(Tok(None), str(f))
    f.write_text("\n \t\n")
    with pytest.raises(PlexusError, match="t.txt is empty"):
        read_token_stream(Tok(7), str(f))
    with pytest.raises(PlexusError, match="is a directory"):
        read_token_stream(Tok(7), str(tmp_path))
    with pytest.raises(PlexusError, match="nope.txt does not exist"):
        read_token_stream(Tok(7), str(tmp_path / "nope.txt"))
    f.write_bytes(b"caf\xe9")
    with pytest.raises(PlexusError, match="not UTF-8"):
        read_token_stream(Tok(7), str(f))
