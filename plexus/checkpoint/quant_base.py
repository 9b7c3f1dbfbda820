"""What every pre-quantized checkpoint format shares (plexus.checkpoint.hf_quant picks one from
config.json): the ``Format`` interface the engine and the memory planner use, and the pieces the
formats are made of — int32 word unpacking, bounds, alignment and shape checks, act-order
permutations and the dense fallback for layers a config leaves unquantized.

A format converts a checkpoint's packed tensors into plexus.quant.qweight.QuantWeight
(W = scales * codes + mins per group of input columns) and reads only the slice a rank needs:
``read_linear(reader, prefix, dim, start, end)`` with dim None (whole weight), 0 (output rows
[start, end): column-parallel q/k/v/gate/up) or 1 (input columns [start, end): row-parallel
o_proj/down_proj). A slice that does not land on the format's packing or group units is refused
with one line naming the tensor, the unit and the slice: ``row_align`` and ``align`` say the
units, so a planner can round its split before any weight is read.
"""

from __future__ import annotations

import re

import torch

from plexus.errors import PlexusError
from plexus.quant.qweight import QuantWeight, from_integers, pack, padded_bytes, padded_runs, row_bytes

CHUNK_WORDS = 1 << 20  # packed words unpacked at a time (bounds the int64 temporaries)


class Format:
    """A pre-quantized checkpoint format (see the module docstring).

    - ``method``: config.json's quant_method ("gptq", "awq", "compressed-tensors", "fp8");
    - ``bits``: code width, 4 or 8;
    - ``group``: input columns per group of scales; None for one group spanning the whole row
      (GPTQ/AWQ group_size -1, compressed-tensors' channel strategy);
    - ``align``: the input-column unit a row-parallel (dim 1) split must land on;
    - ``row_align``: the output-row unit a column-parallel (dim 0) split must land on;
    - ``act_order``: weights may carry a g_idx permutation (GPTQ desc_act): they cannot be split
      along their input (dim 1) unless their g_idx turns out to be the identity;
    - ``dense``: read_linear returns dense tensors in ``dtype`` (FP8), not QuantWeights.
    """

    method = ""
    dense = False
    act_order = False

    def __init__(self, source: str, bits: int, group: int | None, align: int, row_align: int):
        self.source, self.bits, self.group, self.align, self.row_align = source, bits, group, align, row_align
        self.skip: list[str] = []       # substrings of module names left unquantized
        self.skip_re: list[str] = []    # regexes (re.match) of module names left unquantized

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.bits}-bit group {self.group} from {self.source}>"

    # ---- what the planner asks ------------------------------------------------------------

    def weight_bytes(self, out: int, cols: int) -> int:
        """Bytes of the QuantWeight a (out, cols) weight becomes: codes plus float32 scales and
        mins (8 bytes per group per row). A permutation (act-order) adds 8 bytes per column,
        not counted here (QuantWeight.nbytes does not count it either)."""
        groups = 1 if self.group is None else -(-cols // self.group)
        return out * (row_bytes(self.bits, cols) + 8 * groups)

    def input_slice_bytes(self, out: int, cols: int, total: int) -> int:
        """The planner's bytes for ``cols`` of a weight's ``total`` input columns (a row-parallel
        slice). An act-order slice's columns come from groups all over the row and are stored in
        padded runs (see plexus.quant.qweight.padded_runs): at most one run per group it touches,
        each padded by less than the kernel's block, its bytes counted at that block as the unit
        (the loader's choice of unit takes no more)."""
        if not self.act_order or cols >= total or self.group is None:
            return self.linear_bytes(out, cols)
        block = 32 if self.bits == 4 else 16
        runs = min(-(-total // self.group), cols)
        return out * padded_bytes(self.bits, [cols + runs * (block - 1)], block) if out and cols else 0

    def linear_bytes(self, rows: int, columns: int) -> int:
        """weight_bytes under the planner's name (plexus.parallel.plan.QuantShape): a Format can
        stand for the model's quantized layout itself."""
        return self.weight_bytes(rows, columns) if rows and columns else 0

    def describe(self) -> str:
        groups = "one group per row" if self.group is None else f"groups of {self.group}"
        return f"{self.method} int{self.bits} ({groups}{', act-order' if self.act_order else ''})"

    def quantized(self, prefix: str) -> bool:
        """Whether config.json says linear ``prefix`` (e.g. model.layers.0.mlp.up_proj) is stored
        quantized; the others are read as dense ``prefix.weight``."""
        return not (any(s in prefix for s in self.skip) or any(re.match(p, prefix) for p in self.skip_re))

    # ---- reading -------------------------------------------------------------------------

    def read_linear(self, reader, prefix: str, dim: int | None = None, start: int = 0, end: int | None = None):
        """QuantWeight (or, for a layer stored dense, a tensor) of exactly the asked slice."""
        if not self.quantized(prefix) or (self.marker(prefix) not in reader.location
                                          and f"{prefix}.weight" in reader.location):
            return reader.read(f"{prefix}.weight", dim, start, end)
        if dim not in (None, 0, 1):
            raise PlexusError(f"{prefix}: cannot read a linear weight along dimension {dim}")
        out, cols = self.shape(reader, prefix)
        size = (out, cols)[dim] if dim is not None else 0
        if dim is None:
            start, end = 0, None
        else:
            end = size if end is None else end
            if not 0 <= start < end <= size:
                raise PlexusError(f"{prefix}: slice [{start}, {end}) of dimension {dim} is outside the weight's "
                                  f"shape {[out, cols]}")
            if (start, end) == (0, size):  # the whole weight (a world of one rank): no split to check
                dim, end = None, None
        return self.read(reader, prefix, out, cols, dim, start, end)

    def marker(self, prefix: str) -> str:
        """The tensor whose presence says ``prefix`` is stored quantized."""
        raise NotImplementedError

    def shape(self, reader, prefix: str) -> tuple[int, int]:
        """(out, in) of the weight ``prefix`` stands for."""
        raise NotImplementedError

    def read(self, reader, prefix: str, out: int, cols: int, dim, start, end):
        raise NotImplementedError

    # ---- checks --------------------------------------------------------------------------

    def check_rows(self, name: str, start: int, end: int, out: int, unit: int) -> None:
        """dim 0 slices of tensors packing ``unit`` output rows per int32 word."""
        if start % unit or (end % unit and end != out):
            raise PlexusError(f"{name}: packs {unit} output rows per int32 word, so a column-parallel split must "
                              f"cut its output rows in units of {unit} (asked for rows {start}-{end} of {out})")

    def check_columns(self, name: str, start: int, end: int, cols: int, unit: int) -> None:
        """dim 1 slices: on the quantization groups (``self.group``; None: one group per row, any
        split) and on ``unit`` input columns per word."""
        units = [(unit, f"{unit} input columns per int32 word")]
        if self.group is not None:
            units.insert(0, (self.group, f"quantization groups of {self.group} input columns"))
        for u, what in units:
            if start % u or (end % u and end != cols):
                raise PlexusError(f"{name}: a row-parallel split must fall on its {what} (asked for columns "
                                  f"{start}-{end} of {cols})")


def locate(reader, name: str, want: tuple[int, ...], what: str) -> None:
    """The full shape of packed tensor ``name`` in the checkpoint is ``want`` (``what``: the config
    that implies it), else one line naming the file, the tensor and the expected shape."""
    path, shape = reader._locate(name)
    if tuple(shape) != tuple(want):
        raise PlexusError(f"{path.name}: tensor {name} has shape {list(shape)}, expected {list(want)} from "
                          f"{what}")


def read_checked(reader, name: str, want: tuple[int, ...], what: str, dim=None, start=0, end=None,
                 kinds: str = "int") -> torch.Tensor:
    """Tensor ``name`` (shape-checked against ``want``), or its slice [start, end) along ``dim``,
    of an integer or floating dtype (``kinds``)."""
    locate(reader, name, want, what)
    t = reader.read(name, dim, start, end)
    ok = t.dtype in (torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8) if kinds == "int" else \
        t.is_floating_point()
    if not ok:
        path = reader.location[name][0]
        raise PlexusError(f"{path.name}: tensor {name} is {t.dtype}, expected "
                          f"{'int32' if kinds == 'int' else 'a floating-point dtype'} from {what}")
    if kinds == "float":
        t = t.float()
        if not torch.isfinite(t).all():
            raise PlexusError(f"{reader.location[name][0].name}: tensor {name} holds non-finite scales")
    return t


def unpack_words(words: torch.Tensor, bits: int, axis: int, order: list[int] | None = None) -> torch.Tensor:
    """int32 words each holding 32 // bits unsigned codes, lowest bits first, unpacked along
    ``axis`` (0: a word holds consecutive rows, 1: consecutive columns) into uint8 codes; ``order``
    reorders the codes within each word (AWQ's interleaving: code j of a word is its field
    order[j])."""
    per, mask = 32 // bits, (1 << bits) - 1
    w = words if axis == 1 else words.t()
    rows, n = w.shape
    out = torch.empty(rows, n * per, dtype=torch.uint8)
    shifts = torch.arange(0, 32, bits, dtype=torch.int64)
    if order is not None:
        shifts = shifts[torch.tensor(order)]
    step = max(1, CHUNK_WORDS // max(1, n))
    for a in range(0, rows, step):
        chunk = w[a:a + step].to(torch.int64) & 0xFFFFFFFF
        out[a:a + step] = ((chunk.unsqueeze(-1) >> shifts) & mask).reshape(chunk.shape[0], -1).to(torch.uint8)
    return out if axis == 1 else out.t()


def act_order_perm(name: str, g_idx: torch.Tensor, group: int, cols: int) -> torch.Tensor | None:
    """QuantWeight.perm for a g_idx (group of each input column): stored column j is input column
    perm[j], columns sorted by group (stable); None where g_idx is the plain column // group.
    Every group must hold ``group`` columns (the last may hold fewer), as GPTQ's act-order writes."""
    g = g_idx.to(torch.int64)
    plain = torch.arange(cols) // group
    if torch.equal(g, plain):
        return None
    perm = torch.argsort(g, stable=True)
    if not torch.equal(g[perm], plain):
        raise PlexusError(f"{name}: its groups do not each hold {group} input columns (the last may hold "
                          "fewer), which GPTQ's act-order always writes; this g_idx cannot be loaded")
    return perm


def assemble(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group: int,
             perm: torch.Tensor | None = None) -> QuantWeight:
    """QuantWeight from uint8 codes (out, in) in input order, scales and (possibly fractional)
    zero points (out, groups), W = scales * (q - zeros); with ``perm``, codes are stored in
    permuted order and groups refer to stored columns."""
    if perm is not None:
        q = q[:, perm]
    w = from_integers(q.contiguous(), _packed(scales), _packed(zeros), bits, group)
    w.perm = perm
    return w


def assemble_columns(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group: int,
                     g_idx: torch.Tensor, start: int) -> QuantWeight:
    """QuantWeight of input columns [start, start + q.shape[1]) of an act-order weight (a
    row-parallel slice), stored as plexus.quant.qweight.padded_runs says: ``q`` uint8 codes (out,
    the slice's columns) in input order; ``scales``, ``zeros`` (out, all the weight's groups);
    ``g_idx`` the whole weight's group of each input column. The slice's perm indexes its own
    input (the rank's part of x), -1 for padding."""
    out, ncols = q.shape
    perm, of_unit, unit = padded_runs(g_idx[start:start + ncols], bits, group)
    real = perm >= 0
    codes = q.new_zeros(out, perm.numel())
    codes[:, real] = q[:, perm[real]]
    units = torch.tensor(of_unit, dtype=torch.int64)
    s = scales.float()[:, units]
    return QuantWeight(bits, unit, (out, ncols), pack(codes, bits), _packed(s),
                       _packed(-s * zeros.float()[:, units]), perm)


def _packed(t: torch.Tensor) -> torch.Tensor:
    """``t`` with row-major strides, also along size-1 dimensions (a transposed (1, n) tensor is
    "contiguous" to torch with a last stride of n, which byte views of it refuse)."""
    return torch.empty(t.shape, dtype=t.dtype).copy_(t)
