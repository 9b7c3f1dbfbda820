"""The fused decode kernel (plexus/models/csrc/decode.c), float32, bfloat16 and float16: build, load, run it.

A decode step on the CPU is memory-bound: it should cost the time to stream the rank's weights
once. Eager torch adds ~25 small dispatched ops per layer, each run cache-cold after the weight
stream, which cost about a fifth of the step (docs/benchmarks.md). ``FusedDecoder`` runs each
half of a decoder layer (attention, MLP) as one C call instead; tensor parallelism is unchanged:
the same shards, and the same allreduce after each half on worlds of more than one rank.

The C file is compiled on first use with the machine's C compiler (``cc -O3 -march=native
-fopenmp``) into ``$PLEXUS_CACHE/kernels`` and reused, once per dtype it serves: float32,
bfloat16 (``-DPLEXUS_BF16``) and float16 (``-DPLEXUS_F16``). In the 16-bit builds the weights and
KV cache are read as stored and computed on in float32, which streams half the bytes: a
bfloat16 step is 4x as fast as torch's bfloat16 ops here (docs/benchmarks.md). Where there is
no compiler, no OpenMP, or the build fails, the engine runs the eager torch path, which
computes the same thing (in 16 bits the kernel rounds less often: only the weights and the KV
cache are 16-bit, not the activations between ops).
``PLEXUS_KERNELS=0`` turns the kernel off, ``=1`` allows it off x86-64 (where it is unmeasured).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from plexus.errors import MeshBroken
from plexus.files import apply_umask
from plexus.log import get_logger
from plexus.parallel.hostmem import host_empty
from plexus.parallel.sizes import format_size
from plexus.models.cstructs import (_OFF, _Ends, _Layer, _Scratch, _layout_bytes, _mat, _tail_layout,
                                    _tail_mat, _tail_pieces, int8_activations)
from plexus.models.node_group import _NodeGroup, _node_group
from plexus.models.paged import KV_BLOCK

SOURCE = Path(__file__).with_name("csrc") / "decode.c"
HEADERS = [SOURCE.with_name("qdot.h"), SOURCE.with_name("rows.h")]  # included by decode.c: part of a build's key
# -ffp-contract=off: no multiply-add fused where the source has none (what -std=c11 means to gcc, said
# for every compiler), so each inlined copy of a dot product rounds alike: batch invariance (rows.h)
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11", "-ffp-contract=off"]
DTYPE_FLAGS = {torch.float32: [], torch.bfloat16: ["-DPLEXUS_BF16"], torch.float16: ["-DPLEXUS_F16"]}  # one build each


TAIL_SHARE = 16  # a rank of a node group may take the last 1/16 of the next rank's o_proj and down_proj rows
HEAD_TAIL_SHARE = 32  # and the last 1/32 of its LM-head rows (1/8 and 1/16 measured no faster)


_libs: dict = {}  # dtype -> the loaded library, or False once building or loading it failed


def cache_dir() -> Path:
    return Path(os.environ.get("PLEXUS_CACHE") or Path.home() / ".cache" / "plexus") / "kernels"


def _cpu_id() -> str:
    """What -march=native depends on: the CPU's model and flags (a cache shared over NFS by
    different machines must not hand one CPU's build to another)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags", "Features"))}))
    except OSError:
        return platform.processor() + platform.machine()


def build(compiler: str | None = None, dtype: torch.dtype = torch.float32) -> Path:
    """Compile decode.c for this machine and ``dtype`` (once; later calls find it in the
    cache). Raises RuntimeError with the compiler's message when it cannot."""
    cc = compiler or os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError("no C compiler (cc or gcc) on PATH")
    src, flags = SOURCE.read_bytes() + b"".join(h.read_bytes() for h in HEADERS), [*FLAGS, *DTYPE_FLAGS[dtype]]
    key = hashlib.sha256(src + " ".join([cc, *flags]).encode() + _cpu_id().encode()).hexdigest()[:16]
    out = cache_dir() / f"decode-{str(dtype).removeprefix('torch.')}-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)  # ranks on one node may build at once
    os.close(fd)
    try:
        r = subprocess.run([cc, *flags, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True,
                           timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"{cc} failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
        apply_umask(tmp, executable=True)  # mkstemp made it 0600
        os.replace(tmp, out)
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"{cc}: {e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def library(dtype: torch.dtype = torch.float32):
    """The kernel library for models stored in ``dtype``, built and loaded on first use; None
    where it is off or unavailable, or for a dtype it does not serve."""
    lib = _libs.get(dtype)
    if lib is None:
        setting = os.environ.get("PLEXUS_KERNELS", "auto").lower()
        if dtype not in DTYPE_FLAGS or setting in _OFF or not sys.platform.startswith("linux"):
            lib = False
        elif setting == "auto" and platform.machine().lower() not in ("x86_64", "amd64"):
            lib = False
        else:
            try:
                lib = ctypes.CDLL(str(build(dtype=dtype)))  # torch is loaded, so its OpenMP runtime is shared
                p, i, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_long
                lib.plexus_attention.argtypes = [p, p, p, p, f, p, p, p, i, i, p, i]
                lib.plexus_mlp.argtypes = [p, p, p, p, i, i, p, i]
                lib.plexus_head.argtypes = [p, p, p, p, i]
                lib.plexus_step.argtypes = [p, f, p, p, f, p, p, p, f, p, p, p, p, i]
                lib.plexus_matvec.argtypes = [p, p, p, f, f, i]
                lib.plexus_qmatvec.argtypes = [p, p, p, f, f, p, f, f, p, p, f, f, i]
                lib.plexus_dequant.argtypes = [p, p, p, f, f, p, f, f, i]
                for fn in (lib.plexus_attention, lib.plexus_mlp, lib.plexus_head, lib.plexus_matvec, lib.plexus_qmatvec,
                           lib.plexus_dequant):
                    fn.restype = None
                lib.plexus_step.restype = ctypes.c_int
                lib.plexus_kv_block.argtypes, lib.plexus_kv_block.restype = [], f
                lib.plexus_step_rows.argtypes = [p, f, p, p, p, f, p, p, p, f, i]
                lib.plexus_rows_embed.argtypes = [p, p, p, f]
                lib.plexus_rows_embed.restype = None
                lib.plexus_rows_half.argtypes = [p, p, p, f, i, i, p, p, f, i]
                lib.plexus_rows_head.argtypes = [p, p, f, p, i]
                lib.plexus_attend_chunk.argtypes, lib.plexus_attend_chunk.restype = [p, p, p, p, f, f, p, i], None
                for fn in (lib.plexus_step_rows, lib.plexus_rows_half, lib.plexus_rows_head):
                    fn.restype = ctypes.c_int
                if lib.plexus_kv_block() != KV_BLOCK:
                    raise RuntimeError(f"the kernel's KV_BLOCK is {lib.plexus_kv_block()}, models/paged.py's {KV_BLOCK}")
            except (RuntimeError, OSError) as e:
                get_logger().warning("fused decode kernel unavailable (%s); decoding with torch ops", e)
                lib = False
        _libs[dtype] = lib
    return lib or None


def _tail_rows(rows: int, share: int) -> int:
    """Rows another rank may take of ``rows``: about 1/share of them, in whole blocks of the
    kernel's 8, at least one block where there are 4 or more."""
    return max(8, rows // share // 8 * 8) if rows >= 32 else 0


def _taking_rows() -> bool:
    return os.environ.get("PLEXUS_TAKE_ROWS", "1").lower() not in _OFF


def qmatvec(weight, x: torch.Tensor, out: torch.Tensor, dtype: torch.dtype = torch.float32,
            act8: bool | None = None) -> None:
    """out = W @ x for a QuantWeight W (any build serves it; ``dtype`` picks which), x and out
    float32 contiguous: the kernel's quantized dot product, for the probe and tests."""
    perm = None if weight.perm is None else weight.perm.to(torch.int64).contiguous()
    library(dtype).plexus_qmatvec(weight.codes.data_ptr(), weight.scales.data_ptr(), weight.mins.data_ptr(),
                                  weight.bits, weight.group, None if perm is None else perm.data_ptr(),
                                  weight.stored_columns, int(int8_activations() if act8 is None else act8), x.data_ptr(), out.data_ptr(), weight.shape[0],
                                  weight.shape[1], torch.get_num_threads())


def dequantize_into(weight, out: torch.Tensor) -> bool:
    """out (contiguous, CPU, the weight's shape) = the QuantWeight ``weight`` dequantized to
    out's dtype, in C on all the rank's threads; False where the kernel cannot (then the caller
    uses QuantWeight.dequantize)."""
    lib = library(out.dtype)
    if lib is None or weight.perm is not None or weight.device.type != "cpu":
        return False
    lib.plexus_dequant(weight.codes.data_ptr(), weight.scales.data_ptr(), weight.mins.data_ptr(), weight.bits,
                       weight.group, out.data_ptr(), weight.shape[0], weight.shape[1], torch.get_num_threads())
    return True


def matvec(weight: torch.Tensor, x: torch.Tensor, out: torch.Tensor) -> None:
    """out = weight @ x with the kernel's streaming loop: weight of any dtype it serves, x and out
    float32, all contiguous (the bench's probe; the LM head of a float32 prefill)."""
    library(weight.dtype).plexus_matvec(weight.data_ptr(), x.data_ptr(), out.data_ptr(), weight.shape[0],
                                        weight.shape[1], torch.get_num_threads())


class ChunkAttention:
    """One layer's attention for a prompt chunk through the kernel (csrc/rows.h,
    ``plexus_attend_chunk``): every query over the sequence's cached positions where its blocks
    lie, with no gather of them into one tensor (which costs a copy of the whole history per
    layer and chunk)."""

    def __init__(self, decoder: "FusedDecoder", layer: int, max_context: int):
        self.decoder, self.layer, self.max_context = decoder, layer, max_context  # the decoder owns the struct
        self.lib = decoder.lib

    def __call__(self, q: torch.Tensor, table: torch.Tensor, start: int) -> torch.Tensor:
        """q (T, heads, head_dim) at positions start.. -> (T, heads, head_dim) in q's dtype."""
        qf = q.float().contiguous()
        out, threads = torch.empty_like(qf), torch.get_num_threads()
        scores = torch.empty(threads * self.max_context)
        table = table.contiguous()
        self.lib.plexus_attend_chunk(self.layer, qf.data_ptr(), out.data_ptr(), table.data_ptr(), start,
                                             q.shape[0], scores.data_ptr(), threads)
        return out.to(q.dtype)


class FusedDecoder:
    """Runs a CausalLM's decode step for one new token (batch 1) through the C kernel: the
    embedding, every decoder layer, the final norm and this rank's rows of the LM head.

    Holds raw pointers to the model's weights and KV cache, so it is made after both are in
    place (``CausalLM.allocate_cache``) and dropped with them.
    """

    @classmethod
    def for_model(cls, model) -> "FusedDecoder | None":
        """A decoder for ``model``, or None where the kernel does not apply (not on the CPU, or a
        dtype it does not serve) or is unavailable. Collective: every rank calls it (to agree on a
        node group)."""
        e, comm = model.embed_tokens, model.comm
        usable = e.device.type == "cpu" and library(e.dtype) is not None
        # ranks that all decode with the kernel on one node sum through shared memory; otherwise
        # (several nodes, or a rank without the kernel) through MPI, as the torch path does
        if comm.size > 1 and all(comm.allgather_obj(usable)) and comm.local_size == comm.size:
            decoder = cls(model)
            a, mlp = model.layers[0].self_attn, model.layers[0].mlp
            decoder.group = _node_group(comm, model.config.hidden_size, model.config.vocab_size,
                                        max(a.num_heads_per_rank * a.head_dim, mlp.intermediate_per_rank))
        elif usable:
            decoder = cls(model)
        else:
            return None
        for layer, ptr in zip(model.layers, decoder._layer_ptrs):  # prompt chunks' attention, on the blocks
            layer.self_attn.cache.kernel = ChunkAttention(decoder, ptr, model.max_context)
        return decoder

    def __init__(self, model):
        cfg, self.comm = model.config, model.comm
        self.dtype = dtype = model.embed_tokens.dtype  # of the weights and KV cache; the rest is float32
        self.lib = library(dtype)
        rope = model.rope
        assert rope.cos.is_contiguous() and rope.sin.is_contiguous() and rope.cos.dtype == torch.float32
        self._rope = rope  # the tables: float32 (max_context, head_dim)
        self._cos, self._sin, self._rope_row = rope.cos.data_ptr(), rope.sin.data_ptr(), rope.cos.stride(0) * 4
        keep = []  # tensors the structs point into
        layers = []
        for layer in model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            nq, nk, d = attn.num_heads_per_rank, attn.num_kv_heads_per_rank, attn.head_dim
            kv_of_q = (attn.kv_index if attn.kv_index is not None
                       else torch.arange(nq) // (nq // nk)).to(torch.long).contiguous()
            linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
            tensors = [layer.input_layernorm.weight, layer.post_attention_layernorm.weight, attn.cache.k,
                       attn.cache.v, *(m.weight for m in linears if m.qweight is None)]
            assert all(t.is_contiguous() and t.dtype == dtype for t in tensors)
            assert all(t.is_contiguous() for m in linears if m.qweight is not None for t in m.qweight.tensors())
            keep += [kv_of_q, *tensors]
            bias = attn.qkv_proj.bias
            assert bias is None or (bias.is_contiguous() and bias.dtype == dtype)
            layers.append(_Layer(
                layer.input_layernorm.weight.data_ptr(), bias.data_ptr() if bias is not None else None,
                layer.post_attention_layernorm.weight.data_ptr(), *(_mat(m, keep) for m in linears),
                attn.cache.k.data_ptr(), attn.cache.v.data_ptr(), kv_of_q.data_ptr(), nq, nk, d, cfg.hidden_size,
                mlp.intermediate_per_rank, model.max_context, cfg.sliding_window or 0, attn.cache.blocks,
                cfg.rms_norm_eps))
        embed, head = model.embed_tokens, model.lm_head
        for t in (model.norm.weight,) + tuple(m.weight for m in (embed, head) if m.qweight is None):
            assert t.is_contiguous() and t.dtype == dtype
        keep.append(model.norm.weight)
        self.ends = _Ends(_mat(embed, keep), model.norm.weight.data_ptr(), _mat(head, keep),
                          embed.rows[0], embed.num_rows, cfg.hidden_size, cfg.rms_norm_eps)
        self.embed_tokens, self.lm_head = embed, head
        self.vocab, self.vocab_rows = cfg.vocab_size, head.rows[1] - head.rows[0]
        self.layers = (_Layer * len(layers))(*layers)
        self._layer_ptrs = [ctypes.addressof(self.layers[i]) for i in range(len(layers))]
        self._keep = keep
        a = model.layers[0].self_attn
        nq, nk, d = a.num_heads_per_rank, a.num_kv_heads_per_rank, a.head_dim
        m = model.layers[0].mlp.intermediate_per_rank
        self._scratch_tensors = [torch.empty(n) for n in (
            cfg.hidden_size, (nq + 2 * nk) * d, nq * d, nq * model.max_context, 2 * m)]
        self.scratch = _Scratch(*(t.data_ptr() for t in self._scratch_tensors))
        self.x, self.out = torch.empty(cfg.hidden_size), torch.empty(cfg.hidden_size)
        self._logits = torch.empty(1, 1, self.vocab) if self.comm.rank == 0 else None
        self.group: _NodeGroup | None = None
        self._sizes = (cfg.hidden_size, (nq + 2 * nk) * d, nq * d, 2 * m, model.max_context)
        self._rows = None  # the batched step (plexus/models/rows.py), made on first use

    def rows(self, tokens: list[int], tables: list[torch.Tensor], positions: list[int]) -> torch.Tensor | None:
        """One decode step of several sequences: sequence i's ``tokens[i]`` at ``positions[i]``,
        its KV blocks listed by ``tables[i]`` -> float32 logits (len(tokens), vocab) on rank 0
        (None elsewhere), row i bitwise the same whatever the other rows are (csrc/rows.h)."""
        if self._rows is None:
            from plexus.models.rows import RowStepper

            self._rows = RowStepper(self)
        return self._rows(tokens, tables, positions)

    def take_rows(self, model, spare_bytes: int | None) -> None:
        """Collective over a node group (see decode.c, "Taking rows"): give the previous rank a
        copy of the rows it may take from this one (the last 1/TAIL_SHARE of each o_proj and
        down_proj shard's rows, the last 1/HEAD_TAIL_SHARE of the LM head's), take the next
        rank's, and point the kernel at them: about 2% more weight memory, for steps that no
        longer wait for the slowest rank. Not done where a rank's plan leaves it less than that
        to spare (``spare_bytes``: its budget or usable memory less its weights and KV cache;
        None: unknown), or with PLEXUS_TAKE_ROWS=0."""

        comm, hidden = self.comm, model.config.hidden_size
        a, mlp = model.layers[0].self_attn, model.layers[0].mlp
        shapes = comm.allgather_obj((a.num_heads_per_rank * a.head_dim, mlp.intermediate_per_rank,
                                     self.ends.rows, self.ends.first))
        prev, nxt = (comm.rank - 1) % comm.size, (comm.rank + 1) % comm.size
        o_cols, down_cols, head_rows, head_first = shapes[nxt]
        rows = _tail_rows(hidden, TAIL_SHARE) if all(o and m for o, m, _, _ in shapes) else 0
        own_head, next_head = (_tail_rows(n, HEAD_TAIL_SHARE) for n in (self.ends.rows, head_rows))
        # the rows each rank hands the previous one: per layer o_proj's and down_proj's last rows,
        # then the LM head's, each dense or quantized as the rank holds it
        mine = [(m, hidden - rows, rows) for layer in model.layers for m in (layer.self_attn.o_proj, layer.mlp.down_proj)]
        mine.append((model.lm_head, self.ends.rows - own_head, own_head))
        layouts = comm.allgather_obj([_tail_layout(m, n) for m, _, n in mine])[nxt]  # what the next rank sends
        need = sum(_layout_bytes(x) for x in layouts)
        permuted = any(getattr(m.qweight, "perm", None) is not None for m, _, _ in mine)
        why = ("PLEXUS_TAKE_ROWS=0" if not _taking_rows() else "no rows to take" if rows == 0 else
               "act-order weights" if permuted else
               f"rank {comm.rank} has {spare_bytes:,} bytes to spare, not {need:,}"
               if spare_bytes is not None and need > spare_bytes else None)
        whys = [w for w in comm.allgather_obj(why) if w]
        if comm.rank == 0:
            get_logger().info("node group: %s", f"ranks do not take rows from one another ({whys[0]})" if whys else
                              f"each rank holds a copy of {format_size(need)} of the next rank's rows, "
                              "to take them when it finishes its own first")
        if whys:
            return
        send = torch.cat([piece for m, first, n in mine for piece in _tail_pieces(m, first, n)])
        tails = host_empty((need,), torch.uint8)
        comm.sendrecv_(send, prev, tails, nxt)
        del send
        mats, at = [], tails.data_ptr()
        for layout in layouts:
            mats.append(_tail_mat(layout, at))
            at += _layout_bytes(layout)
        for i in range(len(self._layer_ptrs)):
            layer = self.layers[i]  # a view into the array the kernel reads
            layer.o_tail, layer.down_tail = mats[2 * i], mats[2 * i + 1]
            layer.tail_rows, layer.o_tail_cols, layer.down_tail_cols = rows, o_cols, down_cols
        self.ends.own_tail, self.ends.head_tail = own_head, mats[-1]
        self.ends.tail_first, self.ends.tail_rows = head_first + head_rows - next_head, next_head
        self._keep.append(tails)

    @property
    def rows_taken(self) -> int:
        """Blocks of 8 rows this rank has computed for the next one so far (node groups)."""
        return self.group.struct.taken if self.group is not None else 0

    def __call__(self, token: int, pos: int, table: torch.Tensor, reuse: bool = False) -> torch.Tensor | None:
        """``token`` at position ``pos`` of the sequence whose KV blocks ``table`` (int64, contiguous,
        covering pos) lists -> float32 logits (1, 1, vocab) on rank 0, None elsewhere: a new
        tensor, or with ``reuse`` (on one node) a buffer that the next such call overwrites."""
        threads, blocks = torch.get_num_threads(), table.data_ptr()
        cos, sin = self._cos + pos * self._rope_row, self._sin + pos * self._rope_row  # no tensor ops: cold
        ends, scratch, out = ctypes.byref(self.ends), ctypes.byref(self.scratch), self.out.data_ptr()
        if self.comm.size == 1 or self.group is not None:
            logits = None
            if self.comm.rank == 0:
                logits = self._logits if reuse else torch.empty(1, 1, self.vocab)
            failed = self.lib.plexus_step(self.layers, len(self._layer_ptrs), ends, scratch, token, self.x.data_ptr(),
                                          out, None if logits is None else logits.data_ptr(), pos, blocks, cos, sin,
                                          None if self.group is None else self.group.ref, threads)
            if failed:
                why = ("exited" if failed == 2 else
                       f"stopped answering for {self.group.struct.timeout_s:g} s")
                raise MeshBroken(f"rank {self.comm.rank}: another rank on this node {why} during a decode step")
            return logits
        # ranks on several nodes: the embedding's sum, each half's and the logits' gather through MPI
        x = self.embed_tokens(torch.tensor([[token]])).float().contiguous()
        xp = x.data_ptr()
        for i, layer in enumerate(self._layer_ptrs):
            self.lib.plexus_attention(layer, scratch, xp, out, pos, blocks, cos, sin, i > 0, 0, None, threads)
            self.comm.allreduce_(self.out)
            self.lib.plexus_mlp(layer, scratch, xp, out, 1, 0, None, threads)
            self.comm.allreduce_(self.out)
        x.view(-1).add_(self.out)
        local = torch.empty(1, 1, self.vocab_rows)
        self.lib.plexus_head(ends, scratch, xp, local.data_ptr(), threads)
        return self.lm_head.gather(local)
