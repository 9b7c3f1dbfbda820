"""Pre-quantized checkpoints (plexus.checkpoint.hf_quant) against their formats' own tools.

- compressed-tensors: checkpoints made by the compressed-tensors library itself (its
  QuantizationConfig applied to a transformers model, min-max scales from its calculate_qparams,
  ModelCompressor's compression and config), compared with its own decompression
  (PackedQuantizationCompressor.decompress) for whole weights and rank slices.
- GPTQ: GPTQModel does not install here (CUDA build, many dependencies), so its pure-torch pack
  and dequantize code is copied below from the gptqmodel 7.7.0 release (PyPI sdist), file and
  function named at each copy. Codes, scales and zero points are chosen, packed with GPTQModel's
  code, exported to v1 as GPTQModel exports, and read back: Plexus must equal both the chosen
  integers and GPTQModel's dequantization.
- AWQ: AutoAWQ 0.2.9's WQLinear_GEMM.from_linear packing loop and packing_utils.dequantize_gemm,
  copied likewise; test_awq_copies_match_autoawq checks the copies against the installed package.
- FP8: transformers' own FP8 block quantizer and dequantizer (integrations/finegrained_fp8.py).

The reference dequantizations run with float32 scales (they compute in the scales' dtype), so
the comparisons hold to 1e-6 rather than to float16 rounding.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from plexus.checkpoint.hf_quant import quant_format
from plexus.checkpoint.reader import CheckpointReader
from plexus.errors import PlexusError
from plexus.models.config import ModelConfig

pytestmark = pytest.mark.timeout(120)

SIZES = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=64, max_position_embeddings=64, tie_word_embeddings=False,
             bos_token_id=None, eos_token_id=None, pad_token_id=None)
LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj"]
TOL = 1e-6


def tiny_llama(seed: int = 0, **over):
    """A random transformers Llama whose weights have 1/sqrt(fan_in) spread."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**SIZES, **over}))
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, p.shape[1] ** -0.5)
    return model


def open_checkpoint(d: Path, **kw):
    cfg = ModelConfig.from_dir(d)
    fmt = quant_format(cfg.quantization_config, str(d / "config.json"), **kw)
    return fmt, CheckpointReader(d, cfg, quant_format=fmt)


def pieces(unit: int, size: int) -> list[tuple[int, int]]:
    """A few [start, end) slices on ``unit`` boundaries covering [0, size)."""
    cuts = sorted({0, min(unit, size), min(3 * unit, size), size})
    return list(zip(cuts, cuts[1:]))


def check_slices(fmt, reader, prefix: str, ref: torch.Tensor) -> bool:
    """Whole weight, output-row slices and input-column slices of the dequantized QuantWeight equal
    ``ref`` (out, in); weight_bytes is what the QuantWeight takes (for an act-order input-column
    slice, stored in padded runs: no more than the planner's input_slice_bytes). Returns whether
    the weight was permuted."""
    out, cols = ref.shape
    qw = reader.read_linear(prefix)
    act_order = qw.perm is not None
    assert tuple(qw.shape) == (out, cols) and qw.bits == fmt.bits
    assert (qw.dequantize() - ref).abs().max() <= TOL, prefix
    assert fmt.weight_bytes(out, cols) == qw.nbytes
    for a, b in pieces(fmt.row_align, out):
        part = reader.read_linear(prefix, 0, a, b)
        assert (part.dequantize() - ref[a:b]).abs().max() <= TOL, (prefix, "rows", a, b)
    for a, b in pieces(fmt.align, cols):
        part = reader.read_linear(prefix, 1, a, b)
        assert tuple(part.shape) == (out, b - a)
        assert (part.dequantize() - ref[:, a:b]).abs().max() <= TOL, (prefix, "columns", a, b)
        if act_order and (a, b) != (0, cols):
            assert part.perm is not None and part.nbytes <= fmt.input_slice_bytes(out, b - a, cols)
        else:
            assert fmt.weight_bytes(out, b - a) == part.nbytes
    return act_order


def write_checkpoint(d: Path, model, tensors: dict, quantization_config: dict) -> Path:
    """config.json (the model's, plus quantization_config) and one safetensors file holding the
    model's non-linear tensors and ``tensors``."""
    d.mkdir(parents=True, exist_ok=True)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()
          if not any(k.endswith(f"{n}.weight") for n in LINEARS)}
    save_file({**sd, **tensors}, str(d / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg["quantization_config"] = quantization_config
    (d / "config.json").write_text(json.dumps(cfg))
    return d


# ---- compressed-tensors ---------------------------------------------------------------------------

CT_CASES = {
    "w4a16-g32-sym": (dict(num_bits=4, strategy="group", group_size=32, symmetric=True), torch.float32),
    "w4a16-g128-asym": (dict(num_bits=4, strategy="group", group_size=128, symmetric=False), torch.bfloat16),
    "w8a16-channel-sym": (dict(num_bits=8, strategy="channel", symmetric=True), torch.float32),
    "w8-channel-asym": (dict(num_bits=8, strategy="channel", symmetric=False), torch.float32),
}


def ct_checkpoint(d: Path, weights: dict, dtype: torch.dtype) -> Path:
    """A pack-quantized checkpoint made by compressed-tensors (lm_head left out, as llm-compressor
    does), with min-max scales from compressed-tensors' own calculate_qparams."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 apply_quantization_config)
    from compressed_tensors.quantization.utils import calculate_qparams, is_module_quantized

    model = tiny_llama(1).to(dtype)
    qc = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"],
                                                                          weights=QuantizationArgs(**weights))},
                            ignore=["lm_head"], quantization_status="frozen")
    apply_quantization_config(model, qc, show_progress=False)
    with torch.no_grad():
        for _, m in model.named_modules():
            if is_module_quantized(m):
                args = m.quantization_scheme.weights
                w = m.weight.float()
                w = w.unflatten(-1, (-1, args.group_size)) if args.strategy == "group" else w.unsqueeze(1)
                scale, zp = calculate_qparams(w.amin(-1), w.amax(-1), args)
                m.weight_scale.copy_(scale.reshape(m.weight_scale.shape))
                if hasattr(m, "weight_zero_point"):
                    m.weight_zero_point.copy_(zp.reshape(m.weight_zero_point.shape))
    compressor = ModelCompressor.from_pretrained_model(model, "pack-quantized")
    compressor.compress_model(model)
    model.save_pretrained(str(d))
    compressor.update_config(str(d))
    return d


def ct_reference(d: Path, prefix: str) -> torch.Tensor:
    """compressed-tensors' own decompression of one linear, computed in float32."""
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors import safe_open

    qc = QuantizationConfig.model_validate(json.loads((d / "config.json").read_text())["quantization_config"])
    with safe_open(str(d / "model.safetensors"), framework="pt") as f:
        sd = {k[len(prefix) + 1:]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix + ".")}
    sd["weight_scale"] = sd["weight_scale"].float()
    return PackedQuantizationCompressor.decompress(sd, qc.config_groups["group_0"])["weight"].float()


@pytest.fixture(scope="module")
def ct_dirs(tmp_path_factory):
    cache = {}

    def get(case):
        if case not in cache:
            weights, dtype = CT_CASES[case]
            cache[case] = ct_checkpoint(tmp_path_factory.mktemp("ct") / case, weights, dtype)
        return cache[case]
    return get


@pytest.mark.parametrize("case", sorted(CT_CASES))
def test_compressed_tensors_matches_its_own_decompression(ct_dirs, case):
    d = ct_dirs(case)
    weights, _ = CT_CASES[case]
    fmt, reader = open_checkpoint(d)
    assert (fmt.method, fmt.bits, fmt.group) == ("compressed-tensors", weights["num_bits"], weights.get("group_size"))
    for name in LINEARS:
        prefix = f"model.layers.0.{name}"
        check_slices(fmt, reader, prefix, ct_reference(d, prefix))
    # lm_head is in the ignore list: read as the dense tensor it is
    assert not fmt.quantized("lm_head") and fmt.quantized("model.layers.0.mlp.up_proj")
    from safetensors import safe_open
    with safe_open(str(d / "model.safetensors"), framework="pt") as f:
        assert torch.equal(reader.read_linear("lm_head"), f.get_tensor("lm_head.weight"))


def test_compressed_tensors_slices_read_only_their_part(ct_dirs):
    d = ct_dirs("w4a16-g32-sym")
    _, reader = open_checkpoint(d)
    reader.read_linear("model.layers.0.mlp.down_proj")
    whole, reader.bytes_read = reader.bytes_read, 0
    reader.read_linear("model.layers.0.mlp.down_proj", 1, 128, 256)
    assert reader.bytes_read < 0.6 * whole


def test_compressed_tensors_misaligned_slices_are_refused(ct_dirs):
    fmt, reader = open_checkpoint(ct_dirs("w4a16-g128-asym"))
    with pytest.raises(PlexusError, match=r"weight_zero_point.*units of 8.*rows 4-64") as e:
        reader.read_linear("model.layers.0.self_attn.k_proj", 0, 4, 64)
    assert "\n" not in str(e.value)
    with pytest.raises(PlexusError, match=r"down_proj.weight_packed.*groups of 128.*columns 64-256"):
        reader.read_linear("model.layers.0.mlp.down_proj", 1, 64, 256)
    assert reader.bytes_read == 2 * 16  # only the two weight_shape tensors were read


def test_compressed_tensors_wrong_packed_shape(ct_dirs, tmp_path):
    from safetensors.torch import load_file

    d = tmp_path / "bad"
    d.mkdir()
    src = ct_dirs("w4a16-g32-sym")
    (d / "config.json").write_text((src / "config.json").read_text())
    sd = load_file(str(src / "model.safetensors"))
    name = "model.layers.0.mlp.up_proj.weight_packed"
    sd[name] = sd[name][:, :-1].contiguous()
    save_file(sd, str(d / "model.safetensors"))
    _, reader = open_checkpoint(d)
    with pytest.raises(PlexusError) as e:
        reader.read_linear("model.layers.0.mlp.up_proj")
    msg = str(e.value)
    assert "model.safetensors" in msg and name in msg and "[256, 16]" in msg and "\n" not in msg


def test_compressed_tensors_act_order_g_idx(tmp_path):
    """Older llm-compressor act-order ("group") files carry weight_g_idx: the group of each input
    column. Packed here with compressed-tensors' own pack_to_int32 from chosen codes."""
    from compressed_tensors.compressors.pack_quantized import pack_to_int32

    model = tiny_llama(6)
    gen = torch.Generator().manual_seed(6)
    tensors, truth = {}, {}
    for name in LINEARS:
        p = f"model.layers.0.{name}"
        out, cols = model.get_submodule(p).weight.shape
        q, scales, zeros, g_idx, W = chosen_quantization(out, cols, 4, 32, True, True, gen)
        tensors.update({f"{p}.weight_packed": pack_to_int32((q - 8).to(torch.int8), 4),
                        f"{p}.weight_scale": scales.half(), f"{p}.weight_shape": torch.tensor([out, cols]),
                        f"{p}.weight_g_idx": g_idx})
        truth[p] = W
    d = write_checkpoint(tmp_path / "ct", model, tensors, {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": ["lm_head"],
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": 4, "strategy": "group", "group_size": 32, "symmetric": True, "actorder": "group"}}}})
    fmt, reader = open_checkpoint(d)
    assert fmt.act_order
    assert all(check_slices(fmt, reader, p, W) for p, W in truth.items())  # every weight permuted


# ---- GPTQ: GPTQModel 7.7.0's own code, copied --------------------------------------------------

def gptqmodel_pack(W, scales, zeros, g_idx, bits):
    """gptqmodel 7.7.0, gptqmodel/nn_modules/qlinear/__init__.py, PackableQuantLinear.pack_original
    (the bits 2/4/8 branch, int32 words, a Linear): W (out, in); scales, zeros (out, groups) with
    zeros the real zero points (GPTQModel's in-memory v2 form). Returns qweight, qzeros (v2),
    scales (float16)."""
    maxq, pack_dtype_bits, pack_factor = 2 ** bits - 1, 32, 32 // bits
    scales = scales.T.contiguous()
    zeros = zeros.T.contiguous()
    scale_zeros = zeros * scales
    int_weight = torch.round((W + scale_zeros[g_idx].T) / scales[g_idx].T)
    int_weight.clamp_(0, maxq)
    int_weight = int_weight.to(torch.int32).T.contiguous().numpy().astype(np.uint32)
    qweight = np.zeros((math.ceil(int_weight.shape[0] * bits / pack_dtype_bits), int_weight.shape[1]), dtype=np.uint32)
    for row in range(qweight.shape[0]):
        for j in range(min(pack_factor, int_weight.shape[0] - row * pack_factor)):
            qweight[row] |= int_weight[row * pack_factor + j] << (bits * j)
    zeros = zeros.numpy().astype(np.uint32)
    qzeros = np.zeros((zeros.shape[0], math.ceil(zeros.shape[1] * bits / pack_dtype_bits)), dtype=np.uint32)
    for col in range(qzeros.shape[1]):
        for j in range(min(pack_factor, zeros.shape[1] - col * pack_factor)):
            qzeros[:, col] |= zeros[:, col * pack_factor + j] << (bits * j)
    return (torch.from_numpy(qweight.astype(np.int32)), torch.from_numpy(qzeros.astype(np.int32)),
            scales.to(torch.float16))


GPTQ_V1_OFFSET = {4: 0b00010001000100010001000100010001, 8: 0b00000001000000010000000100000001}


def gptqmodel_v2_to_v1(qzeros, bits):
    """gptqmodel 7.7.0, gptqmodel/utils/model.py, convert_gptq_v2_to_v1_format_module (bits 4/8)."""
    return qzeros - GPTQ_V1_OFFSET[bits]


def gptqmodel_dequantize(qweight, qzeros, scales, g_idx, bits, v1, in_features):
    """gptqmodel 7.7.0: convert_gptq_v1_to_v2_format_module (utils/model.py) for v1 files, then
    PackableQuantLinear.dequantize_weight (nn_modules/qlinear/__init__.py, bits 2/4/8, num_itr 1),
    with the torch kernel's dequant_dtype (int16 at 8 bits, else int8). Returns (in, out)."""
    if v1:
        qzeros = qzeros + GPTQ_V1_OFFSET[bits]
    maxq, pack_factor = 2 ** bits - 1, 32 // bits
    dequant_dtype = torch.int16 if bits == 8 else torch.int8
    wf = torch.tensor(list(range(0, 32, bits)), dtype=torch.int32).unsqueeze(0)
    zeros = torch.bitwise_right_shift(torch.unsqueeze(qzeros, 2).expand(-1, -1, pack_factor),
                                      wf.unsqueeze(0)).to(dequant_dtype)
    zeros = torch.bitwise_and(zeros, maxq).reshape(qzeros.shape[0], -1)[:, :scales.shape[1]]
    weight = torch.bitwise_and(torch.bitwise_right_shift(torch.unsqueeze(qweight, 1).expand(-1, pack_factor, -1),
                                                         wf.unsqueeze(-1)).to(dequant_dtype), maxq)
    weight = weight.reshape(weight.shape[0] * weight.shape[1], weight.shape[2])[:in_features]
    return scales[g_idx.long()] * (weight - zeros[g_idx.long()])


def chosen_quantization(out, cols, bits, group, sym, act_order, gen, order=None):
    """Integer codes (out, in), float16-exact scales and integer zero points (out, groups) and a
    g_idx (act-order: from ``order``, a random one if None; else column // group); asymmetric
    zeros include 0 and the top code."""
    top = 2 ** bits - 1
    g = cols if group == -1 else group
    groups = -(-cols // g)
    q = torch.randint(0, top + 1, (out, cols), generator=gen)
    scales = (0.002 + 0.02 * torch.rand(out, groups, generator=gen)).half().float()
    if sym:
        zeros = torch.full((out, groups), float(2 ** (bits - 1)))
    else:
        zeros = torch.randint(0, top + 1, (out, groups), generator=gen).float()
        zeros[0, :] = 0
        zeros[1, :] = top
        zeros[2:10:2, 0] = 0  # a zero of 0 next to others in the same int32 word (a v1 borrow)
    if act_order:
        order = torch.randperm(cols, generator=gen) if order is None else order
        g_idx = torch.empty(cols, dtype=torch.int32)
        g_idx[order] = (torch.arange(cols) // g).to(torch.int32)
    else:
        g_idx = (torch.arange(cols) // g).to(torch.int32)
    W = scales[:, g_idx.long()] * (q.float() - zeros[:, g_idx.long()])
    return q, scales, zeros, g_idx, W


SHARED_INPUT = {"self_attn.q_proj": "attn", "self_attn.k_proj": "attn", "self_attn.v_proj": "attn",
                "mlp.gate_proj": "mlp", "mlp.up_proj": "mlp"}

GPTQ_CASES = [  # bits, group_size, sym, desc_act, checkpoint_format
    (4, 128, True, False, "gptq"), (4, 32, False, True, "gptq"), (8, 64, False, False, "gptq_v2"),
    (4, -1, True, False, "gptq_v2"), (8, 128, True, True, "gptq"), (4, 64, False, False, "gptq"),
    (8, -1, False, False, "gptq"),
]


def gptq_checkpoint(d: Path, bits, group, sym, desc_act, ckpt, seed=0):
    model = tiny_llama(2)
    gen = torch.Generator().manual_seed(seed)
    tensors, truth = {}, {}
    # layers that share an input share GPTQ's act-order (it sorts by the input's Hessian diagonal)
    h = model.config.hidden_size
    orders = {"attn": torch.randperm(h, generator=gen), "mlp": torch.randperm(h, generator=gen)}
    for name in LINEARS:
        out, cols = model.get_submodule(f"model.layers.0.{name}").weight.shape
        q, scales, zeros, g_idx, W = chosen_quantization(out, cols, bits, group, sym, desc_act, gen,
                                                         orders.get(SHARED_INPUT.get(name)))
        qweight, qzeros, s16 = gptqmodel_pack(W, scales, zeros, g_idx.long(), bits)
        if ckpt == "gptq":
            qzeros = gptqmodel_v2_to_v1(qzeros, bits)
        p = f"model.layers.0.{name}"
        tensors.update({f"{p}.qweight": qweight, f"{p}.qzeros": qzeros, f"{p}.scales": s16, f"{p}.g_idx": g_idx})
        ref = gptqmodel_dequantize(qweight, qzeros, s16.float(), g_idx, bits, ckpt == "gptq", cols).T
        assert torch.equal(ref, W)  # GPTQModel's code reads back the chosen integers
        truth[p] = W
    qc = {"bits": bits, "group_size": group, "desc_act": desc_act, "sym": sym, "lm_head": False,
          "quant_method": "gptq", "checkpoint_format": ckpt, "pack_dtype": "int32", "true_sequential": True}
    return write_checkpoint(d, model, tensors, qc), truth


@pytest.mark.parametrize("bits,group,sym,desc_act,ckpt", GPTQ_CASES)
def test_gptq_matches_gptqmodel(tmp_path, bits, group, sym, desc_act, ckpt):
    d, truth = gptq_checkpoint(tmp_path / "gptq", bits, group, sym, desc_act, ckpt)
    fmt, reader = open_checkpoint(d)
    assert (fmt.method, fmt.bits, fmt.group, fmt.act_order) == ("gptq", bits, None if group == -1 else group, desc_act)
    assert fmt.row_align == 32 // bits
    permuted = [check_slices(fmt, reader, prefix, W) for prefix, W in truth.items()]
    # act-order weights of more than one group are permuted; with one group g_idx is all zeros
    assert permuted == [desc_act and (group != -1 and W.shape[1] > group) for W in truth.values()]


def test_gptq_misaligned_and_act_order_slices(tmp_path):
    d, _ = gptq_checkpoint(tmp_path / "g", 4, 64, False, False, "gptq")
    _, reader = open_checkpoint(d)
    with pytest.raises(PlexusError, match=r"q_proj.qzeros: packs 8 output rows.*units of 8.*rows 4-64"):
        reader.read_linear("model.layers.0.self_attn.q_proj", 0, 4, 64)
    with pytest.raises(PlexusError, match=r"o_proj.qweight.*groups of 64 input columns.*columns 32-128"):
        reader.read_linear("model.layers.0.self_attn.o_proj", 1, 32, 128)
    assert reader.bytes_read == 0  # refused before reading any weight
    d, _ = gptq_checkpoint(tmp_path / "a", 4, 32, True, True, "gptq")
    _, reader = open_checkpoint(d)
    # all of the input (one rank) is no split: the permuted weight, as read whole
    p = "model.layers.0.mlp.down_proj"
    whole, full = reader.read_linear(p), reader.read_linear(p, 1, 0, 256)
    assert full.perm is not None and torch.equal(full.perm, whole.perm) and torch.equal(full.codes, whole.codes)


def test_gptq_wrong_packed_shape(tmp_path):
    from safetensors.torch import load_file

    d, _ = gptq_checkpoint(tmp_path / "g", 4, 128, True, False, "gptq")
    sd = load_file(str(d / "model.safetensors"))
    name = "model.layers.0.mlp.gate_proj.qweight"
    sd[name] = sd[name][:-1].contiguous()
    save_file(sd, str(d / "model.safetensors"))
    _, reader = open_checkpoint(d)
    with pytest.raises(PlexusError) as e:
        reader.read_linear("model.layers.0.mlp.gate_proj", 0, 0, 128)
    msg = str(e.value)
    assert "model.safetensors" in msg and name in msg and "expected [16, 256]" in msg and "\n" not in msg


def test_gptq_dynamic_exclusion_reads_dense(tmp_path):
    """GPTQModel's "-:" dynamic rule leaves a module unquantized: read as its dense weight."""
    d, _ = gptq_checkpoint(tmp_path / "g", 4, 128, True, False, "gptq")
    from safetensors.torch import load_file
    sd = load_file(str(d / "model.safetensors"))
    p = "model.layers.0.mlp.down_proj"
    dense = torch.randn(128, 256)
    for k in ("qweight", "qzeros", "scales", "g_idx"):
        sd.pop(f"{p}.{k}")
    sd[f"{p}.weight"] = dense
    save_file(sd, str(d / "model.safetensors"))
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["dynamic"] = {r"-:.*down_proj": {}}
    (d / "config.json").write_text(json.dumps(cfg))
    fmt, reader = open_checkpoint(d)
    assert not fmt.quantized(p) and fmt.quantized("model.layers.0.mlp.up_proj")
    assert torch.equal(reader.read_linear(p, 1, 128, 256), dense[:, 128:])


# ---- AWQ: AutoAWQ 0.2.9's own code, copied ----------------------------------------------------

def autoawq_pack(W, scales, zeros, group_size):
    """autoawq 0.2.9, awq/modules/linear/gemm.py, WQLinear_GEMM.from_linear (w_bit 4): W (out, in),
    scales and zeros (groups, out). Returns qweight (in, out/8), qzeros (groups, out/8), scales."""
    w_bit, pack_num = 4, 8
    scale_zeros = zeros * scales
    scales = scales.clone().half()
    intweight = []
    for idx in range(W.shape[1]):
        intweight.append(torch.round((W[:, idx] + scale_zeros[idx // group_size]) / scales[idx // group_size])
                         .to(torch.int)[:, None])
    intweight = torch.cat(intweight, dim=1).t().contiguous().to(dtype=torch.int32)
    qweight = torch.zeros((intweight.shape[0], intweight.shape[1] // 32 * w_bit), dtype=torch.int32)
    order_map = [0, 2, 4, 6, 1, 3, 5, 7]
    for col in range(intweight.shape[1] // pack_num):
        for i in range(pack_num):
            qweight[:, col] |= intweight[:, col * pack_num + order_map[i]] << (i * w_bit)
    zeros = zeros.to(dtype=torch.int32)
    qzeros = torch.zeros((zeros.shape[0], zeros.shape[1] // 32 * w_bit), dtype=torch.int32)
    for col in range(zeros.shape[1] // pack_num):
        for i in range(pack_num):
            qzeros[:, col] |= zeros[:, col * pack_num + order_map[i]] << (i * w_bit)
    return qweight, qzeros, scales


def autoawq_dequantize(qweight, qzeros, scales, bits, group_size):
    """autoawq 0.2.9, awq/utils/packing_utils.py: unpack_awq, reverse_awq_order, dequantize_gemm.
    Returns (in, out)."""
    shifts = torch.arange(0, 32, bits)
    iweights = torch.bitwise_right_shift(qweight[:, :, None], shifts[None, None, :]).to(torch.int8)
    iweights = iweights.view(iweights.shape[0], -1)
    izeros = torch.bitwise_right_shift(qzeros[:, :, None], shifts[None, None, :]).to(torch.int8)
    izeros = izeros.view(izeros.shape[0], -1)
    reverse_order_tensor = torch.arange(iweights.shape[-1], dtype=torch.int32).view(-1, 32 // bits)
    reverse_order_tensor = reverse_order_tensor[:, [0, 4, 1, 5, 2, 6, 3, 7]].view(-1)
    izeros, iweights = izeros[:, reverse_order_tensor], iweights[:, reverse_order_tensor]
    iweights = torch.bitwise_and(iweights, (2 ** bits) - 1)
    izeros = torch.bitwise_and(izeros, (2 ** bits) - 1)
    scales = scales.repeat_interleave(group_size, dim=0)
    izeros = izeros.repeat_interleave(group_size, dim=0)
    return (iweights - izeros) * scales


def awq_checkpoint(d: Path, group: int, seed: int = 0):
    model = tiny_llama(3)
    gen = torch.Generator().manual_seed(seed)
    tensors, truth = {}, {}
    for name in LINEARS:
        out, cols = model.get_submodule(f"model.layers.0.{name}").weight.shape
        q, scales, zeros, _, W = chosen_quantization(out, cols, 4, group, False, False, gen)
        qweight, qzeros, s16 = autoawq_pack(W, scales.T.contiguous(), zeros.T.contiguous(), group)
        ref = autoawq_dequantize(qweight, qzeros, s16.float(), 4, group).T
        assert torch.equal(ref, W)
        p = f"model.layers.0.{name}"
        tensors.update({f"{p}.qweight": qweight, f"{p}.qzeros": qzeros, f"{p}.scales": s16})
        truth[p] = W
    qc = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm",
          "modules_to_not_convert": ["lm_head"]}
    return write_checkpoint(d, model, tensors, qc), truth


@pytest.mark.parametrize("group", [128, 32])
def test_awq_matches_autoawq(tmp_path, group):
    d, truth = awq_checkpoint(tmp_path / "awq", group)
    fmt, reader = open_checkpoint(d)
    assert (fmt.method, fmt.bits, fmt.group, fmt.row_align, fmt.align) == ("awq", 4, group, 8, group)
    for prefix, W in truth.items():
        check_slices(fmt, reader, prefix, W)
    with pytest.raises(PlexusError, match=r"up_proj.qweight.*units of 8.*rows 12-256"):
        reader.read_linear("model.layers.0.mlp.up_proj", 0, 12, 256)


def test_awq_copies_match_autoawq(tmp_path):
    """The copied AutoAWQ code above is AutoAWQ's: its WQLinear_GEMM.from_linear packs and its
    dequantize_gemm unpacks the same tensors (the package is imported without its __init__, which
    needs datasets and a transformers it predates)."""
    import importlib.util
    import sys
    import types

    spec = importlib.util.find_spec("awq")
    if spec is None:
        pytest.skip("autoawq is not installed (pip install --no-deps autoawq accelerate)")
    saved = {k: v for k, v in sys.modules.items() if k == "awq" or k.startswith("awq.")}
    stub = types.ModuleType("awq")
    stub.__path__ = list(spec.submodule_search_locations)
    sys.modules["awq"] = stub
    try:
        from awq.modules.linear.gemm import WQLinear_GEMM
        from awq.utils.packing_utils import dequantize_gemm
    except ImportError as e:
        pytest.skip(f"autoawq's modules do not import here ({e})")
    finally:
        for k in [k for k in sys.modules if k == "awq" or k.startswith("awq.")]:
            del sys.modules[k]
        sys.modules.update(saved)
    gen = torch.Generator().manual_seed(5)
    q, scales, zeros, _, W = chosen_quantization(64, 256, 4, 128, False, False, gen)
    linear = torch.nn.Linear(256, 64, bias=False)
    linear.weight.data = W.clone()
    lib = WQLinear_GEMM.from_linear(linear, 4, 128, scales=scales.T.contiguous(), zeros=zeros.T.contiguous())
    mine = autoawq_pack(W, scales.T.contiguous(), zeros.T.contiguous(), 128)
    assert torch.equal(lib.qweight, mine[0]) and torch.equal(lib.qzeros, mine[1])
    assert torch.equal(dequantize_gemm(lib.qweight, lib.qzeros, lib.scales.float(), 4, 128),
                       autoawq_dequantize(*mine[:2], mine[2].float(), 4, 128))


# ---- FP8 block ---------------------------------------------------------------------------------

def fp8_checkpoint(d: Path, **sizes) -> tuple[Path, dict]:
    """Block-FP8 weights made by transformers' own quantizer, and what its dequantizer makes of them."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize, Fp8Quantize

    quantizer = SimpleNamespace(quantization_config=SimpleNamespace(weight_block_size=[128, 128], scale_fmt=None))
    model = tiny_llama(4, **sizes)
    tensors, ref = {}, {}
    for name in LINEARS:
        p = f"model.layers.0.{name}"
        q = Fp8Quantize(quantizer)._quantize_one(f"{p}.weight", model.get_submodule(p).weight.data)
        tensors.update(q)
        ref[p] = Fp8Dequantize(quantizer)._dequantize_one(q[f"{p}.weight"], q[f"{p}.weight_scale_inv"],
                                                          output_dtype=torch.float32)
    d = write_checkpoint(d, model, tensors, {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128],
        "modules_to_not_convert": ["lm_head"]})
    return d, ref


FP8_SIZES = dict(hidden_size=256, intermediate_size=384, num_attention_heads=4, num_key_value_heads=2)  # whole blocks


def test_fp8_block_matches_transformers(tmp_path):
    d, ref = fp8_checkpoint(tmp_path / "fp8", **FP8_SIZES)
    model = tiny_llama(4, **FP8_SIZES)
    fmt, reader = open_checkpoint(d, dtype=torch.float32)
    assert fmt.dense and (fmt.align, fmt.row_align) == (1, 1) and fmt.weight_bytes(10, 20) == 800
    fmt16, reader16 = open_checkpoint(d)
    assert fmt16.dtype == torch.bfloat16 and fmt16.weight_bytes(10, 20) == 400
    for p, w in ref.items():
        assert torch.equal(reader.read_linear(p), w)
        assert torch.equal(reader16.read_linear(p), w.to(torch.bfloat16))
        out, cols = w.shape
        assert torch.equal(reader.read_linear(p, 0, 64, out - 20), w[64:out - 20])  # across block edges
        assert torch.equal(reader.read_linear(p, 1, 100, 200), w[:, 100:200])
    assert torch.equal(reader.read_linear("lm_head"), model.lm_head.weight.data)


# ---- through the engine --------------------------------------------------------------------------

def ct_case(d: Path, case: str) -> tuple[Path, dict]:
    """A compressed-tensors checkpoint (in float32) and its own decompression of every linear."""
    ct_checkpoint(d, CT_CASES[case][0], torch.float32)
    return d, {f"model.layers.0.{n}": ct_reference(d, f"model.layers.0.{n}") for n in LINEARS}


E2E = {  # name: (checkpoint maker, world size, --split)
    "ct-w4-g32-ws1": (lambda d: ct_case(d, "w4a16-g32-sym"), 1, None),
    "ct-w4-g32-ws4": (lambda d: ct_case(d, "w4a16-g32-sym"), 4, None),
    "ct-w8-channel-asym-3:1": (lambda d: ct_case(d, "w8-channel-asym"), 2, "3,1"),
    "ct-w8-channel-sym-ws2": (lambda d: ct_case(d, "w8a16-channel-sym"), 2, None),
    "fp8-ws1": (lambda d: fp8_checkpoint(d, **FP8_SIZES), 1, None),
    "fp8-ws2": (lambda d: fp8_checkpoint(d, **FP8_SIZES), 2, None),
    "fp8-ws4": (lambda d: fp8_checkpoint(d, **FP8_SIZES), 4, None),
    "fp8-3:1": (lambda d: fp8_checkpoint(d, **FP8_SIZES), 2, "3,1"),
    "gptq-v1-asym-act-order": (lambda d: gptq_checkpoint(d, 4, 32, False, True, "gptq"), 1, None),
    "gptq-act-order-ws2": (lambda d: gptq_checkpoint(d, 4, 32, False, True, "gptq"), 2, None),
    "gptq-act-order-ws4": (lambda d: gptq_checkpoint(d, 4, 32, True, True, "gptq"), 4, None),
    "gptq-8bit-act-order-3:1": (lambda d: gptq_checkpoint(d, 8, 32, False, True, "gptq_v2"), 2, "3,1"),
    "gptq-v1-sym-4bit-ws4": (lambda d: gptq_checkpoint(d, 4, 32, True, False, "gptq"), 4, None),
    "gptq-v1-sym-4bit-3:1": (lambda d: gptq_checkpoint(d, 4, 32, True, False, "gptq"), 2, "3,1"),
    "gptq-v2-8bit": (lambda d: gptq_checkpoint(d, 8, 64, False, False, "gptq_v2"), 2, None),
    "awq-ws1": (lambda d: awq_checkpoint(d, 32), 1, None),
    "awq": (lambda d: awq_checkpoint(d, 32), 2, None),
    "awq-ws4": (lambda d: awq_checkpoint(d, 32), 4, None),
    "awq-3:1": (lambda d: awq_checkpoint(d, 32), 2, "3,1"),
}


@pytest.mark.parametrize("name", sorted(E2E))
def test_generate_matches_transformers_on_the_chosen_weights(name, tmp_path, demo_tiny, monkeypatch):
    """plexus generate on the checkpoint (at the world size and split given) gives transformers'
    greedy tokens for the same model with the weights the codes stand for."""
    import shutil

    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.helpers import plexus_cmd, run, run_mpi

    monkeypatch.setitem(SIZES, "vocab_size", 512)  # the demo tokenizer's
    make, ws, split = E2E[name]
    d, truth = make(tmp_path / name)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(demo_tiny / f, d / f)
    cmd = plexus_cmd("generate", "--model", str(d), "--prompt", "Once upon", "--max-tokens", "8", "--json",
                     *(["--split", split] if split else []))
    r = run(cmd, timeout=120) if ws == 1 else run_mpi(ws, cmd, timeout=180)
    assert r.rc == 0, r.describe()
    (rec,) = r.json_lines()
    cfg = json.loads((d / "config.json").read_text())
    cfg.pop("quantization_config")
    ref = LlamaForCausalLM(LlamaConfig(**cfg))
    sd = {k: v for k, v in load_file(str(d / "model.safetensors")).items() if k.endswith(".weight")}
    ref.load_state_dict({**sd, **{f"{p}.weight": W for p, W in truth.items()}}, strict=True)
    with torch.no_grad():
        out = ref.generate(torch.tensor([rec["prompt_token_ids"]]), max_new_tokens=8, do_sample=False)
    assert rec["token_ids"] == out[0, len(rec["prompt_token_ids"]):].tolist()


# ---- config checks -------------------------------------------------------------------------------

BAD_CONFIGS = [
    ({"quant_method": "bitsandbytes"}, "quant_method 'bitsandbytes'", "gptq, awq, compressed-tensors, fp8"),
    ({"quant_method": "gptq", "bits": 3, "group_size": 128}, "bits 3", "4, 8"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 16}, "group_size 16", "multiples of 32"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "checkpoint_format": "marlin"},
     "checkpoint_format 'marlin'", "gptq_v2"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "lm_head": True}, "lm_head True", "false"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "dynamic": {r"+:.*down": {"bits": 8}}},
     "dynamic['+:.*down'].bits 8", "per-module overrides"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, "version 'gemv'", "gemm"),
    ({"quant_method": "awq", "bits": 8, "group_size": 128}, "bits 8", "4"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": False}, "zero_point False", "true"),
    ({"quant_method": "compressed-tensors", "format": "naive-quantized", "config_groups": {"group_0": {
        "targets": ["Linear"], "weights": {"num_bits": 8, "strategy": "channel"}}}}, "format 'naive-quantized'",
     "pack-quantized"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"group_0": {
        "targets": ["Linear"], "weights": {"num_bits": 8, "strategy": "channel"},
        "input_activations": {"num_bits": 8}}}}, "input_activations", "weight-only"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"group_0": {
        "targets": ["Linear"], "weights": {"num_bits": 3, "strategy": "group", "group_size": 128}}}},
     "num_bits 3", "4, 8"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"group_0": {
        "targets": ["Linear"], "weights": {"num_bits": 4, "strategy": "tensor"}}}}, "strategy 'tensor'",
     "group, channel"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized", "transform_config": {"x": 1},
      "config_groups": {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 4, "group_size": 128}}}},
     "transform_config", "weight-only"),
    ({"quant_method": "fp8", "weight_block_size": None}, "weight_block_size None", "[128, 128]"),
    ({"quant_method": "fp8", "fmt": "e5m2", "weight_block_size": [128, 128]}, "fmt 'e5m2'", "e4m3"),
]


@pytest.mark.parametrize("qc,field,supported", BAD_CONFIGS, ids=[c[1] for c in BAD_CONFIGS])
def test_unsupported_configs_are_one_line_errors(qc, field, supported):
    with pytest.raises(PlexusError) as e:
        quant_format(qc, "models/x/config.json")
    msg = str(e.value)
    assert msg.startswith("models/x/config.json: quantization_config.") and "\n" not in msg
    assert field in msg and supported in msg, msg


def test_no_quantization_config_is_no_format():
    assert quant_format(None, "config.json") is None and quant_format({}, "config.json") is None


def test_weight_bytes_counts_codes_scales_and_mins():
    fmt = quant_format({"quant_method": "gptq", "bits": 4, "group_size": 128}, "c")
    assert fmt.weight_bytes(8, 256) == 8 * (128 + 8 * 2)
    fmt = quant_format({"quant_method": "gptq", "bits": 8, "group_size": -1}, "c")
    assert fmt.weight_bytes(8, 100) == 8 * (100 + 8) and (fmt.group, fmt.align, fmt.row_align) == (None, 4, 4)
    fmt = quant_format({"quant_method": "gptq", "bits": 4, "group_size": 128}, "c")
    assert fmt.weight_bytes(8, 100) == 8 * (-(-100 // 32) * 16 + 8)  # 4-bit rows pad to 32-weight blocks
    # the planner's QuantShape: align, linear_bytes, describe
    assert fmt.linear_bytes(8, 100) == fmt.weight_bytes(8, 100) and fmt.linear_bytes(0, 100) == 0
    assert fmt.describe() == "gptq int4 (groups of 128)"
    fmt = quant_format({"quant_method": "fp8", "weight_block_size": [128, 128]}, "c")
    assert fmt.linear_bytes(8, 100) == 8 * 100 * 2
    assert fmt.describe() == "fp8 blocks [128, 128] (loaded dense as bfloat16)"
