"""One quantized linear weight, the form every quantized format is converted into.

A weight W of shape (out, in) is cut along its input dimension into groups of ``group``
columns (the last may be shorter); within row r and group g every weight is

    W[r, i] = scales[r, g] * codes[r, i] + mins[r, g]

with unsigned integer codes of ``bits`` bits (4 or 8). A zero point z is folded into the min
(min = -scale * z), which also holds llama.cpp's Q4_1/K-quant minimums. Formats with other
widths (GGUF's 5- and 6-bit types) are stored in 8-bit codes. Scales and mins are float32.

Codes are laid out for the decode kernel (plexus/models/csrc/decode.c):
- 8 bits: one byte per weight, rows of ``in`` bytes;
- 4 bits: each row in blocks of 32 weights (16 bytes, the row's end padded with zero codes to a
  whole block); byte j of a block holds weight j in its low nibble and weight j + 16 in its
  high one (llama.cpp's Q4_0 order), so one 16-byte load unpacks into 32 consecutive weights.

Slicing stays the shard plan's job: ``rows`` cuts output rows (column-parallel layers),
``columns`` input columns on group boundaries (row-parallel layers); a rank holds only its slice.

Act-order (GPTQ desc_act) weights store their columns permuted (``perm``), sorted by group. A
row-parallel rank's input columns of such a weight come from groups scattered over the whole row:
``padded_runs`` stores them sorted by group, each group's run padded to whole units of columns
that read the input as 0 (perm -1), each unit with its group's scale and min — exact, for some
more bytes (``padded_bytes``; the planner counts a bound of them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from plexus.errors import PlexusError

BLOCK4 = 32  # weights per 16-byte block of 4-bit codes
SCHEMES = ("int8", "int4")  # --quantize
CHUNK_WEIGHTS = 2**20  # quantize() works through a tensor this many weights at a time


def bits_of(scheme: str) -> int:
    return {"int8": 8, "int4": 4}[scheme]


@dataclass(frozen=True)
class Layout:
    """How a model's quantized linear weights are stored, for the planner (plexus.parallel.plan.
    QuantShape): codes of ``bits``, a float32 scale and min per row and group of ``group`` input
    columns; row-parallel splits land on ``align`` columns (the group)."""

    bits: int
    group: int
    name: str = ""
    align_to: int = 0  # where the split unit is not the group (GGUF's K-quant super-blocks of 256)
    head_bits: int = 0  # an untied LM head quantized to this many bits too (0: dense), in groups of
    head_group: int = 0  # this many columns (0: ``group``)
    embed_bits: int = 0  # the embedding table quantized (GGUF; 0: dense), in groups of embed_group
    embed_group: int = 0

    @property
    def align(self) -> int:
        return self.align_to or self.group

    def linear_bytes(self, rows: int, columns: int) -> int:
        return rows * (row_bytes(self.bits, columns) + 8 * -(-columns // self.group)) if rows and columns else 0

    def head_bytes(self, rows: int, columns: int) -> int | None:
        """Bytes of an untied LM head's rows, or None where it stays dense."""
        if not self.head_bits:
            return None
        return rows * (row_bytes(self.head_bits, columns) + 8 * -(-columns // (self.head_group or self.group)))

    def embed_bytes(self, rows: int, columns: int) -> int | None:
        """Bytes of the embedding table's rows, or None where it is dense."""
        if not self.embed_bits:
            return None
        return rows * (row_bytes(self.embed_bits, columns) + 8 * -(-columns // self.embed_group))

    def describe(self) -> str:
        head = f", LM head int{self.head_bits}" if self.head_bits and self.head_bits != self.bits else ""
        return f"{self.name or f'int{self.bits}'} (groups of {self.group}{head})"


def row_bytes(bits: int, columns: int) -> int:
    """Bytes of codes per row."""
    return columns if bits == 8 else -(-columns // BLOCK4) * (BLOCK4 // 2)


def check_group(bits: int, group: int, what: str = "--quant-group") -> None:
    """A group the kernel can stream: 4-bit groups are whole 32-weight blocks, 8-bit ones
    multiples of 16."""
    unit = BLOCK4 if bits == 4 else 16
    if group < unit or group % unit:
        raise PlexusError(f"{what} {group} cannot be used with {bits}-bit weights: it must be a multiple of {unit}")


@dataclass
class QuantWeight:
    """See the module docstring. ``shape`` is (out, in) of the weight it stands for."""

    bits: int
    group: int
    shape: tuple[int, int]
    codes: torch.Tensor   # uint8 (out, row_bytes(bits, in))
    scales: torch.Tensor  # float32 (out, groups)
    mins: torch.Tensor    # float32 (out, groups)
    # act-order (GPTQ desc_act): stored column j is the weight's input column perm[j] (int64, one
    # per stored column; -1: padding, reads the input as 0); None: the ``in`` columns in order
    perm: torch.Tensor | None = None

    def __post_init__(self):
        out, cols = self.shape[0], self.stored_columns
        groups = -(-cols // self.group)
        want = {"codes": (torch.uint8, (out, row_bytes(self.bits, cols))),
                "scales": (torch.float32, (out, groups)), "mins": (torch.float32, (out, groups))}
        for name, (dtype, shape) in want.items():
            t = getattr(self, name)
            if t.dtype != dtype or tuple(t.shape) != shape:
                raise PlexusError(f"quantized weight {list(self.shape)}: {name} is {t.dtype} {list(t.shape)}, "
                                  f"expected {dtype} {list(shape)}")

    @property
    def stored_columns(self) -> int:
        """Columns each row stores: ``in``, or more where a permutation pads groups' runs."""
        return self.shape[1] if self.perm is None else self.perm.numel()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.mins))

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.codes, self.scales, self.mins

    # ---- codes <-> integers --------------------------------------------------------------

    def unpacked(self) -> torch.Tensor:
        """The integer codes as uint8 (out, stored columns)."""
        out, cols = self.shape[0], self.stored_columns
        if self.bits == 8:
            return self.codes
        blocks = self.codes.view(out, -1, BLOCK4 // 2)
        q = torch.cat([blocks & 0x0F, blocks >> 4], dim=-1)  # (out, blocks, 32): low nibbles first
        return q.reshape(out, -1)[:, :cols]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W as a dense (out, in) tensor: scales * codes + mins, computed in float32."""
        q = self.unpacked().float()
        g = torch.arange(self.stored_columns, device=q.device) // self.group
        w = q * self.scales[:, g] + self.mins[:, g]
        if self.perm is not None:
            real = self.perm >= 0
            w = w.new_empty(self.shape).index_copy_(1, self.perm[real], w[:, real])
        return w.to(dtype)

    # ---- slices --------------------------------------------------------------------------

    def rows(self, start: int, end: int) -> "QuantWeight":
        return QuantWeight(self.bits, self.group, (end - start, self.shape[1]), self.codes[start:end],
                           self.scales[start:end], self.mins[start:end], self.perm)

    def take(self, rows: torch.Tensor) -> "QuantWeight":
        """Rows ``rows`` (int64 indices), e.g. the embedding rows a batch looks up."""
        return QuantWeight(self.bits, self.group, (rows.numel(), self.shape[1]), self.codes[rows],
                           self.scales[rows], self.mins[rows], self.perm)

    def columns(self, start: int, end: int) -> "QuantWeight":
        """Input columns [start, end): both on group boundaries (or ``end`` the last column)."""
        cols = self.shape[1]
        if self.perm is not None:
            raise PlexusError("an act-order (permuted) quantized weight cannot be cut along its input")
        if start % self.group or (end % self.group and end != cols):
            raise PlexusError(f"columns {start}-{end} of a weight with {cols} columns do not fall on its "
                              f"quantization groups of {self.group}")
        g0, g1 = start // self.group, -(-end // self.group)
        b0, b1 = row_bytes(self.bits, start), row_bytes(self.bits, end)
        return QuantWeight(self.bits, self.group, (self.shape[0], end - start), self.codes[:, b0:b1],
                           self.scales[:, g0:g1], self.mins[:, g0:g1])

    def to(self, device) -> "QuantWeight":
        return QuantWeight(self.bits, self.group, self.shape, *(t.to(device) for t in self.tensors()),
                           None if self.perm is None else self.perm.to(device))


def padded_bytes(bits: int, runs: list[int], unit: int) -> int:
    """Bytes a row takes storing runs of ``runs`` columns each padded to whole units of ``unit``."""
    stored = sum(-(-c // unit) * unit for c in runs)
    return row_bytes(bits, stored) + 8 * (stored // unit)


def padded_runs(groups: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, list[int], int]:
    """How to store input columns whose groups are ``groups`` (int, one per column, any order):
    (perm, the group of each unit, unit). perm lists the columns sorted by group (stably), each
    group's run followed by -1s up to a whole unit; the unit is the multiple of the kernel's block
    (32 columns at 4 bits, 16 at 8) up to ``group`` that takes the fewest bytes."""
    g = groups.to(torch.int64)
    order = torch.argsort(g, stable=True)
    present, counts = torch.unique_consecutive(g[order], return_counts=True)
    runs = counts.tolist()
    units = [BLOCK4 if bits == 4 else 16]
    while units[-1] * 2 <= group:
        units.append(units[-1] * 2)
    unit = min(units, key=lambda u: (padded_bytes(bits, runs, u), -u))
    perm, of_unit, at = [], [], 0
    for grp, c in zip(present.tolist(), runs):
        pad = -c % unit
        perm += [order[at:at + c], torch.full((pad,), -1, dtype=torch.int64)]
        of_unit += [grp] * ((c + pad) // unit)
        at += c
    return torch.cat(perm), of_unit, unit


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (out, in), each in [0, 2**bits), -> the kernel's layout (see above)."""
    q = q.to(torch.uint8)
    if bits == 8:
        return q.contiguous()
    out, cols = q.shape
    pad = -cols % BLOCK4
    if pad:
        q = torch.cat([q, q.new_zeros(out, pad)], dim=1)
    blocks = q.view(out, -1, BLOCK4)
    return (blocks[..., :BLOCK4 // 2] | (blocks[..., BLOCK4 // 2:] << 4)).reshape(out, -1).contiguous()


def from_integers(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group: int) -> QuantWeight:
    """W = scales * (q - zeros) per group: q (out, in) integers in [0, 2**bits), scales and zeros
    (out, groups) (zeros may be fractional)."""
    scales = scales.float()
    return QuantWeight(bits, group, tuple(q.shape), pack(q, bits), scales.contiguous(),
                       (-scales * zeros.float()).contiguous())


def quantize(w: torch.Tensor, bits: int, group: int) -> QuantWeight:
    """Round to nearest, per row and group of ``group`` input columns (the last may be shorter):
    8 bits symmetric (scale = max |w| / 127, zero point 128), 4 bits asymmetric (scale =
    (max - min) / 15, an integer zero point in [0, 15]). Scales are rounded up to float16 first, so
    a checkpoint written with float16 scales (``plexus quantize``) reloads as the same model.
    Row by row and group by group from column 0, so the result is the same whichever rows or
    whole groups of columns a rank quantizes. Done ~1M weights at a time, so the float32
    temporaries stay small next to the tensor being quantized."""
    out, cols = w.shape
    step = max(1, CHUNK_WEIGHTS // max(1, cols))
    if out > step:
        parts = [quantize(w[r:r + step], bits, group) for r in range(0, out, step)]
        return QuantWeight(bits, group, (out, cols), *(torch.cat(t) for t in zip(*(p.tensors() for p in parts))))
    groups = -(-cols // group)
    pad = groups * group - cols
    wf = w.float()
    if pad:  # pad the last group with a copy of its first value: no effect on its min or max
        wf = torch.cat([wf, wf[:, -(cols % group):][:, :1].expand(out, pad)], dim=1)
    g = wf.view(out, groups, group)
    top = (1 << bits) - 1
    if bits == 8:
        scale = g.abs().amax(-1) / 127
        zero = torch.full_like(scale, 128.0)
    else:
        lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)  # zero exactly representable
        scale = (hi - lo) / top
    half = scale.to(torch.float16)  # the float16 at or above the scale: the extremes stay in range
    half = torch.where(half.float() < scale, torch.nextafter(half, torch.full_like(half, float("inf"))), half)
    scale = half.float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group: any scale
    if bits == 4:
        zero = (-lo / scale).round().clamp(0, top)
    q = (g / scale.unsqueeze(-1) + zero.unsqueeze(-1)).round().clamp(0, top)
    q = q.view(out, -1)[:, :cols].to(torch.uint8)
    return from_integers(q, scale, zero, bits, group)


def concat_rows(parts: list[QuantWeight]) -> QuantWeight:
    """Weights with the same input stacked by rows (q/k/v, gate/up), in one common format: the
    widest bits and the smallest group of the parts (widening 4-bit codes to 8 bits and splitting
    a group into smaller ones with the same scale and min are exact)."""
    bits, group = max(p.bits for p in parts), min(p.group for p in parts)
    perms = {None if p.perm is None else tuple(p.perm.tolist()) for p in parts}
    if len(perms) > 1:
        raise PlexusError("fused weights with different act-order permutations")
    parts = [p if (p.bits, p.group) == (bits, group) else widen(p, bits, group) for p in parts]
    return QuantWeight(bits, group, (sum(p.shape[0] for p in parts), parts[0].shape[1]),
                       torch.cat([p.codes for p in parts]), torch.cat([p.scales for p in parts]),
                       torch.cat([p.mins for p in parts]), parts[0].perm)


def widen(w: QuantWeight, bits: int, group: int) -> QuantWeight:
    """The same weight with ``bits`` >= w.bits and ``group`` dividing w.group (exact)."""
    if bits < w.bits or w.group % group:
        raise PlexusError(f"cannot store {w.bits}-bit groups of {w.group} as {bits}-bit groups of {group}")
    k = w.group // group
    cols = w.stored_columns
    groups = -(-cols // group)
    scales = w.scales.repeat_interleave(k, dim=1)[:, :groups]
    mins = w.mins.repeat_interleave(k, dim=1)[:, :groups]
    return QuantWeight(bits, group, w.shape, pack(w.unpacked(), bits), scales.contiguous(), mins.contiguous(),
                       w.perm)
