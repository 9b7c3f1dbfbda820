"""Pre-quantized Hugging Face checkpoints: config.json's ``quantization_config`` -> a Format that
reads each linear weight (or a rank's slice of it) into plexus.quant.qweight.QuantWeight.

``quant_format(quantization_config, source)`` checks the whole config before any weight is read
(the engine calls it while planning) and returns None for an unquantized checkpoint. Supported:

- GPTQ (``quant_method: gptq``): bits 4 and 8; group_size a multiple of 32 (4-bit) or 16 (8-bit),
  e.g. 32/64/128, or -1 (one group per row); sym true or false; desc_act true (g_idx act-order)
  or false; ``checkpoint_format`` gptq (v1, zero points stored minus one) or gptq_v2;
  GPTQModel's ``dynamic`` "-:" exclusions and ``modules_in_block_to_quantize``;
- AWQ (``quant_method: awq``): version gemm, 4-bit, zero_point true, ``modules_to_not_convert``;
- compressed-tensors (``quant_method: compressed-tensors``), format pack-quantized: integer
  weight-only schemes (W4A16, W4A16_ASYM, W8A16), group or channel strategy, symmetric or not,
  ``ignore`` lists (lm_head, "re:" patterns);
- FP8 block (``quant_method: fp8``, e4m3, ``weight_block_size`` [128, 128] or other blocks,
  ``weight_scale_inv``): loaded as dense weights in the compute dtype, see plexus.checkpoint.fp8.

Each format's tensor layout is described in its module (gptq.py, ct_pack.py, fp8.py); the Format
interface (bits, group, align, row_align, act_order, dense, weight_bytes, quantized, read_linear)
in quant_base.py. Anything else is one PlexusError naming config.json, the field and what is
supported.
"""

from __future__ import annotations

import torch

from plexus.checkpoint.ct_pack import FORMAT as CT_FORMAT
from plexus.checkpoint.ct_pack import CompressedTensorsFormat
from plexus.checkpoint.fp8 import FP8BlockFormat
from plexus.checkpoint.gptq import AWQFormat, GPTQFormat, gptq_dynamic
from plexus.checkpoint.quant_base import Format
from plexus.errors import PlexusError

METHODS = ("gptq", "awq", "compressed-tensors", "fp8")

__all__ = ["Format", "quant_format", "METHODS"]


def quant_format(quantization_config: dict | None, source: str = "config.json",
                 dtype: torch.dtype = torch.bfloat16) -> Format | None:
    """The Format of a checkpoint whose config.json (``source``, named in errors) has this
    quantization_config; None when it has none. ``dtype``: what FP8 weights are dequantized to."""
    qc = quantization_config
    if not qc:
        return None

    def bad(field, value, supported, extra=""):
        raise PlexusError(f"{source}: quantization_config.{field} {value!r} is not supported{extra} "
                          f"(supported: {supported})")

    if not isinstance(qc, dict):
        raise PlexusError(f"{source}: quantization_config must be a JSON object")
    method = str(qc.get("quant_method", "")).lower()
    if method == "gptq":
        return _gptq(qc, source, bad)
    if method == "awq":
        return _awq(qc, source, bad)
    if method == "compressed-tensors":
        return _compressed_tensors(qc, source, bad)
    if method == "fp8":
        return _fp8(qc, source, bad, dtype)
    bad("quant_method", qc.get("quant_method"), ", ".join(METHODS))


def _int(qc: dict, names: tuple[str, ...], default, bad):
    for n in names:
        if n in qc and qc[n] is not None:
            v = qc[n]
            if isinstance(v, bool) or not isinstance(v, int):
                bad(n, v, "an integer")
            return n, v
    return names[0], default


def _group(field: str, group: int, bits: int, bad, extra: str = "") -> None:
    """Groups the kernel can stream (plexus.quant.qweight.check_group), or -1."""
    unit = 32 if bits == 4 else 16
    if group != -1 and (group < unit or group % unit):
        bad(field, group, f"multiples of {unit} such as 32, 64, 128, or -1 for one group per row", extra)


def _gptq(qc: dict, source: str, bad) -> GPTQFormat:
    _, bits = _int(qc, ("bits",), None, bad)
    if bits not in (4, 8):
        bad("bits", bits, "4, 8", " for gptq")
    field, group = _int(qc, ("group_size",), 128, bad)
    _group(field, group, bits, bad, f" for {bits}-bit gptq")
    fmt_field = "checkpoint_format" if qc.get("checkpoint_format") is not None else "format"
    ckpt = str(qc.get(fmt_field) or "gptq").lower()
    if ckpt not in ("gptq", "gptq_v2"):
        bad(fmt_field, qc.get(fmt_field), "gptq (v1), gptq_v2")
    if qc.get("pack_dtype") not in (None, "int32", "torch.int32"):
        bad("pack_dtype", qc.get("pack_dtype"), "int32")
    if qc.get("lm_head"):
        bad("lm_head", qc.get("lm_head"), "false: a quantized lm_head is not read")
    for flag in ("sym", "desc_act"):
        if not isinstance(qc.get(flag, False), bool):
            bad(flag, qc.get(flag), "true, false")
    fmt = GPTQFormat(source, bits, group, bool(qc.get("sym", True)), bool(qc.get("desc_act", False)),
                     v1=ckpt == "gptq")
    gptq_dynamic(fmt, qc.get("dynamic"), bad)
    blocks = qc.get("modules_in_block_to_quantize")
    if blocks:
        try:
            fmt.only = [str(n) for b in blocks for n in ([b] if isinstance(b, str) else b)]
        except TypeError:
            bad("modules_in_block_to_quantize", blocks, "lists of module names")
    return fmt


def _awq(qc: dict, source: str, bad) -> AWQFormat:
    field, bits = _int(qc, ("bits", "w_bit"), 4, bad)
    if bits != 4:
        bad(field, bits, "4", " for awq")
    version = str(qc.get("version") or "gemm").lower()
    if version != "gemm":
        bad("version", qc.get("version"), "gemm")
    if qc.get("zero_point", True) is not True:
        bad("zero_point", qc.get("zero_point"), "true")
    field, group = _int(qc, ("group_size", "q_group_size"), 128, bad)
    _group(field, group, 4, bad, " for awq")
    fmt = AWQFormat(source, group)
    fmt.skip = _names(qc.get("modules_to_not_convert"), "modules_to_not_convert", bad)
    return fmt


def _names(v, field: str, bad) -> list[str]:
    if v is None:
        return []
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        bad(field, v, "a list of module names")
    return list(v)


def _compressed_tensors(qc: dict, source: str, bad) -> CompressedTensorsFormat:
    top = qc.get("format")
    for field in ("kv_cache_scheme", "sparsity_config", "transform_config", "moe_sparsity_config"):
        if qc.get(field):
            bad(field, "...", "none: weight-only quantization of the linear layers")
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        bad("config_groups", groups, "a map of quantization schemes")
    schemes, targets = set(), []
    for name, g in groups.items():
        if not isinstance(g, dict):
            bad(f"config_groups.{name}", g, "a scheme (preset names such as 'W4A16' are not read)")
        where = f"config_groups.{name}"
        fmt = g.get("format") or top
        if fmt != CT_FORMAT:
            bad(f"{where}.format" if g.get("format") else "format", fmt, CT_FORMAT)
        for act in ("input_activations", "output_activations"):
            if g.get(act):
                bad(f"{where}.{act}", "...", "none: weight-only schemes such as W4A16 and W8A16")
        w = g.get("weights")
        if not isinstance(w, dict):
            bad(f"{where}.weights", w, "integer weight quantization")
        if str(w.get("type", "int")).lower() != "int":
            bad(f"{where}.weights.type", w.get("type"), "int")
        bits = w.get("num_bits", 8)
        if bits not in (4, 8):
            bad(f"{where}.weights.num_bits", bits, "4, 8")
        strategy = str(w.get("strategy") or ("group" if (w.get("group_size") or 0) > 0 else "tensor")).lower()
        if strategy == "group":
            group = w.get("group_size")
            if not isinstance(group, int) or group <= 0:
                bad(f"{where}.weights.group_size", group, "a positive group size")
            _group(f"{where}.weights.group_size", group, bits, bad, f" for {bits}-bit weights")
        elif strategy == "channel":
            group = None
        else:
            bad(f"{where}.weights.strategy", w.get("strategy"), "group, channel")
        if w.get("dynamic"):
            bad(f"{where}.weights.dynamic", w.get("dynamic"), "false")
        if w.get("block_structure"):
            bad(f"{where}.weights.block_structure", w.get("block_structure"), "none")
        order = w.get("actorder")
        if order not in (None, False, "weight", "static", "group", "dynamic"):
            bad(f"{where}.weights.actorder", order, "weight, group, none")
        sym = w.get("symmetric", True)
        if not isinstance(sym, bool):
            bad(f"{where}.weights.symmetric", sym, "true, false")
        schemes.add((bits, group, sym, order in ("group", "dynamic")))
        t = g.get("targets")
        targets += _names(t, f"{where}.targets", bad)
    if len(schemes) > 1:
        bad("config_groups", sorted(groups), "one weight scheme for every layer (mixed precision)")
    (bits, group, sym, act_order), = schemes
    ignore = _names(qc.get("ignore"), "ignore", bad)
    return CompressedTensorsFormat(source, bits, group, sym, act_order, targets, ignore)


def _fp8(qc: dict, source: str, bad, dtype: torch.dtype) -> FP8BlockFormat:
    if str(qc.get("fmt") or "e4m3").lower() != "e4m3":
        bad("fmt", qc.get("fmt"), "e4m3")
    block = qc.get("weight_block_size")
    if not (isinstance(block, (list, tuple)) and len(block) == 2
            and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        bad("weight_block_size", block, "[rows, columns] blocks such as [128, 128]; per-tensor FP8 is not read")
    if qc.get("scale_fmt") not in (None, "ue8m0", "float32"):
        bad("scale_fmt", qc.get("scale_fmt"), "ue8m0, float32")
    fmt = FP8BlockFormat(source, (block[0], block[1]), dtype)
    fmt.skip = _names(qc.get("modules_to_not_convert"), "modules_to_not_convert", bad)
    return fmt
