"""Tokenizer and chat template: BOS exactly once (as transformers does it), chat templates
rendered in a sandbox (model files are untrusted), and the IncrementalDecoder releasing only
stable text with stop strings cut even when they span tokens."""

from __future__ import annotations

import json
import shutil

import pytest
from tokenizers import Tokenizer as HFTokenizer

from plexus.engine.tokenizer import IncrementalDecoder, Tokenizer
from plexus.errors import PlexusError
from tests.helpers import plexus_cmd, run


@pytest.fixture(scope="module")
def demo_tok(demo_tiny):
    return Tokenizer(demo_tiny)


@pytest.fixture(scope="module")
def stories_tok(stories_dir):
    return Tokenizer(stories_dir)


def with_template(src, dst, template):
    """A copy of model dir ``src`` whose tokenizer_config.json carries ``template``."""
    dst.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json", "config.json", "generation_config.json"):
        if (src / f).is_file():
            shutil.copy(src / f, dst / f)
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    cfg["chat_template"] = template
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    return dst


# ---- BOS ---------------------------------------------------------------------------------------

def test_plain_prompt_gets_one_bos_from_post_processor(demo_tok, demo_tiny):
    ids = demo_tok.encode("Hello world")
    assert ids == HFTokenizer.from_file(str(demo_tiny / "tokenizer.json")).encode("Hello world").ids
    assert ids[0] == 0 and ids.count(0) == 1


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}],
])
def test_chat_prompt_has_one_bos_like_transformers(demo_tok, demo_tiny, messages):
    """The template writes BOS itself; the post-processor must not add another."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(demo_tiny))
    want = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"]
    assert demo_tok.apply_chat_template(messages) == hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    ids = demo_tok.encode_chat(messages)
    assert ids == want
    assert ids.count(0) == 1 and ids[0] == 0


def test_chat_template_without_bos_gets_none(stories_tok):
    """stories260K's template does not write BOS: chat ids then carry none (as in transformers)."""
    ids = stories_tok.encode_chat([{"role": "user", "content": "Once upon a time"}])
    assert ids == [403, 407, 261, 378]


def test_eos_ids_from_generation_config(stories_tok, demo_tok):
    assert stories_tok.eos_token_ids == {1, 2}  # generation_config [2, 1] + config 2 + "</s>"
    assert demo_tok.eos_token_ids == {1}


# ---- sandbox -----------------------------------------------------------------------------------

ESCAPES = {
    "mro": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "globals": "{{ raise_exception.__globals__['__builtins__']['open']('/etc/passwd').read() }}",
    "func_globals": "{{ cycler.__init__.__globals__.os.popen('touch {marker}').read() }}",
    "mutate_messages": "{% set _ = messages.append({'role': 'user', 'content': 'x'}) %}{{ messages | length }}",
    "mutate_dict": "{% set _ = messages[0].update({'content': 'pwned'}) %}{{ messages[0]['content'] }}",
    "format_escape": "{{ '{0.__class__.__init__.__globals__}'.format(messages) }}",
}


@pytest.mark.parametrize("name", list(ESCAPES))
def test_hostile_templates_fail_safely(demo_tiny, tmp_path, name):
    marker = tmp_path / "escaped"
    d = with_template(demo_tiny, tmp_path / "model", ESCAPES[name].replace("{marker}", str(marker)))
    tok = Tokenizer(d)
    messages = [{"role": "user", "content": "Hi"}]
    with pytest.raises(PlexusError, match="chat template") as exc:
        tok.apply_chat_template(messages)
    assert "\n" not in str(exc.value)
    assert messages == [{"role": "user", "content": "Hi"}]  # untouched
    assert not marker.exists()


def test_template_raise_exception_is_a_clear_error(demo_tiny, tmp_path):
    d = with_template(demo_tiny, tmp_path / "model", "{{ raise_exception('Conversation roles must alternate') }}")
    with pytest.raises(PlexusError, match="Conversation roles must alternate"):
        Tokenizer(d).apply_chat_template([{"role": "user", "content": "Hi"}])


@pytest.mark.timeout(90)
def test_hostile_template_via_cli_is_one_line(demo_tiny, tmp_path):
    d = with_template(demo_tiny, tmp_path / "model", ESCAPES["mro"])
    shutil.copy(demo_tiny / "model.safetensors", d / "model.safetensors")
    r = run(plexus_cmd("generate", "--model", d, "--chat", "--prompt", "Hi"), timeout=60)
    assert r.rc != 0 and not r.timed_out, r.describe()
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("plexus: error:")]
    assert len(errors) == 1 and "chat template" in errors[0], r.describe()


def test_no_chat_template_is_a_clear_error(demo_tiny, tmp_path):
    d = with_template(demo_tiny, tmp_path / "model", None)
    with pytest.raises(PlexusError, match="chat_template"):
        Tokenizer(d).apply_chat_template([{"role": "user", "content": "Hi"}])


# ---- IncrementalDecoder --------------------------------------------------------------------------

STORY = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."


def feed(tok, ids, stop):
    """Feed ids one at a time; return (deltas, decoder) and check every step's invariants."""
    dec = IncrementalDecoder(tok, stop)
    deltas = []
    for i in ids:
        d = dec.add(i)
        deltas.append(d)
        assert "\ufffd" not in d
        assert "".join(deltas) == dec.text
        for s in stop:
            assert s not in dec.text
        if dec.stopped:
            break
    return deltas, dec


def token_spans(tok, ids):
    """Character spans of each id's text in the decoded whole (prefix decoding)."""
    return [len(tok.decode(ids[:k + 1])) for k in range(len(ids))]


@pytest.mark.parametrize("stop", ["ttle gi", "e girl", "Lily. S", "park."])
def test_stop_string_spanning_tokens(stories_tok, stop):
    ids = stories_tok.encode(STORY, add_special_tokens=False)
    full = stories_tok.decode(ids)
    assert full == STORY
    at = full.index(stop)
    ends = token_spans(stories_tok, ids)
    assert any(at < e < at + len(stop) for e in ends), "the stop string should span a token boundary"
    deltas, dec = feed(stories_tok, ids, [stop])
    assert dec.stopped
    assert dec.text == full[:at]
    assert dec.finish() == "" and dec.text == full[:at]
    # it stopped at the first token whose text completes the stop string
    k = next(k for k, e in enumerate(ends) if e >= at + len(stop))
    assert len(dec.ids) == k + 1


def test_partial_stop_match_is_held_back_then_released(stories_tok):
    """While the text ends with a prefix of a stop string ("little gir" of "little girls"),
    that tail is held back; once it cannot match any more it is released."""
    ids = stories_tok.encode(STORY, add_special_tokens=False)
    stop = "little girls"  # the story has "little girl named": a long partial match, never complete
    dec = IncrementalDecoder(stories_tok, [stop])
    held_some = False
    for n, i in enumerate(ids, 1):
        dec.add(i)
        partial = stories_tok.decode(ids[:n])
        assert partial.startswith(dec.text)
        tail = max((k for k in range(1, len(stop)) if partial.endswith(stop[:k])), default=0)
        assert len(dec.text) <= len(partial) - tail
        held_some |= tail > 2
    assert held_some and not dec.stopped
    dec.finish()
    assert dec.text == STORY


def test_held_back_prefix_released_by_finish(stories_tok):
    ids = stories_tok.encode("She loved to play", add_special_tokens=False)
    dec = IncrementalDecoder(stories_tok, ["play outside"])
    for i in ids:
        dec.add(i)
    assert not dec.stopped
    assert dec.text == "She loved to "  # "play" could still grow into the stop string
    assert dec.finish() == "play"
    assert dec.text == "She loved to play"


def test_multibyte_characters_are_never_split(stories_tok):
    """stories260K's tokenizer has byte fallback: "é" and "😀" become several byte tokens;
    the decoder waits for the whole character."""
    text = "Lily said é and 😀 ok"
    ids = stories_tok.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split())  # byte pieces present
    deltas, dec = feed(stories_tok, ids, [])
    dec.finish()
    assert dec.text == stories_tok.decode(ids)
    assert "😀" in dec.text and "é" in dec.text
