"""FP8 block-quantized checkpoints (``quant_method: fp8``, ``weight_block_size: [128, 128]``), as
Qwen3-FP8 and DeepSeek-V3 ship: per linear ``prefix``,

- ``weight`` float8_e4m3fn (out, in);
- ``weight_scale_inv`` float32 (or a power-of-two dtype for ``scale_fmt: ue8m0``)
  (ceil(out / 128), ceil(in / 128)): W[r, c] = weight[r, c] * weight_scale_inv[r // 128, c // 128].

These are loaded as dense weights, not QuantWeights: each slice a rank reads is dequantized in
float32 and rounded once to ``dtype`` (the model's compute dtype, bfloat16 unless the engine sets
it). An FP8 value is not an integer code: e4m3 spaces its 256 values unevenly (from 2^-9 to 448),
so the values of one (row, 128-column) group fall on one evenly spaced 8-bit grid scale * k + min
only in special cases, and an exact mapping to Plexus's 8-bit codes does not exist in general.
The cost is memory: a dense bfloat16 weight takes 2 bytes per weight, where the FP8 file takes 1.
Slices need no alignment (align and row_align are 1).
"""

from __future__ import annotations

import torch

from plexus.checkpoint.quant_base import Format, locate, read_checked
from plexus.errors import PlexusError

ROWS_PER_CHUNK_ELEMENTS = 1 << 22  # float32 temporaries while dequantizing


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


class FP8BlockFormat(Format):
    method = "fp8"
    dense = True

    def __init__(self, source: str, block: tuple[int, int], dtype: torch.dtype = torch.bfloat16):
        super().__init__(source, 8, block[1], align=1, row_align=1)
        self.block, self.dtype = tuple(block), dtype

    def weight_bytes(self, out: int, cols: int) -> int:
        """A dense weight in ``dtype``."""
        return out * cols * torch.empty((), dtype=self.dtype).element_size()

    def describe(self) -> str:
        return f"fp8 blocks {list(self.block)} (loaded dense as {str(self.dtype).removeprefix('torch.')})"

    def marker(self, prefix: str) -> str:
        return f"{prefix}.weight_scale_inv"

    def shape(self, reader, prefix: str) -> tuple[int, int]:
        want = reader.expected.get(f"{prefix}.weight")
        if want is not None:
            return want
        _, shape = reader._locate(f"{prefix}.weight")
        if len(shape) != 2:
            raise PlexusError(f"{reader.location[f'{prefix}.weight'][0].name}: tensor {prefix}.weight has shape "
                              f"{list(shape)}, expected a matrix")
        return tuple(shape)

    def read(self, reader, prefix, out, cols, dim, start, end):
        bo, bi = self.block
        what = f"{self.source}'s quantization_config (fp8, weight_block_size {list(self.block)})"
        wn, sn = f"{prefix}.weight", f"{prefix}.weight_scale_inv"
        locate(reader, wn, (out, cols), what)
        r0, r1, c0, c1 = 0, out, 0, cols
        if dim == 0:
            r0, r1 = start, end
        elif dim == 1:
            c0, c1 = start, end
        w = reader.read(wn, dim, start, end)
        if w.dtype != torch.float8_e4m3fn:
            raise PlexusError(f"{reader.location[wn][0].name}: tensor {wn} is {w.dtype}, expected float8_e4m3fn "
                              f"from {what}")
        s = read_checked(reader, sn, (_ceil(out, bo), _ceil(cols, bi)), what, kinds="float",
                         dim=dim, start=(r0 // bo, c0 // bi)[dim] if dim is not None else 0,
                         end=(_ceil(r1, bo), _ceil(c1, bi))[dim] if dim is not None else None)
        rows = torch.arange(r0, r1) // bo - (r0 // bo if dim == 0 else 0)
        colg = torch.arange(c0, c1) // bi - (c0 // bi if dim == 1 else 0)
        s_cols = s[:, colg]  # (scale rows, columns of the slice)
        dense = torch.empty(r1 - r0, c1 - c0, dtype=self.dtype)
        step = max(1, ROWS_PER_CHUNK_ELEMENTS // max(1, c1 - c0))
        for a in range(0, r1 - r0, step):
            b = min(r1 - r0, a + step)
            dense[a:b] = (w[a:b].float() * s_cols[rows[a:b]]).to(self.dtype)
        return dense
