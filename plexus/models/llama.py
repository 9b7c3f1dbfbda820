"""The Llama family (Llama 2/3.x, Mistral, Qwen2) as transformers computes it, tensor-parallel.

Reads top to bottom: rotary embedding, attention, MLP, decoder layer, causal LM. Every size here
is this rank's share (``num_heads_per_rank`` ...), taken from the ShardPlan; the parallel layers
hide the collectives, so this file has none.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from plexus.models.config import ModelConfig
from plexus.models.kernels import FusedDecoder
from plexus.models.layers import (ColumnParallelLinear, ParallelLMHead, RMSNorm, RowParallelLinear,
                                  VocabParallelEmbedding)
from plexus.models.paged import KV_BLOCK, PagedKV, blocks_for
from plexus.parallel.comm import Communicator
from plexus.parallel.plan import RankShard, ShardPlan


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """RoPE inverse frequencies, with Llama 3.1's long-context rescaling when configured."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = config.rope_scaling
    if s is None:
        return inv_freq
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for every position up to ``max_context``, built once (float32)."""

    def __init__(self, config: ModelConfig, max_context: int, device: torch.device):
        super().__init__()
        pos = torch.arange(max_context, dtype=torch.float32)
        freqs = torch.outer(pos, rope_inv_freq(config))  # (T, head_dim/2)
        self.register_buffer("cos", torch.cat((freqs, freqs), dim=-1).cos().to(device), persistent=False)
        # rotate_half(x) * sin == swap_halves(x) * [-sin, sin]: the sign lives in the table
        sin = freqs.sin()
        self.register_buffer("sin", torch.cat((-sin, sin), dim=-1).to(device), persistent=False)

    def tables(self, start: int, t: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin for positions start .. start+t-1, shaped (T, 1, head_dim) to
        broadcast over (B, T, heads, head_dim); made once per forward pass, not per layer."""
        cos = self.cos[start:start + t].to(dtype).unsqueeze(1)
        sin = self.sin[start:start + t].to(dtype).unsqueeze(1)
        return cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, T, heads, head_dim) in transformers' rotate-half layout: x*cos + rotate_half(x)*sin,
    rounded op by op as transformers does."""
    d = x.shape[-1]
    swapped = x.unflatten(-1, (2, d // 2)).flip(-2).flatten(-2)  # (x2, x1)
    return x * cos + swapped * sin


class Attention(nn.Module):
    """Grouped-query self-attention over this rank's query heads and the KV heads they use.

    qkv_proj is column-parallel (no collective); o_proj is row-parallel (one allreduce).
    The KV cache holds only this rank's KV heads, in blocks of a pool (models/paged.py).
    """

    def __init__(self, config: ModelConfig, shard: RankShard, prefix: str, comm: Communicator,
                 dtype: torch.dtype, device: torch.device, quantized: bool = False):
        super().__init__()
        d = config.head_dim
        self.dtype, self.device = dtype, device
        self.head_dim = d
        self.num_heads_per_rank = shard.num_heads
        self.num_kv_heads_per_rank = shard.num_kv_heads
        self.sliding_window = config.sliding_window
        (qa, qb), (ka, kb) = shard.q_heads, shard.kv_heads
        self.qkv_proj = ColumnParallelLinear(
            config.hidden_size,
            [(f"{prefix}.q_proj", (qa * d, qb * d)), (f"{prefix}.k_proj", (ka * d, kb * d)),
             (f"{prefix}.v_proj", (ka * d, kb * d))],
            bias=config.attention_bias, dtype=dtype, device=device, quantized=quantized)
        self.o_proj = RowParallelLinear(f"{prefix}.o_proj", (qa * d, qb * d), config.hidden_size, comm,
                                        dtype, device, quantized)
        # which local KV head each local query head reads
        kv_of_q = torch.tensor([h // config.group_size - ka for h in range(qa, qb)])
        rep = self.num_heads_per_rank // self.num_kv_heads_per_rank
        uniform = self.num_heads_per_rank % self.num_kv_heads_per_rank == 0 and bool(
            (kv_of_q == torch.arange(self.num_heads_per_rank) // rep).all())
        self.kv_index = None if uniform else kv_of_q.to(device)
        self.cache: PagedKV | None = None

    def allocate_cache(self, blocks: int) -> None:
        self.cache = PagedKV(self.num_kv_heads_per_rank, self.head_dim, blocks, self.dtype, torch.device(self.device))

    def forward(self, x: torch.Tensor, start: int, cos: torch.Tensor, sin: torch.Tensor,
                table: torch.Tensor) -> torch.Tensor:
        """x (1, T, hidden) at positions start.. of the sequence whose KV blocks ``table`` lists."""
        b, t, _ = x.shape
        d, nq, nk = self.head_dim, self.num_heads_per_rank, self.num_kv_heads_per_rank
        qkv = self.qkv_proj(x)  # (1, T, (nq + 2 nk) d)
        qk = apply_rope(qkv[..., :(nq + nk) * d].view(b, t, nq + nk, d), cos, sin)  # q and k rotated at once
        v = qkv[..., (nq + nk) * d:].view(b, t, nk, d)  # (1, T, nk, d)
        end = start + t
        self.cache.write(table, start, qk[0, :, nq:], v[0])
        if self.cache.kernel is not None:  # on the CPU with the kernel: no gather of the history
            return self.o_proj(self.cache.kernel(qk[0, :, :nq], table, start).view(b, t, nq * d))
        lo = 0 if self.sliding_window is None else max(0, end - self.sliding_window - t + 1)
        keys, values = self.cache.read(table, lo, end)  # (1, nk, S, d)
        q = qk[:, :, :nq].transpose(1, 2)  # (1, nq, T, d)
        if self.kv_index is not None:
            keys, values = keys.index_select(1, self.kv_index), values.index_select(1, self.kv_index)
        mask, causal = None, False
        if t > 1:
            qpos = torch.arange(start, end, device=x.device).unsqueeze(1)
            kpos = torch.arange(lo, end, device=x.device).unsqueeze(0)
            if start == 0 and self.sliding_window is None:
                causal = True
            else:
                mask = kpos <= qpos
                if self.sliding_window is not None:
                    mask = mask & (qpos - kpos < self.sliding_window)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal,
                                             enable_gqa=self.kv_index is None and nq != nk)
        # (B, nq, T, d) -> (B, T, nq*d); with one position that is a free view
        out = out.view(b, t, nq * d) if t == 1 else out.transpose(1, 2).reshape(b, t, nq * d)
        return self.o_proj(out)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); gate/up column-parallel, down row-parallel."""

    def __init__(self, config: ModelConfig, shard: RankShard, prefix: str, comm: Communicator,
                 dtype: torch.dtype, device: torch.device, quantized: bool = False):
        super().__init__()
        cols = shard.mlp_columns
        self.intermediate_per_rank = shard.intermediate
        self.gate_up_proj = ColumnParallelLinear(
            config.hidden_size, [(f"{prefix}.gate_proj", cols), (f"{prefix}.up_proj", cols)],
            bias=False, dtype=dtype, device=device, quantized=quantized)
        self.down_proj = RowParallelLinear(f"{prefix}.down_proj", cols, config.hidden_size, comm, dtype, device,
                                           quantized)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)  # (B, T, 2 * intermediate_per_rank)
        i = self.intermediate_per_rank
        gate = F.silu(gate_up[..., :i], inplace=True)  # in place: no new buffers per token
        return self.down_proj(gate.mul_(gate_up[..., i:]))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, shard: RankShard, i: int, comm: Communicator,
                 dtype: torch.dtype, device: torch.device, quantized: bool = False):
        super().__init__()
        p = f"model.layers.{i}"
        eps, h = config.rms_norm_eps, config.hidden_size
        self.input_layernorm = RMSNorm(f"{p}.input_layernorm", h, eps, dtype, device)
        self.self_attn = Attention(config, shard, f"{p}.self_attn", comm, dtype, device, quantized)
        self.post_attention_layernorm = RMSNorm(f"{p}.post_attention_layernorm", h, eps, dtype, device)
        self.mlp = MLP(config, shard, f"{p}.mlp", comm, dtype, device, quantized)

    def forward(self, x: torch.Tensor, start: int, cos: torch.Tensor, sin: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), start, cos, sin, table)
        return x + self.mlp(self.post_attention_layernorm(x))


class CausalLM(nn.Module):
    """Embedding -> decoder layers -> final norm -> LM head, for this rank's shard. ``quantized``:
    the decoder layers' linear weights come from the reader as QuantWeights (nothing dense is
    allocated for them)."""

    def __init__(self, config: ModelConfig, plan: ShardPlan, comm: Communicator, max_context: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", quantized: bool = False):
        super().__init__()
        device = torch.device(device)
        self.config, self.plan, self.comm, self.max_context = config, plan, comm, max_context
        shard = plan[comm.rank]
        h = config.hidden_size
        self.embed_tokens = VocabParallelEmbedding("model.embed_tokens", shard.vocab_rows, h, comm, dtype, device)
        self.rope = RotaryEmbedding(config, max_context, device)
        self.layers = nn.ModuleList(DecoderLayer(config, shard, i, comm, dtype, device, quantized)
                                    for i in range(config.num_layers))
        self.norm = RMSNorm("model.norm", h, config.rms_norm_eps, dtype, device)
        self.lm_head = ParallelLMHead("lm_head", shard.vocab_rows, h, plan.vocab_sizes, comm, dtype, device,
                                      tied=self.embed_tokens if config.tie_word_embeddings else None)
        self.fused: FusedDecoder | None = None
        self.solo_table: torch.Tensor | None = None

    def allocate_cache(self, blocks: int | None = None) -> None:
        """Preallocate the KV cache: a pool of ``blocks`` blocks of KV_BLOCK positions (default:
        one max_context sequence's); with weights and cache in place, build the fused decode step
        where it applies (float32, bfloat16 or float16 on the CPU, see plexus/models/kernels.py).
        ``solo_table`` (the first blocks, in order) is the table of calls that name none."""
        blocks = blocks or blocks_for(self.max_context)
        for layer in self.layers:
            layer.self_attn.allocate_cache(blocks)
        self.solo_table = torch.arange(min(blocks, blocks_for(self.max_context)))
        self.fused = FusedDecoder.for_model(self)

    def forward(self, ids: torch.Tensor, start: int = 0, last_only: bool = True,
                table: torch.Tensor | None = None) -> torch.Tensor | None:
        """ids (1, T) at positions start.. of the sequence whose KV blocks ``table`` (int64, on
        the CPU; default ``solo_table``) lists -> float32 logits (1, T or 1, vocab) on rank 0,
        None elsewhere."""
        table = self.solo_table if table is None else table
        end = start + ids.shape[1]
        if ids.shape[0] != 1 or end > len(table) * KV_BLOCK:
            raise ValueError(f"{tuple(ids.shape)} ids at {start} for a table of {len(table)} blocks")
        if self.fused is not None and ids.shape == (1, 1):
            # one new token (a decode step): all of the below, collectives included, in the fused
            # C kernel (plexus/models/kernels.py)
            return self.fused(int(ids), start, table)
        x = self.embed_tokens(ids)  # (1, T, hidden)
        cos, sin = self.rope.tables(start, ids.shape[1], x.dtype)
        blocks = table[:blocks_for(end)].to(x.device)
        for layer in self.layers:
            x = layer(x, start, cos, sin, blocks)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.norm(x))

    def step(self, token: int, pos: int, table: torch.Tensor | None = None) -> torch.Tensor | None:
        """One decode step of one sequence: ``forward`` for the single id ``token`` at ``pos``,
        except that with the fused kernel the logits come in a buffer the next step reuses (and
        no tensor is built for the id: each torch op between steps runs cache-cold)."""
        if self.fused is not None:
            return self.fused(token, pos, self.solo_table if table is None else table, reuse=True)
        return self(torch.tensor([[token]], device=self.embed_tokens.device), pos, table=table)

    def step_rows(self, tokens: list[int], tables: list[torch.Tensor], positions: list[int]) -> torch.Tensor | None:
        """One decode step of several sequences (sequence i: ``tokens[i]`` at ``positions[i]``,
        its KV blocks listed by ``tables[i]``) -> float32 logits (len(tokens), vocab) on rank 0,
        None elsewhere. Each row's logits are bitwise the same whatever the other rows are: in the
        kernel one weight stream serves every row (models/rows.py); without it each row is its own
        forward pass."""
        if self.fused is not None:
            return self.fused.rows(tokens, tables, positions)
        device = self.embed_tokens.device
        rows = [self(torch.tensor([[t]], device=device), p, table=s) for t, s, p in zip(tokens, tables, positions)]
        return None if rows[0] is None else torch.cat([r[0, -1:].float().cpu() for r in rows])
