"""Bad inputs end cleanly at world size 2: one ``plexus: error:`` line naming the file or
tensor, a non-zero exit on every rank within seconds, no Python traceback, no hang.

Every case is a broken copy of the tiny demo checkpoint (or a broken flag or prompts file).
The launches are independent, so one fixture runs them a few at a time in parallel and the
tests then check each result.
"""

from __future__ import annotations

import json
import pickle
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.helpers import Result, assert_clean_error, plexus_cmd, run_mpi

pytestmark = pytest.mark.timeout(420)
WORLD_SIZE = 2
MARKER = "UNPICKLED"


class _Payload:
    """Unpickling this creates a file: proof that a pickle was executed."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _copy(base: Path, dst: Path, skip: tuple[str, ...] = ()) -> Path:
    dst.mkdir(parents=True)
    for f in base.iterdir():
        if f.name not in skip:
            shutil.copy(f, dst / f.name)
    return dst


def _edit_config(d: Path, **changes) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def _edit_tensors(d: Path, edit) -> None:
    tensors = load_file(str(d / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})


def _no_weights(base: Path, dst: Path) -> Path:
    """A copy whose weights file is garbage: any error that config.json, the tokenizer and the
    flags decide must come first, before a weight is read (so it names that, not the file)."""
    d = _copy(base, dst)
    (d / "model.safetensors").write_bytes(b"not a safetensors file")
    return d


# each case: (tmp, demo model) -> (plexus generate arguments, substrings the error line must contain)
def pickle_only(tmp, base):
    d = _copy(base, tmp / "pickle-only", skip=("model.safetensors",))
    (d / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(tmp / MARKER)))
    return ["--model", d], ["pytorch_model.bin", "pickle"]


def index_to_pickle(tmp, base):
    d = _copy(base, tmp / "index-to-pickle", skip=("model.safetensors",))
    names = list(load_file(str(base / "model.safetensors")))
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: "pytorch_model-00001-of-00001.bin" for n in names}}))
    (d / "pytorch_model-00001-of-00001.bin").write_bytes(pickle.dumps(_Payload(tmp / (MARKER + "2"))))
    return ["--model", d], ["pytorch_model-00001-of-00001.bin"]


def missing_tensor(tmp, base):
    d = _copy(base, tmp / "missing-tensor")
    _edit_tensors(d, lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    return ["--model", d], ["model.layers.1.mlp.down_proj.weight", "not found in model.safetensors"]


def wrong_shape(tmp, base):
    d = _copy(base, tmp / "wrong-shape")

    def edit(t):
        t["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(48, 64)

    _edit_tensors(d, edit)
    return ["--model", d], ["model.safetensors", "model.layers.0.self_attn.k_proj.weight", "[48, 64]", "[32, 64]"]


def truncated_file(tmp, base):
    d = _copy(base, tmp / "truncated")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[:len(data) - 4096])
    return ["--model", d], ["model.safetensors", "truncated"]


def truncated_header(tmp, base):
    d = _copy(base, tmp / "truncated-header")
    (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:40])
    return ["--model", d], ["model.safetensors"]


def missing_shard(tmp, base):
    d = _copy(base, tmp / "missing-shard", skip=("model.safetensors",))
    names = list(load_file(str(base / "model.safetensors")))
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: "model-00001-of-00002.safetensors" for n in names}}))
    return ["--model", d], ["model-00001-of-00002.safetensors", "missing"]


def unknown_architecture(tmp, base):
    d = _copy(base, tmp / "unknown-arch")
    _edit_config(d, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    return ["--model", d], ["config.json", "GPT2LMHeadModel"]


def invalid_config_json(tmp, base):
    d = _copy(base, tmp / "invalid-config")
    (d / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "hidden_size": 64,,}')
    return ["--model", d], ["config.json", "not valid JSON"]


def config_missing_field(tmp, base):
    d = _copy(base, tmp / "config-missing-field")
    cfg = json.loads((d / "config.json").read_text())
    del cfg["num_hidden_layers"]
    (d / "config.json").write_text(json.dumps(cfg))
    return ["--model", d], ["config.json", "num_hidden_layers"]


def cannot_split(tmp, base):
    """One attention head cannot be shared by two ranks (known before the weights are read)."""
    d = _no_weights(base, tmp / "one-head")
    _edit_config(d, num_attention_heads=1, num_key_value_heads=1)
    return ["--model", d], ["1 attention head", "2 ranks"]


def missing_model_dir(tmp, base):
    return ["--model", tmp / "no-such-model"], [str(tmp / "no-such-model"), "does not exist"]


def over_context(tmp, base):
    return ["--model", _no_weights(base, tmp / "over-context"), "--max-tokens", "600"], ["600", "context length of 512"]


def prompt_over_context(tmp, base):
    """The second prompt of a file alone is longer than the context: known before loading."""
    f = tmp / "long-prompt.jsonl"
    f.write_text(json.dumps({"prompt": "Hi"}) + "\n" + json.dumps({"prompt": "word " * 600}) + "\n")
    return (["--model", _no_weights(base, tmp / "long-prompt"), "--prompts-file", f, "--max-tokens", "4"],
            ["prompt 2:", "exceeds the context length of 512"])


def max_context_beyond_positions(tmp, base):
    return (["--model", _no_weights(base, tmp / "beyond-positions"), "--max-context", "4096"],
            ["--max-context 4096", "512 positions"])


def output_directory_missing(tmp, base):
    return (["--model", _no_weights(base, tmp / "no-out-dir"), "--output", tmp / "no-such-dir" / "out.jsonl"],
            ["--output", "no-such-dir", "does not exist"])


def malformed_prompts_line(tmp, base):
    f = tmp / "bad-line.jsonl"
    f.write_text('{"prompt": "fine"}\n{"prompt": "broken\n')
    return ["--model", base, "--prompts-file", f], ["bad-line.jsonl:2", "not valid JSON"]


def unknown_dtype_in_config(tmp, base):
    d = _copy(base, tmp / "fp8-config")
    _edit_config(d, torch_dtype="float8_e4m3fn")
    return ["--model", d], ["float8_e4m3fn", "config.json"]


CASES = {f.__name__: f for f in [
    pickle_only, index_to_pickle, missing_tensor, wrong_shape, truncated_file, truncated_header, missing_shard,
    unknown_architecture, invalid_config_json, config_missing_field, cannot_split, missing_model_dir,
    over_context, prompt_over_context, max_context_beyond_positions, output_directory_missing,
    malformed_prompts_line, unknown_dtype_in_config]}


@pytest.fixture(scope="module")
def outcomes(demo_tiny, tmp_path_factory) -> dict[str, tuple[Result, list[str], Path]]:
    """Every case's plexus run at world size 2, three launches at a time."""
    tmp = tmp_path_factory.mktemp("bad")
    jobs = {}
    for name, case in CASES.items():
        args, needles = case(tmp, demo_tiny)
        if "--prompts-file" not in args and "--prompt" not in args:
            args = [*args, "--prompt", "Hello"]
        jobs[name] = (plexus_cmd("generate", *args), needles)
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {name: pool.submit(run_mpi, WORLD_SIZE, cmd, 90) for name, (cmd, _) in jobs.items()}
        return {name: (f.result(), jobs[name][1], tmp) for name, f in futures.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_error(outcomes, case):
    result, needles, tmp = outcomes[case]
    line = assert_clean_error(result, *needles)
    assert len(line) < 400, line
    assert not list(tmp.glob(MARKER + "*")), "a pickle was unpickled"


def test_pickle_payload_would_have_run(tmp_path):
    """The payload used above really executes when unpickled (so 'no marker' means 'refused')."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.exists()


@pytest.mark.parametrize("args, needles", [
    (["--dtype", "float8"], ["Invalid value for '--dtype'", "float8", "plexus generate --help"]),
    (["--promt", "Hi"], ["No such option '--promt'", "--prompt"]),
    (["--max-tokens", "many"], ["'--max-tokens'", "many"]),
    (["--device", "bogus"], ["unknown device 'bogus'"]),
    (["--device", "cuda:7"], ["cuda"]),
], ids=["dtype", "unknown-option", "bad-number", "unknown-device", "missing-device"])
def test_usage_errors_print_once(demo_tiny, args, needles):
    """A bad flag or device under mpirun: one line from rank 0, first (click's usage block and
    Open MPI's report are not repeated per rank), and exit status 2 for a usage error."""
    if args[0] == "--device" and args[1].startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    r = run_mpi(WORLD_SIZE, plexus_cmd("generate", "--model", demo_tiny, "--prompt", "Hi", *args), timeout=60)
    assert_clean_error(r, *needles)
    assert "Usage:" not in r.stderr and "Error:" not in r.stderr, r.describe()
    if args[0] != "--device":
        assert r.rc == 2, r.describe()
