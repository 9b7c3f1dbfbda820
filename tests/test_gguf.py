"""GGUF files (plexus.checkpoint.gguf*), checked against independent references: files written by
the ``gguf`` package's GGUFWriter from tiny random transformers models, tensor data quantized by
``gguf.quants.quantize`` (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, BF16) or, for the K-quants it cannot
quantize, hand-built valid random blocks; every value Plexus reads is compared with
``gguf.quants.dequantize`` of the same rows, names come from gguf's own tensor-name map, Q/K rows
are permuted with llama.cpp's converter's formula, and tokenizers and configs are compared with
what transformers builds from the same file (``gguf_file=``).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import STORIES_DIR, assert_clean_error, plexus_cmd, redraw_weights, run

gguf = pytest.importorskip("gguf", reason="the gguf package (pip install gguf) writes the test files")
transformers = pytest.importorskip("transformers")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf.quants import dequantize, quantize  # noqa: E402

from plexus.checkpoint.gguf import GGUFCheckpoint, find_gguf, gguf_config  # noqa: E402
from plexus.checkpoint.gguf_file import GGUFFile  # noqa: E402
from plexus.checkpoint.gguf_vocab import gguf_vocab  # noqa: E402
from plexus.errors import PlexusError  # noqa: E402
from plexus.models.config import ModelConfig  # noqa: E402
from plexus.quant.qweight import QuantWeight  # noqa: E402

QUANTIZABLE = [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]
K_QUANTS = [Q.Q4_K, Q.Q5_K, Q.Q6_K]
DENSE = [Q.F32, Q.F16, Q.BF16]
# what each type becomes in Plexus: (bits, group) of the QuantWeight
EXPECTED_FORMAT = {Q.Q8_0: (8, 32), Q.Q4_0: (4, 32), Q.Q4_1: (4, 32), Q.Q5_0: (8, 32), Q.Q5_1: (8, 32),
                   Q.Q4_K: (4, 32), Q.Q5_K: (8, 32), Q.Q6_K: (8, 16)}
# in-features multiples of 256 so that every type (K-quants: super-blocks of 256) can hold them
SIZES = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=512, max_position_embeddings=128, bos_token_id=1, eos_token_id=2)


# ---- writing GGUF files the way llama.cpp's converter does -------------------------------------

def llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute (Q with n_head, K with n_head_kv)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_blocks(qtype, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Valid random blocks of ``qtype`` (random bytes, with finite fp16 super-block scales)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    n = rows * cols // block
    raw = rng.integers(0, 256, size=(n, size), dtype=np.uint8)
    scales = [(rng.standard_normal(n) * 0.01).astype(np.float16).view(np.uint8).reshape(n, 2) for _ in range(2)]
    if qtype == Q.Q6_K:
        raw[:, 208:210] = scales[0]
    else:  # Q4_K, Q5_K, Q2_K: d then dmin first... Q2_K keeps them at the end
        at = 80 if qtype == Q.Q2_K else 0
        raw[:, at:at + 2], raw[:, at + 2:at + 4] = scales
    return raw.reshape(rows, -1)


def encode_tensor(a: np.ndarray, qtype, seed: int = 0) -> tuple[np.ndarray, object]:
    """(data, raw_dtype) for GGUFWriter.add_tensor."""
    if qtype == Q.F32:
        return a.astype(np.float32), None
    if qtype == Q.F16:
        return a.astype(np.float16), None
    if qtype in K_QUANTS or qtype == Q.Q2_K:
        return random_blocks(qtype, *a.shape, seed=seed), qtype
    return quantize(a.astype(np.float32), qtype), qtype


def add_vocab(w, source: Path, kind: str, add_bos: bool | None = None) -> None:
    """Tokenizer metadata from a tokenizer.json: ``llama`` (tokens, SentencePiece-style scores,
    token types) or ``gpt2`` (tokens and merges)."""
    t = json.loads((source / "tokenizer.json").read_text())
    cfg = json.loads((source / "tokenizer_config.json").read_text())
    tokens = [None] * len(t["model"]["vocab"])
    for tok, i in t["model"]["vocab"].items():
        tokens[i] = tok
    special = {a["id"] for a in t["added_tokens"] if a["special"]}
    for a in t["added_tokens"]:
        tokens[a["id"]] = a["content"]
    types = [3 if i in special else 6 if kind == "llama" and tok.startswith("<0x") else 1
             for i, tok in enumerate(tokens)]
    w.add_tokenizer_model(kind)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if kind == "llama":  # SentencePiece ranks pieces by score: earlier ids merge first
        w.add_token_scores([-float(i) if ty == 1 else 0.0 for i, ty in enumerate(types)])
    else:
        w.add_tokenizer_pre("default")
        w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in t["model"]["merges"]])
    ids = {a["content"]: a["id"] for a in t["added_tokens"]}
    w.add_bos_token_id(ids[cfg["bos_token"]])
    w.add_eos_token_id(ids[cfg["eos_token"]])
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    if cfg.get("chat_template"):
        w.add_chat_template(cfg["chat_template"])


def make_model(kind: str = "llama", seed: int = 0, **overrides):
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[kind]
    sizes = {**SIZES, **overrides}
    if kind == "qwen2":
        sizes.setdefault("tie_word_embeddings", True)
    torch.manual_seed(seed)
    return redraw_weights(cls[1](cls[0](**sizes)), seed).eval()  # every layer matters


def write_gguf(path: Path, model, qtype=Q.F32, arch: str | None = None, vocab: tuple | None = None,
               permute: bool = True, types: dict | None = None, extra=None) -> Path:
    """``model`` as llama.cpp's converter writes it: gguf's tensor names, Q/K permuted (llama),
    norms and biases F32, the matrices ``qtype`` (``types``: {gguf name: type} overrides)."""
    c = model.config
    arch = arch or c.model_type
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny {arch}")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    rope = getattr(c, "rope_parameters", None) or {}
    w.add_rope_freq_base(float(rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))))
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_vocab_size(c.vocab_size)
    if vocab:
        add_vocab(w, *vocab)
    else:
        w.add_bos_token_id(c.bos_token_id)
        w.add_eos_token_id(c.eos_token_id)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], c.num_hidden_layers)
    for i, (hf, t) in enumerate(model.state_dict().items()):
        if hf == "lm_head.weight" and c.tie_word_embeddings:
            continue  # as save_pretrained leaves it out: the converter writes no output.weight
        name = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        a = t.float().numpy()
        if arch == "llama" and permute and (".q_proj." in hf or ".k_proj." in hf):
            kv = c.num_attention_heads if ".q_proj." in hf else c.num_key_value_heads
            a = llama_cpp_permute(a, c.num_attention_heads, kv)
        ty = (types or {}).get(name, qtype if a.ndim == 2 else Q.F32)
        data, raw = encode_tensor(a, ty, seed=i)
        w.add_tensor(name, data, raw_dtype=raw)
    for name, a in (extra or {}).items():
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def reference(path: Path, config: ModelConfig, arch: str = "llama") -> dict[str, np.ndarray]:
    """Every tensor of the file dequantized by the gguf package, Q/K rows un-permuted by
    transformers' own GGUF loader (its LlamaTensorProcessor), by gguf name."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    proc = LlamaTensorProcessor(config={"num_attention_heads": config.num_heads,
                                        "num_key_value_heads": config.num_kv_heads})
    out = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        a = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(tuple(reversed(t.shape.tolist())))
        if arch == "llama":
            a = proc.process(weights=a, name=t.name).weights
        out[t.name] = a
    return out


@pytest.fixture(scope="module")
def llama():
    return make_model("llama")


def load(path: Path) -> tuple[ModelConfig, GGUFCheckpoint]:
    config = ModelConfig.from_dict(gguf_config(path), str(path))
    return config, GGUFCheckpoint(path, config)


# ---- tensor types ---------------------------------------------------------------------------------

LINEARS = [("model.layers.0.self_attn.q_proj", "blk.0.attn_q.weight"),
           ("model.layers.0.self_attn.k_proj", "blk.0.attn_k.weight"),
           ("model.layers.0.self_attn.o_proj", "blk.0.attn_output.weight"),
           ("model.layers.0.mlp.down_proj", "blk.0.ffn_down.weight"),
           ("lm_head", "output.weight"), ("model.embed_tokens", "token_embd.weight")]


@pytest.mark.parametrize("qtype", QUANTIZABLE + K_QUANTS + DENSE, ids=lambda q: q.name)
def test_every_type_reads_as_gguf_dequantizes(tmp_path, llama, qtype):
    """read_linear (whole, a block of output rows, a block-aligned run of input columns) and read
    give gguf.quants.dequantize's values of the same rows and columns, to 1e-6 (in fact exactly);
    quantized types stay quantized, in the format the type maps to."""
    path = write_gguf(tmp_path / "m.gguf", llama, qtype)
    config, reader = load(path)
    ref = reference(path, config)
    for prefix, name in LINEARS:
        want = ref[name]
        rows, cols = want.shape
        unit = reader.block_unit(prefix)
        assert reader.tensor_type(prefix) == qtype.name
        assert unit == (gguf.GGML_QUANT_SIZES[qtype][0])
        step = max(unit, 32)
        cases = [(None, 0, None), (0, rows // 4, rows // 2 + 3), (1, cols - step, cols)]
        if 3 * step <= cols:
            cases.append((1, step, 3 * step))
        for dim, a, b in cases:
            got = reader.read_linear(prefix, dim, a, b)
            sl = slice(None) if dim is None else slice(a, b)
            expect = want[sl] if dim in (None, 0) else want[:, sl]
            if qtype in DENSE:
                assert isinstance(got, torch.Tensor) and got.dtype == {Q.F32: torch.float32, Q.F16: torch.float16,
                                                                       Q.BF16: torch.bfloat16}[qtype]
                dense = got.float()
            else:
                assert isinstance(got, QuantWeight) and (got.bits, got.group) == EXPECTED_FORMAT[qtype]
                dense = got.dequantize()
            np.testing.assert_allclose(dense.numpy(), expect, rtol=0, atol=1e-6, err_msg=f"{prefix} {dim} {a}-{b}")
            np.testing.assert_allclose(reader.read(f"{prefix}.weight", dim, a, b).float().numpy(), expect,
                                       rtol=0, atol=1e-6)
    dest = torch.empty(rows, cols, dtype=torch.float32)
    reader.read_into(dest, "model.embed_tokens.weight", 0, 0, rows)
    np.testing.assert_allclose(dest.numpy(), ref["token_embd.weight"], rtol=0, atol=1e-6)
    norm = reader.read("model.layers.0.input_layernorm.weight")
    assert torch.equal(norm, llama.model.layers[0].input_layernorm.weight)
    assert reader.bytes_read > 0


def test_qk_unpermute_is_exact(tmp_path, llama):
    """An F32 file written with llama.cpp's Q/K permutation reads back as the transformers
    model's own q_proj/k_proj weights, bit for bit, whole and by head ranges; and on Q8_0 rows
    (quantized row by row, so permuting rows commutes with quantizing) the un-permuted rows are
    gguf's quantization of the model's rows. Without un-permuting, the read would differ."""
    path = write_gguf(tmp_path / "f32.gguf", llama, Q.F32)
    config, reader = load(path)
    attn = llama.model.layers[0].self_attn
    for prefix, w in (("q_proj", attn.q_proj.weight), ("k_proj", attn.k_proj.weight)):
        p = f"model.layers.0.self_attn.{prefix}"
        assert torch.equal(reader.read_linear(p), w)
        hd = config.head_dim
        assert torch.equal(reader.read_linear(p, 0, hd, 2 * hd), w[hd:2 * hd])
        assert torch.equal(reader.read_linear(p, 0, 5, w.shape[0] - 3), w[5:-3])
        dest = torch.empty_like(w[hd:])
        reader.read_into(dest, f"{p}.weight", 0, hd, w.shape[0])
        assert torch.equal(dest, w[hd:])
    assert GGUFFile(path).tensors["blk.0.attn_q.weight"].shape == tuple(attn.q_proj.weight.shape)

    q8 = write_gguf(tmp_path / "q8.gguf", llama, Q.Q8_0)
    _, reader8 = load(q8)
    for prefix, w in (("q_proj", attn.q_proj.weight), ("k_proj", attn.k_proj.weight)):
        ours = reader8.read_linear(f"model.layers.0.self_attn.{prefix}").dequantize().numpy()
        theirs = dequantize(quantize(w.detach().numpy(), Q.Q8_0), Q.Q8_0)
        np.testing.assert_array_equal(ours, theirs)


def test_unpermuted_file_differs(tmp_path, llama):
    """The check above can fail: a llama file written without the permutation does not read
    back as the model's q_proj (the reader un-permutes every llama-arch file)."""
    path = write_gguf(tmp_path / "plain.gguf", llama, Q.F32, permute=False)
    _, reader = load(path)
    assert not torch.equal(reader.read_linear("model.layers.0.self_attn.q_proj"),
                           llama.model.layers[0].self_attn.q_proj.weight)


# ---- config -----------------------------------------------------------------------------------------

CONFIG_FIELDS = ("architecture", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_theta",
                 "tie_word_embeddings", "attention_bias", "sliding_window", "bos_token_id", "eos_token_ids")


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_config_matches_transformers(tmp_path, kind):
    """gguf_config -> ModelConfig equals ModelConfig of the transformers model's own config; the
    qwen2 file's Q/K biases and tied head come through, and its rows are not permuted."""
    model = make_model(kind, num_attention_heads=8, num_key_value_heads=2, rms_norm_eps=1e-6,
                       **({"rope_theta": 1e6} if kind == "qwen2" else {}))
    path = write_gguf(tmp_path / "m.gguf", model, Q.F16)
    ours = ModelConfig.from_dict(gguf_config(path), str(path))
    theirs = ModelConfig.from_dict(model.config.to_dict())
    for f in CONFIG_FIELDS:
        assert getattr(ours, f) == getattr(theirs, f), f
    assert ours.torch_dtype == "float16"
    reader = GGUFCheckpoint(path, ours)
    attn = model.model.layers[0].self_attn
    if kind == "qwen2":
        assert ours.attention_bias and ours.tie_word_embeddings
        assert torch.equal(reader.read("model.layers.0.self_attn.q_proj.bias"), attn.q_proj.bias)
        assert torch.equal(reader.read("model.layers.0.self_attn.k_proj.bias", 0, 3, 9), attn.k_proj.bias[3:9])
        # tied: the LM head is the embedding table
        assert torch.equal(reader.read_linear("lm_head"), reader.read_linear("model.embed_tokens"))
    assert torch.equal(reader.read_linear("model.layers.0.self_attn.q_proj").float(),
                       attn.q_proj.weight.half().float())
    # transformers' own GGUF config reader agrees on the shape
    hf = transformers.AutoConfig.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    assert (hf.hidden_size, hf.num_attention_heads, hf.num_key_value_heads, hf.num_hidden_layers) == \
        (ours.hidden_size, ours.num_heads, ours.num_kv_heads, ours.num_layers)


def llama3_rope_freqs(theta: float, dim: int, s: dict) -> np.ndarray:
    """The rope_freqs tensor llama.cpp's converter writes for rope_type llama3."""
    freqs = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    low_wl, high_wl = s["original_max_position_embeddings"] / s["low_freq_factor"], \
        s["original_max_position_embeddings"] / s["high_freq_factor"]
    out = []
    for f in freqs:
        wl = 2 * math.pi / f
        if wl < high_wl:
            out.append(1.0)
        elif wl > low_wl:
            out.append(s["factor"])
        else:
            smooth = (s["original_max_position_embeddings"] / wl - s["low_freq_factor"]) / (
                s["high_freq_factor"] - s["low_freq_factor"])
            out.append(1 / ((1 - smooth) / s["factor"] + smooth))
    return np.array(out, dtype=np.float32)


def test_llama3_rope_scaling_from_rope_freqs(tmp_path):
    """llama.cpp stores llama3 rope scaling as per-frequency factors (rope_freqs); the
    parameters Plexus recovers give transformers' llama3 inverse frequencies back."""
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    model = make_model("llama", rope_theta=500000.0, rope_scaling=scaling, max_position_embeddings=131072)
    hd = SIZES["hidden_size"] // SIZES["num_attention_heads"]
    path = write_gguf(tmp_path / "m.gguf", model, Q.F16,
                      extra={"rope_freqs.weight": llama3_rope_freqs(500000.0, hd, scaling)})
    ours = ModelConfig.from_dict(gguf_config(path), str(path))
    assert ours.rope_scaling is not None and ours.max_position_embeddings == 131072

    def inv_freq(rs):
        cfg = transformers.LlamaConfig(**{**SIZES, "rope_theta": 500000.0, "max_position_embeddings": 131072,
                                          "rope_scaling": rs})
        return transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(cfg).inv_freq

    r = ours.rope_scaling
    got = inv_freq({"rope_type": "llama3", "factor": r.factor, "low_freq_factor": r.low_freq_factor,
                    "high_freq_factor": r.high_freq_factor,
                    "original_max_position_embeddings": r.original_max_position_embeddings})
    torch.testing.assert_close(got, inv_freq(scaling), rtol=1e-5, atol=0)
    assert not torch.allclose(inv_freq(None), inv_freq(scaling), rtol=1e-5)  # the scaling matters


# ---- tokenizer -----------------------------------------------------------------------------------

TEXTS = ["Hello world, once upon a time", "  leading spaces", "Tim went to the park.\n\nHe saw a big dog!",
         "über café 日本語 🙂", "<s> hi </s>", "", " ", "a\tb\r\nc", "<|user|>hey<|eos|>"]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    r = run(plexus_cmd("demo-model", "--preset", "tiny", "--out", out), timeout=120)
    assert r.rc == 0, r.describe()
    return out


def tokenizer_cases():
    cases = [pytest.param("gpt2", None, True, id="bpe-add-bos"), pytest.param("gpt2", None, None, id="bpe-default")]
    if (STORIES_DIR / "tokenizer.json").is_file():
        cases += [pytest.param("llama", STORIES_DIR, None, id="spm-default"),
                  pytest.param("llama", STORIES_DIR, False, id="spm-no-bos")]
    else:
        cases.append(pytest.param("llama", None, None, id="spm",
                                  marks=pytest.mark.skip(reason=f"{STORIES_DIR} (the shared stories260K) is absent")))
    return cases


@pytest.mark.parametrize("kind,source,add_bos", tokenizer_cases())
def test_tokenizer_matches_transformers(tmp_path, demo_dir, kind, source, add_bos):
    """The tokenizer from the metadata encodes (BOS as add_bos_token says) and decodes as
    transformers' tokenizer of the same GGUF does; through plexus.engine.tokenizer.Tokenizer too."""
    from plexus.engine.tokenizer import Tokenizer

    source = source or demo_dir
    model = make_model("llama")
    path = write_gguf(tmp_path / "m.gguf", model, Q.F16, vocab=(source, kind, add_bos))
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    ours = Tokenizer(path)
    v = gguf_vocab(path)
    bos = v.bos_token_id
    for text in TEXTS:
        ids = theirs(text).input_ids
        assert ours.encode(text) == ids, text
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), text
        assert ours.encode(text, add_special_tokens=False) == theirs(text, add_special_tokens=False).input_ids
    want_bos = add_bos if add_bos is not None else kind == "llama"
    assert (ours.encode("hi")[:1] == [bos]) == want_bos
    cfg = json.loads((source / "tokenizer_config.json").read_text())
    assert ours.chat_template == cfg.get("chat_template")
    assert ours.eos_token == cfg["eos_token"] and ours.eos_token_ids == {ours.tok.token_to_id(cfg["eos_token"])}
    if kind == "gpt2" and add_bos:  # the same merges and split as the demo's own tokenizer.json
        own = Tokenizer(source)
        for text in TEXTS:
            assert ours.encode(text) == own.encode(text), text
        msgs = [{"role": "user", "content": "hi"}]
        assert ours.encode_chat(msgs) == own.encode_chat(msgs)


# ---- bad input -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def q8_file(tmp_path_factory, llama):
    return write_gguf(tmp_path_factory.mktemp("q8") / "m.gguf", llama, Q.Q8_0)


def _copy(src: Path, dst: Path, size: int | None = None, patch: tuple[int, bytes] | None = None) -> Path:
    data = bytearray(src.read_bytes()[:size])
    if patch:
        data[patch[0]:patch[0] + len(patch[1])] = patch[1]
    dst.write_bytes(bytes(data))
    return dst


def _type_field(path: Path, name: str) -> int:
    """Byte offset of tensor ``name``'s type id in the header (after name, n_dims, dims)."""
    data = path.read_bytes()
    at = data.index(name.encode()) + len(name)
    n_dims = int.from_bytes(data[at:at + 4], "little")
    return at + 4 + 8 * n_dims


def test_bad_files_fail_in_one_line(tmp_path, q8_file, llama):
    size = q8_file.stat().st_size
    cases = {
        "truncated data": (_copy(q8_file, tmp_path / "t1.gguf", size - 1000), ["t1.gguf", "output.weight", "past the end"]),
        "truncated header": (_copy(q8_file, tmp_path / "t2.gguf", 300), ["t2.gguf", "truncated"]),
        "unknown type": (_copy(q8_file, tmp_path / "t3.gguf",
                               patch=(_type_field(q8_file, "blk.0.ffn_up.weight"), (99).to_bytes(4, "little"))),
                         ["t3.gguf", "blk.0.ffn_up.weight", "unknown tensor type id 99"]),
        "not gguf": (_copy(q8_file, tmp_path / "t4.gguf", patch=(0, b"GGML")), ["t4.gguf", "not a GGUF file"]),
        "huge count": (_copy(q8_file, tmp_path / "t5.gguf", patch=(8, (2**62).to_bytes(8, "little"))), ["t5.gguf"]),
    }
    for what, (path, needles) in cases.items():
        with pytest.raises(PlexusError) as e:
            gguf_config(path)
        msg = str(e.value)
        assert "\n" not in msg and all(n in msg for n in needles), (what, msg)
    w = gguf.GGUFWriter(str(tmp_path / "falcon.gguf"), "falcon")
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(PlexusError, match=r"falcon\.gguf: unsupported GGUF architecture 'falcon'"):
        gguf_config(tmp_path / "falcon.gguf")


def test_unsupported_type_and_slices(tmp_path, q8_file, llama):
    """A used tensor in a type Plexus does not read (Q2_K), a column slice off the type's blocks,
    and two .gguf files in one directory: each one line naming the file and the tensor."""
    path = write_gguf(tmp_path / "q2.gguf", llama, Q.Q8_0, types={"blk.0.ffn_up.weight": Q.Q2_K})
    config = ModelConfig.from_dict(gguf_config(path), str(path))
    with pytest.raises(PlexusError, match=r"q2\.gguf: tensor blk\.0\.ffn_up\.weight has type Q2_K"):
        GGUFCheckpoint(path, config)
    _, reader = load(q8_file)
    with pytest.raises(PlexusError, match=r"blk\.0\.attn_output\.weight \(Q8_0\): input columns 16-64 .* 32"):
        reader.read_linear("model.layers.0.self_attn.o_proj", 1, 16, 64)
    k = write_gguf(tmp_path / "k" / "m.gguf", llama, Q.Q4_K)
    _, kreader = load(k)
    assert kreader.block_unit("model.layers.0.mlp.down_proj") == 256
    with pytest.raises(PlexusError, match="blocks of 256"):
        kreader.read_linear("model.layers.0.mlp.down_proj", 1, 32, 256)
    two = tmp_path / "two"
    two.mkdir()
    shutil.copy(q8_file, two / "a.gguf")
    shutil.copy(q8_file, two / "b.gguf")
    with pytest.raises(PlexusError, match="holds 2 .gguf files"):
        find_gguf(two)
    assert find_gguf(q8_file.parent) == q8_file and find_gguf(tmp_path / "nothing") is None


def test_cli_bad_gguf_is_one_line(tmp_path, q8_file):
    """``plexus generate --model truncated.gguf``: one error line naming the file and tensor."""
    bad = _copy(q8_file, tmp_path / "cut.gguf", q8_file.stat().st_size - 1000)
    r = run(plexus_cmd("generate", "--model", bad, "--prompt", "hi", "--max-tokens", "2"), timeout=120)
    assert_clean_error(r, "cut.gguf", "output.weight")


# ---- the model on GGUF weights ----------------------------------------------------------------------

IDS = [1, 5, 9, 200, 33, 7, 400, 12]


@pytest.mark.parametrize("kind,qtype", [("llama", Q.Q8_0), ("llama", Q.Q4_K), ("qwen2", Q.Q4_0), ("qwen2", Q.Q6_K),
                                        ("llama", Q.F16)], ids=lambda x: getattr(x, "name", x))
def test_model_logits_match_transformers(tmp_path, kind, qtype):
    """Plexus's model (world size 1) with its weights from a GGUF -- linear layers as QuantWeights,
    the LM head and embeddings included -- gives the logits transformers computes from the same
    file (``from_pretrained(gguf_file=)``, dequantized by gguf), for a prompt and one-token steps."""
    from plexus.models.llama import CausalLM
    from plexus.parallel.comm import Communicator
    from plexus.parallel.plan import ShardPlan

    model = make_model(kind)
    path = write_gguf(tmp_path / "m.gguf", model, qtype)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32)
    with torch.no_grad():
        ref = hf.eval()(torch.tensor([IDS])).logits[0].float()
    config, reader = load(path)
    m = CausalLM(config, ShardPlan.even(config, 1), Communicator.self_only(), 32, torch.float32, "cpu", quantized=True)
    with torch.no_grad():
        for module in m.modules():
            if hasattr(module, "load"):
                module.load(reader)
    m.eval()
    m.allocate_cache()
    if qtype != Q.F16:  # the table stays quantized (rows dequantized on lookup), the tied head shares it
        assert m.embed_tokens.weight is None and m.embed_tokens.qweight is not None
        assert m.lm_head.qweight is not None and (m.lm_head.qweight is m.embed_tokens.qweight) == (kind == "qwen2")
    assert m.fused is not None  # the one-token steps run in the C kernel
    with torch.inference_mode():
        full = m(torch.tensor([IDS]), 0, last_only=False)[0]
        steps = [m(torch.tensor([IDS[:4]]), 0)[0, -1]] + [m.step(IDS[p], p)[0, -1].clone() for p in range(4, len(IDS))]
    tol = 2e-5 * float(ref.abs().max())
    torch.testing.assert_close(full, ref, rtol=0, atol=tol)
    torch.testing.assert_close(torch.stack(steps), ref[3:], rtol=0, atol=tol)


@pytest.mark.parametrize("qtype,world_size,split", [(Q.Q8_0, 1, None), (Q.Q4_0, 2, None), (Q.Q4_K, 1, None),
                                                   (Q.Q8_0, 4, None), (Q.Q4_0, 2, "3,1")],
                         ids=["Q8_0-ws1", "Q4_0-ws2", "Q4_K-ws1", "Q8_0-ws4", "Q4_0-3:1"])
def test_generate_cli_matches_transformers(tmp_path, demo_dir, qtype, world_size, split):
    """``plexus generate --model file.gguf``: the tokenizer from the metadata and greedy tokens
    as transformers gives them from the same file (the layers run on the file's quantized codes)."""
    from tests.helpers import run_mpi

    model = make_model("llama")
    path = write_gguf(tmp_path / "m.gguf", model, qtype, vocab=(demo_dir, "gpt2", True))
    cmd = plexus_cmd("generate", "--model", path, "--prompt", "Once upon a time", "--max-tokens", "12", "--json",
                     "--dtype", "float32", "-v", *(["--split", split] if split else []))
    r = run(cmd, timeout=120) if world_size == 1 else run_mpi(world_size, cmd, timeout=180)
    assert r.rc == 0, r.describe()
    assert "layers quantized to GGUF" in r.stderr  # planned (and held) as quantized, not dense
    rec = r.json_lines()[0]
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    assert rec["prompt_token_ids"] == tok("Once upon a time").input_ids
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32)
    ids = torch.tensor([rec["prompt_token_ids"]])
    out = hf.eval().generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, min_new_tokens=12,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    assert rec["token_ids"] == out[0, ids.shape[1]:].tolist()


def test_tokenizer_override(tmp_path, demo_dir):
    """--tokenizer DIR replaces a GGUF file's own vocabulary: the prompt is encoded as that
    tokenizer.json encodes it (here the file's metadata adds no BOS, the directory's tokenizer
    does); one with more tokens than the model's vocabulary is refused in one line."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import WordLevel

    from plexus.engine.tokenizer import Tokenizer
    from tests.helpers import assert_clean_error

    path = write_gguf(tmp_path / "m.gguf", make_model("llama"), Q.Q8_0, vocab=(demo_dir, "gpt2", False))
    prompt = "Once upon a time"
    runs = {}
    for name, extra in (("own", []), ("override", ["--tokenizer", str(demo_dir)])):
        r = run(plexus_cmd("generate", "--model", path, "--prompt", prompt, "--max-tokens", "2", "--json", *extra),
                timeout=120)
        assert r.rc == 0, r.describe()
        runs[name] = r.json_lines()[0]["prompt_token_ids"]
    assert runs["own"] == Tokenizer(path).encode(prompt)
    assert runs["override"] == Tokenizer(demo_dir).encode(prompt)
    assert runs["override"] != runs["own"]  # the BOS the directory's tokenizer adds
    big = tmp_path / "big"
    big.mkdir()
    HFTokenizer(WordLevel({f"t{i}": i for i in range(SIZES["vocab_size"] + 1)}, unk_token="t0")).save(
        str(big / "tokenizer.json"))
    r = run(plexus_cmd("generate", "--model", path, "--prompt", prompt, "--tokenizer", str(big)), timeout=120)
    assert_clean_error(r, "--tokenizer", str(big), f"{SIZES['vocab_size'] + 1} tokens")


def test_a_k_quant_split_off_its_super_blocks_fails_before_loading(tmp_path, demo_dir):
    """K-quants come in super-blocks of 256 input columns: o_proj's 256 cannot be shared by 2 ranks."""
    from tests.helpers import assert_clean_error, run_mpi

    path = write_gguf(tmp_path / "m.gguf", make_model("llama"), Q.Q4_K, vocab=(demo_dir, "gpt2", True))
    r = run_mpi(2, plexus_cmd("generate", "--model", path, "--prompt", "hi", "--max-tokens", "4"), timeout=120)
    assert_clean_error(r, "o_proj", "2 ranks", "groups of 256")


def test_layout_for_the_planner(tmp_path, llama):
    """gguf_layout: what the planner needs from the header alone (None for a dense file)."""
    from plexus.checkpoint.gguf import gguf_layout

    assert gguf_layout(write_gguf(tmp_path / "f16.gguf", llama, Q.F16)) is None
    mixed = write_gguf(tmp_path / "mixed.gguf", llama, Q.Q4_K, types={"blk.0.ffn_down.weight": Q.Q6_K,
                                                                       "blk.0.attn_v.weight": Q.Q8_0})
    assert gguf_layout(mixed) == {"bits": 8, "group": 16, "align": 256, "types": {"Q4_K": 5, "Q6_K": 1, "Q8_0": 1},
                                  "embed": (4, 32), "head": (4, 32)}
    ends = write_gguf(tmp_path / "ends.gguf", llama, Q.Q4_0, types={"token_embd.weight": Q.Q6_K,
                                                                     "output.weight": Q.F16})
    assert gguf_layout(ends)["embed"] == (8, 16) and gguf_layout(ends)["head"] is None


@pytest.mark.parametrize("kind,qtype,types", [("llama", Q.Q4_0, {"token_embd.weight": Q.Q6_K, "output.weight": Q.F16}),
                                              ("llama", Q.Q8_0, None), ("qwen2", Q.Q4_K, None)],
                         ids=["q6k-embed-f16-head", "q8_0", "qwen2-tied-q4k"])
def test_the_plan_counts_the_bytes_a_gguf_rank_holds(tmp_path, kind, qtype, types):
    """From the header alone, the planner's weight bytes are what the loaded rank holds: layers,
    embedding table (kept quantized) and LM head as each is stored, plus prefill's dense scratch
    (the largest matrix it dequantizes: a quantized head's rows, else gate_up)."""
    from plexus.engine.engine import Engine, quant_layout
    from plexus.engine.source import load_config
    from plexus.parallel.comm import Communicator
    from plexus.parallel.pool import PoolPlan
    from plexus.bench.probes import resident_weight_bytes

    path = write_gguf(tmp_path / "m.gguf", make_model(kind), qtype, types=types)
    layout, _ = quant_layout(load_config(path), None, 128, path)
    engine = Engine.load(path, Communicator.self_only(), "float32")
    m, c = engine.model, engine.config
    head_quantized = m.lm_head.qweight is not None
    scratch = max(2 * c.intermediate_size, c.vocab_size if head_quantized else 0) * c.hidden_size * 4
    pool = PoolPlan.build(c, 1, "float32", 64, quant=layout)
    assert (m.embed_tokens.qweight is not None) == (layout.embed_bits > 0)
    assert pool.weight_bytes(0) == resident_weight_bytes(m) + scratch
