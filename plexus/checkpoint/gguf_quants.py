"""GGUF tensor blocks -> Plexus's weights: dense torch tensors for F32/F16/BF16, and for the
quantized types a QuantWeight (W = scale * code + min per group of input columns) holding the
same values exactly:

    type   block  bytes   -> bits group  scale     min          code
    Q4_0     32    18         4    32    d         -8 d         q (4 bits, llama.cpp's nibble order)
    Q4_1     32    20         4    32    d         m            q
    Q5_0     32    22         8    32    d         -16 d        q (5 bits)
    Q5_1     32    24         8    32    d         m            q (5 bits)
    Q8_0     32    34         8    32    d         -128 d       q + 128
    Q4_K    256   144         4    32    d sc_j    -dmin m_j    q (8 sub-blocks of 32, 6-bit sc/m)
    Q5_K    256   176         8    32    d sc_j    -dmin m_j    q (5 bits)
    Q6_K    256   210         8    16    d sc_j    -32 d sc_j   q (6 bits; 16 sub-blocks, int8 sc)

"Exactly": every product and sum above is exact in float32 (an fp16 d has 11 significant bits,
sub-block scales at most 8, codes at most 8), so ``QuantWeight.dequantize`` gives llama.cpp's own
dequantized values bit for bit. The layouts follow ggml-quants.c's dequantize_row_* functions.

Every function takes the raw blocks of some rows, uint8 (rows, blocks, block_bytes), as
``GGUFFile.rows`` returns them.
"""

from __future__ import annotations

import numpy as np
import torch

from plexus.quant.qweight import QuantWeight, pack


def _f16(raw: np.ndarray, at: int) -> np.ndarray:
    """The fp16 at byte ``at`` of every block, as float32 (rows, blocks)."""
    return np.ascontiguousarray(raw[..., at:at + 2]).view(np.float16)[..., 0].astype(np.float32)


def _qweight(codes: np.ndarray, scales: np.ndarray, mins: np.ndarray, bits: int, group: int) -> QuantWeight:
    """codes uint8 (rows, columns) unpacked; scales/mins float32 (rows, groups)."""
    rows = codes.shape[0]
    q = torch.from_numpy(np.ascontiguousarray(codes).reshape(rows, -1))
    return QuantWeight(bits, group, tuple(q.shape), pack(q, bits),
                       torch.from_numpy(np.ascontiguousarray(scales, dtype=np.float32).reshape(rows, -1)),
                       torch.from_numpy(np.ascontiguousarray(mins, dtype=np.float32).reshape(rows, -1)))


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """16 bytes -> 32 4-bit values: low nibbles are values 0-15, high ones 16-31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1's 4-byte qh (little-endian uint32) -> the fifth bit of each of 32 values."""
    h = np.ascontiguousarray(qh).view("<u4")[..., 0]
    return ((h[..., None] >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)


def q4_0(raw):
    d = _f16(raw, 0)
    rows = raw.shape[0]
    # llama.cpp's Q4_0 nibble order is QuantWeight's 4-bit layout: the bytes are the codes as they are
    codes = torch.from_numpy(np.ascontiguousarray(raw[..., 2:18]).reshape(rows, -1))
    cols = raw.shape[1] * 32
    return QuantWeight(4, 32, (rows, cols), codes, torch.from_numpy(d), torch.from_numpy(-8 * d))


def q4_1(raw):
    d, m = _f16(raw, 0), _f16(raw, 2)
    rows = raw.shape[0]
    codes = torch.from_numpy(np.ascontiguousarray(raw[..., 4:20]).reshape(rows, -1))
    return QuantWeight(4, 32, (rows, raw.shape[1] * 32), codes, torch.from_numpy(d), torch.from_numpy(m))


def q5_0(raw):
    d = _f16(raw, 0)
    q = _nibbles(raw[..., 6:22]) | (_high_bits(raw[..., 2:6]) << 4)
    return _qweight(q, d, -16 * d, 8, 32)


def q5_1(raw):
    d, m = _f16(raw, 0), _f16(raw, 2)
    q = _nibbles(raw[..., 8:24]) | (_high_bits(raw[..., 4:8]) << 4)
    return _qweight(q, d, m, 8, 32)


def q8_0(raw):
    d = _f16(raw, 0)
    q = (raw[..., 2:34].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    return _qweight(q, d, -128 * d, 8, 32)


def _k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 bytes -> 8 six-bit scales and 8 mins (ggml's get_scale_min_k4)."""
    lo, mid, hi = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = np.concatenate([lo & 63, (hi & 0x0F) | ((lo >> 6) << 4)], axis=-1)
    mn = np.concatenate([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def q4_k(raw):
    rows, blocks = raw.shape[:2]
    d, dmin = _f16(raw, 0), _f16(raw, 2)
    sc, mn = _k_scales(raw[..., 4:16])
    qs = raw[..., 16:144].reshape(rows, blocks, 4, 32)  # 4 chunks of 64: sub-block 2c low, 2c + 1 high
    q = np.stack([qs & 0x0F, qs >> 4], axis=-2)       # (rows, blocks, 4, 2, 32)
    return _qweight(q, d[..., None] * sc, -(dmin[..., None] * mn), 4, 32)


def q5_k(raw):
    rows, blocks = raw.shape[:2]
    d, dmin = _f16(raw, 0), _f16(raw, 2)
    sc, mn = _k_scales(raw[..., 4:16])
    qh = raw[..., 16:48]                                # bit j of qh[l]: fifth bit of sub-block j, value l
    qs = raw[..., 48:176].reshape(rows, blocks, 4, 32)
    low = np.stack([qs & 0x0F, qs >> 4], axis=-2).reshape(rows, blocks, 8, 32)
    high = (qh[..., None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1
    return _qweight(low | (high << 4), d[..., None] * sc, -(dmin[..., None] * mn), 8, 32)


def q6_k(raw):
    rows, blocks = raw.shape[:2]
    ql = raw[..., 0:128].reshape(rows, blocks, 2, 64)   # two halves of 128 values
    qh = raw[..., 128:192].reshape(rows, blocks, 2, 32)
    sc = raw[..., 192:208].view(np.int8).astype(np.float32)  # (rows, blocks, 16)
    d = _f16(raw, 208)
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=-1)  # values 0-31, 32-63 | 64-95, 96-127 of a half
    high = (qh[..., None, :] >> np.array([0, 2, 4, 6], dtype=np.uint8)[:, None]) & 3
    q = low | (high.reshape(rows, blocks, 2, 128) << 4)
    scale = d[..., None] * sc
    return _qweight(q, scale, -32 * scale, 8, 16)


QUANT = {"Q4_0": q4_0, "Q4_1": q4_1, "Q5_0": q5_0, "Q5_1": q5_1, "Q8_0": q8_0,
         "Q4_K": q4_k, "Q5_K": q5_k, "Q6_K": q6_k}
DENSE_DTYPES = {"F32": (np.float32, torch.float32), "F16": (np.float16, torch.float16),
                "BF16": (np.int16, torch.bfloat16)}


def to_weight(type_name: str, raw: np.ndarray) -> "torch.Tensor | QuantWeight":
    """Rows of raw blocks -> a dense (rows, columns) tensor in the stored dtype, or a QuantWeight."""
    if type_name in QUANT:
        return QUANT[type_name](raw)
    np_dtype, dtype = DENSE_DTYPES[type_name]
    a = np.ascontiguousarray(raw).view(np_dtype).reshape(raw.shape[0], -1)
    return torch.from_numpy(a).view(dtype)
