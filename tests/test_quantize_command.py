"""``plexus quantize``: its compressed-tensors checkpoint, checked with compressed-tensors' own
library (its config parser, its decompression, the config its ModelCompressor writes) and with
transformers' loader, against plexus.quant.qweight.quantize of the original weights; and read
back through plexus.checkpoint.hf_quant as the same QuantWeights.

transformers 5.25 with compressed-tensors 0.20 loads symmetric pack-quantized checkpoints but not
asymmetric ones (its own llm-compressor-made W4A16_ASYM files fail the same way: the packed zero
points' shape is checked against the unpacked one), so the transformers check uses --bits 8.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from plexus.checkpoint.hf_quant import quant_format
from plexus.checkpoint.reader import CheckpointReader
from plexus.errors import PlexusError
from plexus.models.config import ModelConfig
from plexus.quant.qweight import quantize
from tests.helpers import assert_clean_error, plexus_cmd, run

pytestmark = pytest.mark.timeout(180)

SIZES = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj"]


def tensors(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


def plexus_quantize(model: Path, out: Path, *args: str):
    r = run(plexus_cmd("quantize", "--model", str(model), "--out", str(out), *args), timeout=120)
    assert r.rc == 0 and not r.timed_out, r.describe()
    return r


@pytest.fixture(scope="module")
def source(tmp_path_factory, demo_tiny):
    from tests.helpers import make_hf_checkpoint

    root = tmp_path_factory.mktemp("quantize")
    return {dtype: make_hf_checkpoint("llama", root / dtype, dtype=dtype, tokenizer_from=demo_tiny, **SIZES)
            for dtype in ("float32", "bfloat16")}


@pytest.fixture(scope="module")
def written(source, tmp_path_factory):
    """(source dir, output dir, bits, group) for --bits 4 --group 32 (fp32 source) and --bits 8
    --group -1 (bf16 source, one group per row)."""
    root = tmp_path_factory.mktemp("out")
    out = {}
    for key, dtype, args in (("int4", "float32", ("--bits", "4", "--group", "32")),
                             ("int8", "bfloat16", ("--bits", "8", "--group", "-1"))):
        r = plexus_quantize(source[dtype], root / key, *args)
        assert "linear weights quantized" in r.stderr
        out[key] = (source[dtype], root / key, int(args[1]), int(args[3]))
    return out


@pytest.mark.parametrize("key", ["int4", "int8"])
def test_compressed_tensors_decompresses_plexus_quantization(written, key):
    """compressed-tensors parses the written config and its decompression of every linear is
    quantize(w).dequantize(): exactly with float32 scales, and (its own float16 arithmetic on the
    float16 scales as written) exactly that rounded to float16."""
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    src, out, bits, group = written[key]
    qc = QuantizationConfig.model_validate(json.loads((out / "config.json").read_text())["quantization_config"])
    scheme = qc.config_groups["group_0"]
    assert (scheme.weights.num_bits, scheme.weights.symmetric) == (bits, bits == 8)
    orig, new = tensors(src), tensors(out)
    for name in LINEARS:
        p = f"model.layers.1.{name}"
        w = orig[f"{p}.weight"]
        ours = quantize(w, bits, group if group > 0 else w.shape[1]).dequantize()
        local = {k[len(p) + 1:]: v for k, v in new.items() if k.startswith(p + ".")}
        assert set(local) == {"weight_packed", "weight_scale", "weight_shape"} | (
            {"weight_zero_point"} if bits == 4 else set())
        assert local["weight_scale"].dtype == torch.float16 and local["weight_packed"].dtype == torch.int32
        as_written = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
        assert as_written.dtype == torch.float16 and torch.equal(as_written, ours.half()), p
        f32 = PackedQuantizationCompressor.decompress({**local, "weight_scale": local["weight_scale"].float()},
                                                      scheme)["weight"]
        assert (f32 - ours).abs().max() <= 1e-6, p
    for name, t in orig.items():  # everything else is copied as it was
        if not any(name.endswith(f"{n}.weight") for n in LINEARS):
            assert torch.equal(new[name], t) and new[name].dtype == t.dtype, name


@pytest.mark.parametrize("key", ["int4", "int8"])
def test_reads_back_through_plexus_as_the_same_quantweights(written, key):
    src, out, bits, group = written[key]
    cfg = ModelConfig.from_dir(out)
    fmt = quant_format(cfg.quantization_config, str(out / "config.json"))
    assert (fmt.method, fmt.bits, fmt.group) == ("compressed-tensors", bits, group if group > 0 else None)
    reader = CheckpointReader(out, cfg, quant_format=fmt)
    orig = tensors(src)
    for layer in range(cfg.num_layers):
        for name in LINEARS:
            p = f"model.layers.{layer}.{name}"
            want = quantize(orig[f"{p}.weight"], bits, group if group > 0 else orig[f"{p}.weight"].shape[1])
            got = reader.read_linear(p)
            assert torch.equal(got.codes, want.codes) and torch.equal(got.scales, want.scales), p
            assert torch.equal(got.mins, want.mins) and torch.equal(got.dequantize(), want.dequantize()), p
            cols = want.shape[1]
            half = cols // 2
            assert torch.equal(reader.read_linear(p, 1, half, cols).dequantize(), want.dequantize()[:, half:])
    assert torch.equal(reader.read_linear("lm_head"), orig["lm_head.weight"])


def test_config_is_what_compressed_tensors_writes(written, tmp_path):
    """The quantization_config equals the one compressed-tensors' ModelCompressor writes for the
    same scheme applied to the same model (but for the version field, its own release)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 apply_quantization_config)
    from transformers import AutoModelForCausalLM

    for key, args in (("int4", dict(num_bits=4, strategy="group", group_size=32, symmetric=False)),
                      ("int8", dict(num_bits=8, strategy="channel", symmetric=True))):
        src, out, _, _ = written[key]
        model = AutoModelForCausalLM.from_pretrained(str(src))
        qc = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"],
                                                                              weights=QuantizationArgs(**args))},
                                ignore=["lm_head"], quantization_status="frozen")
        apply_quantization_config(model, qc, show_progress=False)
        compressor = ModelCompressor.from_pretrained_model(model, "pack-quantized")
        compressor.compress_model(model)
        d = tmp_path / key
        d.mkdir()
        (d / "config.json").write_text("{}")
        compressor.update_config(str(d))
        theirs = json.loads((d / "config.json").read_text())["quantization_config"]
        ours = json.loads((out / "config.json").read_text())["quantization_config"]
        theirs.pop("version"), ours.pop("version")
        assert ours == theirs, key


def test_transformers_loads_it(written):
    """transformers (through compressed-tensors) loads the 8-bit checkpoint; its logits are those
    of the original model with quantize(w).dequantize() weights, to the float16 rounding of the
    weights it decompresses with float16 scales."""
    from transformers import AutoModelForCausalLM

    src, out, bits, group = written["int8"]
    ids = torch.tensor([[1, 5, 9, 200, 7, 42]])
    loaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    with torch.no_grad():
        for n, m in ref.named_modules():
            if any(n.endswith(s) for s in LINEARS):
                m.weight.copy_(quantize(m.weight.to(torch.bfloat16), bits, m.weight.shape[1]).dequantize()
                               .half().float())
        a, b = loaded(ids).logits, ref(ids).logits
    assert (a - b).abs().max() <= 1e-3 * b.abs().max(), (a - b).abs().max()


@pytest.mark.parametrize("ws", [1, 2])
def test_generate_on_it_is_generate_with_quantize(written, ws):
    """The written int4 checkpoint generates the tokens --quantize int4 makes of the original."""
    from tests.helpers import run_mpi

    src, out, bits, group = written["int4"]
    tokens = []
    for args in (("--model", str(out)), ("--model", str(src), "--quantize", "int4", "--quant-group", str(group))):
        cmd = plexus_cmd("generate", *args, "--prompt", "Once upon a time", "--max-tokens", "8", "--json")
        r = run(cmd, timeout=120) if ws == 1 else run_mpi(ws, cmd, timeout=120)
        assert r.rc == 0, r.describe()
        tokens.append(r.json_lines()[0]["token_ids"])
    assert tokens[0] == tokens[1] and len(tokens[0]) == 8


def test_output_files(written, source):
    _, out, _, _ = written["int4"]
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not any(n.startswith(".") or n.endswith(".tmp") for n in names)
    assert not any(p.name.startswith(f".{out.name}.partial") for p in out.parent.iterdir())
    assert (out / "tokenizer.json").read_bytes() == (source["float32"] / "tokenizer.json").read_bytes()
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((out / "model.safetensors").stat().st_mode) == 0o666 & ~mask
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["hidden_size"] == 128 and cfg["quantization_config"]["format"] == "pack-quantized"


def test_sharded_output_reads_back(source, tmp_path, monkeypatch):
    import plexus.commands.quantize as q

    monkeypatch.setattr(q, "SHARD_BYTES", 60_000)
    out = tmp_path / "sharded"
    summary = q.quantize_checkpoint(source["float32"], out, 4, 128)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files == sorted(p.name for p in out.glob("*.safetensors"))
    assert index["metadata"]["total_size"] == summary["bytes_out"]
    cfg = ModelConfig.from_dir(out)
    reader = CheckpointReader(out, cfg, quant_format=quant_format(cfg.quantization_config, "config.json"))
    w = tensors(source["float32"])["model.layers.0.mlp.down_proj.weight"]
    assert torch.equal(reader.read_linear("model.layers.0.mlp.down_proj").dequantize(),
                       quantize(w, 4, 128).dequantize())


def test_values_that_no_code_can_hold(source, tmp_path):
    """An inf weight is refused, naming the tensor; so is a group that does not divide a layer."""
    import shutil

    from safetensors.torch import load_file, save_file

    import plexus.commands.quantize as q

    d = tmp_path / "inf"
    shutil.copytree(source["float32"], d)
    sd = load_file(str(d / "model.safetensors"))
    sd["model.layers.0.mlp.up_proj.weight"][3, 5] = float("inf")
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(PlexusError, match=r"model.layers.0.mlp.up_proj.weight holds inf or NaN"):
        q.quantize_checkpoint(d, tmp_path / "o1", 8, 128)
    with pytest.raises(PlexusError, match=r"tensor model\.layers\.0\.\S+\.weight has 128 input columns, "
                                          r"which --group 256 does not divide"):
        q.quantize_checkpoint(source["float32"], tmp_path / "o2", 4, 256)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    assert not list(tmp_path.glob(".o*"))  # the partial directories are gone


@pytest.mark.parametrize("args,needles", [
    (("--bits", "3"), ("--bits", "'3' is not one of '4', '8'")),
    (("--bits", "4", "--group", "48"), ("--group 48", "multiple of 32")),
    (("--bits", "8", "--group", "0"), ("--group 0", "multiple of 16")),
])
def test_bad_options(source, tmp_path, args, needles):
    r = run(plexus_cmd("quantize", "--model", str(source["float32"]), "--out", str(tmp_path / "o"), *args),
            timeout=60)
    assert_clean_error(r, *needles)
    assert not (tmp_path / "o").exists()


def test_bad_directories(source, written, tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    r = run(plexus_cmd("quantize", "--model", str(source["float32"]), "--out", str(full), "--bits", "4"), timeout=60)
    assert_clean_error(r, str(full), "not an empty directory")
    _, out, _, _ = written["int4"]
    r = run(plexus_cmd("quantize", "--model", str(out), "--out", str(tmp_path / "o"), "--bits", "4"), timeout=60)
    assert_clean_error(r, "config.json", "already quantized (compressed-tensors)")
