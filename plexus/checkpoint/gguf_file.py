"""The GGUF container (llama.cpp's model file), parsed from its documented layout: no code of
llama.cpp runs and the ``gguf`` package is not needed at run time.

    magic "GGUF", version (2 or 3), tensor count, metadata count      (little-endian)
    metadata: key (string), value type (uint32), value
    tensor infos: name, n_dims, dims (ne[0] = the fastest, i.e. input columns), type, offset
    padding to ``general.alignment`` (default 32), then the tensor data

Everything in the header is untrusted: every length, count, offset and size is checked against
the file before it is used, and a problem is one PlexusError naming the file (and the tensor or
key) and what was expected. Tensor data is never read here: ``GGUFFile.rows`` maps the file and
copies out only the rows (and blocks of columns) asked for.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from plexus.errors import PlexusError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
QK_K = 256

# ggml type id -> (name, weights per block, bytes per block) for the types Plexus reads
TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 30: ("BF16", 1, 2),
    2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34),
    12: ("Q4_K", QK_K, 144), 13: ("Q5_K", QK_K, 176), 14: ("Q6_K", QK_K, 210),
}
DENSE = ("F32", "F16", "BF16")
# ggml types that exist but Plexus does not read (named in the error)
OTHER_TYPES = {9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS",
               19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16",
               26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4"}

# metadata value types: id -> struct format (strings, arrays handled apart)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8",
          12: "<f8"}
STRING, ARRAY = 8, 9
MAX_DIMS = 4


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type_id: int
    type_name: str
    dims: tuple[int, ...]    # as stored: ne[0] (columns) first
    offset: int              # absolute, in the file
    nbytes: int
    block: int = 1           # weights per block (1: dense)
    block_bytes: int = 4

    @property
    def shape(self) -> tuple[int, ...]:
        """torch order: (rows, columns) for a matrix."""
        return tuple(reversed(self.dims))

    @property
    def quantized(self) -> bool:
        return self.type_name not in DENSE

    @property
    def row_bytes(self) -> int:
        return self.dims[0] // self.block * self.block_bytes

    @property
    def supported(self) -> bool:
        return self.type_id in TYPES


class _Cursor:
    """Reads little-endian values from the mapped header, each one bounds-checked."""

    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path, self.size = buf, 0, path, len(buf)

    def fail(self, what: str) -> PlexusError:
        return PlexusError(f"{self.path}: not a valid GGUF file: {what}")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"{what} at byte {self.pos} needs {n} bytes but the file has {self.size} "
                            "(truncated or corrupt)")

    def scalar(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v

    def string(self, what: str) -> str:
        n = self.scalar("<Q", f"length of {what}")
        self.need(n, what)
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int, what: str, depth: int = 0):
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype], what)
        if vtype == STRING:
            return self.string(what)
        if vtype == ARRAY and depth < 2:
            etype = self.scalar("<I", f"element type of {what}")
            count = self.scalar("<Q", f"length of {what}")
            if etype in _NUMPY:  # numbers: one bounds check, one copy
                width = np.dtype(_NUMPY[etype]).itemsize
                self.need(count * width, f"{count} elements of {what}")
                a = np.frombuffer(self.buf, dtype=_NUMPY[etype], count=count, offset=self.pos).copy()
                self.pos += count * width
                return a.astype(bool) if etype == 7 else a
            if etype not in (STRING, ARRAY):
                raise self.fail(f"{what} has unknown element type {etype}")
            self.need(count * 8, f"{count} elements of {what}")  # each is at least a length
            return [self.value(etype, what, depth + 1) for _ in range(count)]
        raise self.fail(f"{what} has unknown value type {vtype}")


class GGUFFile:
    """A parsed header: ``metadata`` {key: value} (numeric arrays as numpy arrays) and
    ``tensors`` {gguf name: TensorInfo}, checked to lie inside the file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                self.size = os.fstat(f.fileno()).st_size
                if self.size < 24:
                    raise PlexusError(f"{self.path}: not a GGUF file ({self.size} bytes, shorter than its header)")
                with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                    self._parse(_Cursor(buf, self.path))
        except OSError as e:
            raise PlexusError(f"{self.path}: cannot read ({e.strerror or e})") from None

    def _parse(self, c: _Cursor) -> None:
        if bytes(c.buf[:4]) != MAGIC:
            raise PlexusError(f"{self.path}: not a GGUF file (magic {bytes(c.buf[:4])!r}, expected b'GGUF')")
        c.pos = 4
        version = c.scalar("<I", "version")
        if version not in VERSIONS:
            hint = " (a big-endian file?)" if version > 0xFFFF else ""
            raise PlexusError(f"{self.path}: GGUF version {version}{hint} is not supported (expected 2 or 3)")
        n_tensors = c.scalar("<Q", "tensor count")
        n_kv = c.scalar("<Q", "metadata count")
        # each entry takes at least 12 (key/value) or 24 (tensor info) bytes: reject absurd counts early
        c.need(n_kv * 12 + n_tensors * 24, f"{n_kv} metadata entries and {n_tensors} tensor infos")
        self.metadata: dict = {}
        for _ in range(n_kv):
            key = c.string("metadata key")
            vtype = c.scalar("<I", f"type of metadata {key}")
            self.metadata[key] = c.value(vtype, f"metadata {key}")
        align = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise PlexusError(f"{self.path}: general.alignment {align!r} is not a power of two")
        infos = []
        for _ in range(n_tensors):
            name = c.string("tensor name")
            n_dims = c.scalar("<I", f"tensor {name}: dimension count")
            if not 1 <= n_dims <= MAX_DIMS:
                raise PlexusError(f"{self.path}: tensor {name} has {n_dims} dimensions (expected 1 to {MAX_DIMS})")
            dims = tuple(c.scalar("<Q", f"tensor {name}: dimensions") for _ in range(n_dims))
            type_id = c.scalar("<I", f"tensor {name}: type")
            offset = c.scalar("<Q", f"tensor {name}: offset")
            infos.append((name, dims, type_id, offset))
        data_start = -(-c.pos // align) * align
        self.tensors: dict[str, TensorInfo] = {}
        for name, dims, type_id, offset in infos:
            if name in self.tensors:
                raise PlexusError(f"{self.path}: tensor {name} appears twice")
            self.tensors[name] = self._tensor(name, dims, type_id, offset, data_start, align)
        self.data_start = data_start

    def _tensor(self, name, dims, type_id, offset, data_start, align) -> TensorInfo:
        where = f"{self.path}: tensor {name}"
        if type_id not in TYPES:
            if type_id not in OTHER_TYPES:
                raise PlexusError(f"{where} has unknown tensor type id {type_id} (expected one of "
                                  f"{', '.join(t[0] for t in TYPES.values())})")
            # a type Plexus does not read: fine unless the tensor is used (GGUFCheckpoint checks)
            return TensorInfo(name, type_id, OTHER_TYPES[type_id], dims, data_start + offset, 0, 0, 0)
        tname, block, block_bytes = TYPES[type_id]
        if any(d <= 0 for d in dims) or any(d >= 2**40 for d in dims):
            raise PlexusError(f"{where} has dimensions {list(dims)} (expected positive sizes)")
        if dims[0] % block:
            raise PlexusError(f"{where} ({tname}) has {dims[0]} columns, not a multiple of its block of {block}")
        nbytes = dims[0] // block * block_bytes
        for d in dims[1:]:
            nbytes *= d
        if offset % align:
            raise PlexusError(f"{where}: data offset {offset} is not a multiple of the alignment {align}")
        start = data_start + offset
        if start + nbytes > self.size:
            raise PlexusError(f"{where} ({tname} {list(reversed(dims))}): its data [{start}, {start + nbytes}) "
                              f"runs past the end of the file ({self.size} bytes; truncated download?)")
        return TensorInfo(name, type_id, tname, dims, start, nbytes, block, block_bytes)

    # ---- tensor data ------------------------------------------------------------------------

    def rows(self, t: TensorInfo, r0: int, r1: int, b0: int = 0, b1: int | None = None) -> np.ndarray:
        """Rows [r0, r1) of tensor ``t`` (2-D; a 1-D tensor is one row), blocks [b0, b1) of each:
        uint8 (r1 - r0, b1 - b0, block_bytes), a copy (the file's mapping is closed again)."""
        n_rows = t.nbytes // t.row_bytes
        n_blocks = t.dims[0] // t.block
        b1 = n_blocks if b1 is None else b1
        if not (0 <= r0 <= r1 <= n_rows and 0 <= b0 <= b1 <= n_blocks):
            raise PlexusError(f"{self.path}: tensor {t.name}: rows {r0}-{r1}, blocks {b0}-{b1} are outside "
                              f"its {n_rows} rows of {n_blocks} blocks")
        if r0 == r1 or b0 == b1:
            return np.zeros((r1 - r0, b1 - b0, t.block_bytes), dtype=np.uint8)
        try:
            mm = np.memmap(self.path, dtype=np.uint8, mode="r", offset=t.offset + r0 * t.row_bytes,
                           shape=(r1 - r0, n_blocks, t.block_bytes))
            out = np.array(mm[:, b0:b1])
            del mm
        except (OSError, ValueError) as e:
            raise PlexusError(f"{self.path}: cannot read tensor {t.name} ({e})") from None
        return out


@lru_cache(maxsize=4)
def _cached(path: str, size: int, mtime_ns: int) -> GGUFFile:
    return GGUFFile(path)


def open_gguf(path: str | Path) -> GGUFFile:
    """The parsed header of ``path`` (parsed once per process while the file is unchanged)."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise PlexusError(f"{path}: cannot read ({e.strerror or e})") from None
    return _cached(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
