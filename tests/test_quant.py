"""--quantize int8|int4: the quantized representation, the kernel's dot products over it, the
engine on quantized layers against transformers running the same (dequantized) weights, the
same tokens at every world size, the splits on group boundaries and the planner's bytes."""

from __future__ import annotations

import ctypes
import os
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from plexus.checkpoint.quant_base import assemble_columns
from plexus.models import kernels
from plexus.quant.qweight import QuantWeight, concat_rows, quantize, widen
from tests.helpers import (assert_clean_error, hf_reference, make_hf_checkpoint, plexus_cmd, run, run_mpi)

CC = shutil.which("cc") or shutil.which("gcc")
needs_cc = pytest.mark.skipif(CC is None, reason="no C compiler on this machine to build the decode kernel")


# ---- the representation -------------------------------------------------------------------------

@pytest.mark.parametrize("bits,group", [(8, 16), (8, 128), (4, 32), (4, 128)])
@pytest.mark.parametrize("cols", [64, 172, 256])
def test_round_to_nearest_is_within_half_a_step(bits, group, cols):
    torch.manual_seed(cols + bits)
    w = torch.randn(24, cols) * torch.linspace(0.01, 3, 24).unsqueeze(1)  # rows of very different ranges
    w[3] = 0  # an all-zero row: any scale, exact zeros
    q = quantize(w, bits, group)
    codes = q.unpacked()
    assert codes.shape == w.shape and int(codes.max()) < 2 ** bits
    g = torch.arange(cols) // group
    step = q.scales[:, g]
    err = (q.dequantize() - w).abs()
    if bits == 8:  # symmetric: every weight within half a step
        assert bool((err <= step / 2 * (1 + 1e-5) + 1e-6 * w.abs() + 1e-7).all()), float((err - step / 2).max())
    else:  # an integer zero point: the group's ends may round up to a whole step, nothing more
        assert bool((err <= step * (1 + 1e-5)).all()) and float((err > step / 2 * (1 + 1e-5)).float().mean()) < 0.02
    assert bool((q.dequantize()[3] == 0).all())
    assert torch.equal(q.scales, q.scales.half().float())  # float16 scales: a checkpoint reloads exactly


@pytest.mark.parametrize("bits,group", [(8, 16), (4, 32)])
def test_any_rows_and_whole_groups_quantize_as_the_whole(bits, group):
    """What makes the model the same at every world size: a rank quantizes only its slice."""
    torch.manual_seed(1)
    w = torch.randn(40, 172)
    whole = quantize(w, bits, group)
    assert torch.equal(quantize(w[8:27], bits, group).dequantize(), whole.rows(8, 27).dequantize())
    for a, b in [(0, 2 * group), (group, 172), (2 * group, 4 * group)]:
        b = min(b, 172)
        part = quantize(w[:, a:b], bits, group)
        assert torch.equal(part.dequantize(), whole.columns(a, b).dequantize())
        assert torch.equal(part.codes, whole.columns(a, b).codes)
    with pytest.raises(Exception, match="groups"):
        whole.columns(8, 64)


def test_fused_weights_of_different_formats_widen_exactly():
    torch.manual_seed(2)
    a, b = quantize(torch.randn(8, 128), 4, 64), quantize(torch.randn(5, 128), 8, 32)
    fused = concat_rows([a, b])
    assert (fused.bits, fused.group) == (8, 32)
    assert torch.equal(fused.dequantize(), torch.cat([a.dequantize(), b.dequantize()]))
    assert torch.equal(widen(a, 8, 16).dequantize(), a.dequantize())


# ---- the kernel --------------------------------------------------------------------------------

def _build(tmp_path: Path, flags: list[str], name: str) -> ctypes.CDLL:
    out = tmp_path / f"{name}.so"
    r = subprocess.run([CC, "-O3", "-fopenmp", "-shared", "-fPIC", "-std=c11", *flags, "-o", str(out),
                        str(kernels.SOURCE), "-lm"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lib = ctypes.CDLL(str(out))
    p, f = ctypes.c_void_p, ctypes.c_long
    lib.plexus_qmatvec.argtypes = [p, p, p, f, f, p, f, f, p, p, f, f, ctypes.c_int]
    lib.plexus_dequant.argtypes = [p, p, p, f, f, p, f, f, ctypes.c_int]
    return lib


def _cpu_has(flag: str) -> bool:
    try:
        return flag in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


# the three ways decode.c is built: this machine's widest vectors, AVX2 only, and no vectors at all
VARIANTS = {"native": ["-march=native"], "avx2": ["-march=native", "-DPLEXUS_NO_AVX512"],
            "portable": ["-march=x86-64", "-mno-avx"]}


@needs_cc
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_kernel_dot_products_equal_the_dequantized_matrix(variant, tmp_path):
    if variant != "portable" and not _cpu_has("avx2"):
        pytest.skip("this CPU has no AVX2: only the portable build runs here")
    lib = _build(tmp_path, VARIANTS[variant], variant)
    torch.manual_seed(3)
    for bits, group, k in [(8, 16, 100), (8, 32, 1000), (8, 128, 4096), (8, 1000, 1000), (4, 32, 172),
                           (4, 64, 1024), (4, 128, 4096), (4, 128, 200), (4, 96, 300)]:
        n = 37
        q = quantize(torch.randn(n, k), bits, group)
        x = torch.randn(k)
        y = torch.empty(n)
        lib.plexus_qmatvec(q.codes.data_ptr(), q.scales.data_ptr(), q.mins.data_ptr(), bits, group, None, 0, 0,
                           x.data_ptr(), y.data_ptr(), n, k, 2)
        ref = (q.dequantize().double() @ x.double()).float()
        assert torch.allclose(y, ref, rtol=1e-5, atol=1e-4 * k ** 0.5), (bits, group, k, float((y - ref).abs().max()))
        out = torch.empty(n, k)
        lib.plexus_dequant(q.codes.data_ptr(), q.scales.data_ptr(), q.mins.data_ptr(), bits, group, out.data_ptr(),
                           n, k, 2)
        assert torch.equal(out, q.dequantize()), (bits, group, k)
        # act-order (GPTQ desc_act): the stored columns are a permutation of the input's
        perm = torch.randperm(k)
        permuted = QuantWeight(q.bits, q.group, q.shape, q.codes, q.scales, q.mins, perm)
        lib.plexus_qmatvec(q.codes.data_ptr(), q.scales.data_ptr(), q.mins.data_ptr(), bits, group, perm.data_ptr(),
                           k, 0, x.data_ptr(), y.data_ptr(), n, k, 2)
        ref = (permuted.dequantize().double() @ x.double()).float()
        assert torch.allclose(y, ref, rtol=1e-5, atol=1e-4 * k ** 0.5), (bits, group, k, "perm")
        # a row-parallel slice of an act-order weight: groups' runs padded with columns reading 0
        if group % 32 == 0 or bits == 8:
            full = 3 * k
            g_idx = torch.randperm(full) % -(-full // group)
            scales, zeros = torch.rand(n, -(-full // group)) + 0.1, torch.randint(0, 1 << bits, (n, -(-full // group)))
            codes = torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8)
            part = assemble_columns(codes, scales, zeros, bits, group, g_idx, k)  # input columns [k, 2k)
            assert part.stored_columns > k and (part.perm < 0).any()
            dense = scales[:, g_idx[k:2 * k]] * (codes.float() - zeros[:, g_idx[k:2 * k]])
            assert torch.allclose(part.dequantize(), dense, rtol=1e-5, atol=1e-4), (bits, group, k, "padded")
            lib.plexus_qmatvec(part.codes.data_ptr(), part.scales.data_ptr(), part.mins.data_ptr(), bits, part.group,
                               part.perm.data_ptr(), part.stored_columns, 0, x.data_ptr(), y.data_ptr(), n, k, 2)
            ref = (dense.double() @ x.double()).float()
            assert torch.allclose(y, ref, rtol=1e-5, atol=1e-4 * k ** 0.5), (bits, group, k, "padded")


@needs_cc
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_prefill_dequantizes_to_the_16_bit_values_torch_rounds_to(dtype, tmp_path):
    lib = _build(tmp_path, ["-march=native", kernels.DTYPE_FLAGS[dtype][0]], str(dtype))
    torch.manual_seed(4)
    for bits, group, k in [(8, 16, 100), (4, 32, 172), (4, 128, 1024)]:
        q = quantize(torch.randn(9, k) * 40, bits, group)
        out = torch.empty(9, k, dtype=dtype)
        lib.plexus_dequant(q.codes.data_ptr(), q.scales.data_ptr(), q.mins.data_ptr(), bits, group, out.data_ptr(),
                           9, k, 1)
        assert torch.equal(out, q.dequantize(dtype)), (bits, group, k)


# ---- the engine, against transformers running the dequantized weights ---------------------------

SIZES = dict(hidden_size=192, intermediate_size=288, num_attention_heads=6, num_key_value_heads=3, head_dim=32,
             num_hidden_layers=2, vocab_size=600)
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _dequantized_copy(src: Path, out: Path, bits: int, group: int) -> Path:
    """A copy of the checkpoint whose layer weights are replaced by what round-to-nearest makes of
    them: the model --quantize must compute, for transformers to run."""
    from safetensors.torch import load_file, save_file

    out.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, out / f.name)
    tensors = load_file(str(src / "model.safetensors"))
    for name, t in tensors.items():
        if name.startswith("model.layers.") and name.rsplit(".", 2)[-2] in LINEARS:
            tensors[name] = quantize(t, bits, group).dequantize(t.dtype)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def quant_models(tmp_path_factory, demo_tokenizer_dir):
    root = tmp_path_factory.mktemp("quant")
    model = make_hf_checkpoint("llama", root / "model", seed=7, tokenizer_from=demo_tokenizer_dir, **SIZES)
    refs = {s: _dequantized_copy(model, root / f"ref-{s}", *s) for s in [(8, 32), (4, 32)]}
    return model, refs


@pytest.fixture(scope="module")
def demo_tokenizer_dir(tmp_path_factory):
    from plexus.checkpoint.demo import write_demo_model

    return write_demo_model(tmp_path_factory.mktemp("demo") / "tiny", preset="tiny")


def _generate(n: int, model: Path, *args: str, timeout: float = 240) -> dict:
    cmd = plexus_cmd("generate", "--model", model, "--prompt", "Once upon a time there was", "--max-tokens", 16,
                     "--json", *args)
    r = run_mpi(n, cmd, timeout=timeout) if n > 1 else run(cmd, timeout=timeout)
    assert r.rc == 0, r.describe()
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("bits,scheme", [(8, "int8"), (4, "int4")])
def test_quantized_logits_match_transformers_on_the_dequantized_weights(quant_models, bits, scheme):
    from plexus.engine.engine import Engine
    from plexus.parallel.comm import Communicator
    from tests.helpers import hf_sequence_logits

    model, refs = quant_models
    ids = [3, 17, 250, 99, 4, 512, 42, 7, 300, 5]
    engine = Engine.load(model, Communicator.self_only(), "float32", quantize=scheme, quant_group=32)
    assert all(m.qweight is not None and m.qweight.bits == bits for layer in engine.model.layers
               for m in (layer.self_attn.qkv_proj, layer.mlp.down_proj))
    ref = hf_sequence_logits(refs[(bits, 32)], ids)
    with torch.inference_mode():
        prefill = engine.model(torch.tensor([ids[:4]]), 0, last_only=False)[0]  # the torch path
        steps = [engine.model.step(t, 4 + i)[0, -1].clone() for i, t in enumerate(ids[4:])]  # the kernel
    assert torch.allclose(prefill, ref[:4], atol=2e-4, rtol=1e-4), float((prefill - ref[:4]).abs().max())
    for i, s in enumerate(steps):
        assert torch.allclose(s, ref[4 + i], atol=2e-4, rtol=1e-4), (i, float((s - ref[4 + i]).abs().max()))
    # and the quantized model is not the float one: the comparison could fail
    dense = hf_sequence_logits(model, ids)
    assert float((dense - ref).abs().max()) > 1e-3


@pytest.mark.parametrize("scheme,bits", [("int4", 4), ("int8", 8)])
def test_quantized_tokens_are_the_same_at_world_sizes_1_2_3_and_uneven(quant_models, scheme, bits):
    model, refs = quant_models
    runs = {n: _generate(n, model, "--quantize", scheme, "--quant-group", "32") for n in (1, 2, 3)}
    runs["3,1"] = _generate(2, model, "--quantize", scheme, "--quant-group", "32", "--split", "3,1")
    want = hf_reference(refs[(bits, 32)], runs[1]["prompt_token_ids"], max_new_tokens=16)["tokens"]
    for n, r in runs.items():
        assert r["token_ids"] == want, n


def test_a_split_off_the_groups_fails_before_loading(quant_models, tmp_path):
    model, _ = quant_models
    broken = tmp_path / "broken"
    shutil.copytree(model, broken)
    (broken / "model.safetensors").write_bytes(b"not a checkpoint")  # an error after loading would say so
    r = run_mpi(3, plexus_cmd("generate", "--model", broken, "--prompt", "hi", "--quantize", "int4",
                              "--quant-group", "128"), timeout=120)
    assert_clean_error(r, "o_proj", "192 input columns", "3 ranks", "groups of 128")
    r = run(plexus_cmd("generate", "--model", broken, "--prompt", "hi", "--quantize", "int4", "--quant-group", "48"))
    assert_clean_error(r, "--quant-group 48", "multiple of 32")


# ---- the planner -------------------------------------------------------------------------------

def test_the_plan_counts_the_bytes_a_quantized_rank_holds(quant_models):
    from plexus.engine.engine import Engine
    from plexus.parallel.comm import Communicator
    from plexus.parallel.pool import PoolPlan
    from plexus.quant.qweight import Layout

    model, _ = quant_models
    engine = Engine.load(model, Communicator.self_only(), "float32", quantize="int4", quant_group=32)
    m = engine.model
    held = sum(p.numel() * p.element_size() for p in m.parameters())
    held += sum(x.qweight.nbytes for x in m.modules() if getattr(x, "qweight", None) is not None)
    pool = PoolPlan.build(engine.config, 1, "float32", 64, quant=Layout(4, 32))
    assert m.lm_head.qweight is None  # the head stays dense under --quantize
    scratch = 2 * SIZES["intermediate_size"] * SIZES["hidden_size"] * 4  # gate_up, dense, for prefill
    assert pool.weight_bytes(0) == held + scratch


def test_llama_70b_at_int4_plans_to_fit_three_16_gib_cards(tmp_path):
    config = {"architectures": ["LlamaForCausalLM"], "hidden_size": 8192, "intermediate_size": 28672,
              "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256,
              "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
              "torch_dtype": "bfloat16", "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(config))
    r = run(plexus_cmd("plan", "--model", tmp_path, "--ranks", "3x16GiB", "--quantize", "int4", "--json"))
    assert r.rc == 0, r.describe()
    plan = json.loads(r.stdout)
    assert plan["fits"] is True and plan["quantization"] == "int4 (groups of 128)"
    # about 4.5 bits a layer weight (codes + float32 scale and min per 128) + bf16 embeddings and head
    assert 38 * 2**30 < plan["pool_weight_bytes"] < 43 * 2**30
    r = run(plexus_cmd("plan", "--model", tmp_path, "--ranks", "3x16GiB", "--json"))
    assert json.loads(r.stdout)["fits"] is False  # the bf16 model does not


# ---- on the real stories260K: what quantizing costs, against a reference round-to-nearest --------

def _fake_quantized_copy(src: Path, out: Path, bits: int, group: int) -> Path:
    """stories260K with every layer weight round-to-nearest quantized by compressed-tensors (its own
    qparams and fake_quantize: asymmetric, integer zero point, groups along the input). A group
    that runs past the end is padded with zeros, which leaves its qparams as they are (the range
    always holds 0)."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams
    from safetensors.torch import load_file, save_file

    args = QuantizationArgs(num_bits=bits, type="int", symmetric=False, strategy="group", group_size=group)
    shutil.copytree(src, out)
    tensors = load_file(str(src / "model.safetensors"))
    for name, w in tensors.items():
        if name.startswith("model.layers.") and name.rsplit(".", 2)[-2] in LINEARS:
            rows, cols = w.shape
            padded = torch.nn.functional.pad(w.float(), (0, -cols % group))
            g = padded.view(rows, -1, group)
            scale, zero = calculate_qparams(g.amin(-1), g.amax(-1), args)
            tensors[name] = fake_quantize(padded, scale, zero, args)[:, :cols].to(w.dtype).contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def test_stories260k_perplexity_after_quantizing(stories_dir, tmp_path):
    pytest.importorskip("compressed_tensors", reason="the reference round-to-nearest (pip install compressed-tensors)")
    from plexus.checkpoint.demo import corpus_path
    from tests.test_perplexity import perplexity, reference

    text = tmp_path / "stories.txt"
    text.write_text(corpus_path().read_text()[:6000])
    base = perplexity(1, stories_dir, text)["perplexity"]
    int8 = perplexity(1, stories_dir, text, "--quantize", "int8")["perplexity"]
    int4 = perplexity(1, stories_dir, text, "--quantize", "int4", "--quant-group", "32")["perplexity"]
    ref4 = reference(_fake_quantized_copy(stories_dir, tmp_path / "rtn4", 4, 32), text.read_text(), 512)["perplexity"]
    print(f"stories260K perplexity: float32 {base:.4f}, int8 {int8:.4f}, int4 g32 {int4:.4f}, "
          f"reference RTN int4 g32 {ref4:.4f}")
    assert abs(int8 / base - 1) < 0.02
    assert int4 > base  # 4 bits cost something on a model this small
    assert int4 < ref4 * 1.01  # no more than round-to-nearest itself costs


# ---- PLEXUS_INT8_ACTIVATIONS=1: integer dot products on activations rounded to 8 bits -----------

needs_vnni = pytest.mark.skipif(not _cpu_has("avx512_vnni") or kernels.library() is None,
                                reason="the int8-activation path needs AVX-512 VNNI (and the fused kernel)")


@needs_vnni
@pytest.mark.parametrize("bits,group,k", [(4, 128, 1024), (4, 32, 1024), (8, 128, 2816), (8, 32, 96)])
def test_int8_activations_are_within_their_rounding(bits, group, k):
    """x rounded to int8 a group (dx = max|x_g| / 127): the product is off by about dx/2 per
    activation, weighted by (code - middle), so ~1% of the exact one; and it is not the exact one."""
    torch.manual_seed(bits + group + k)
    q = quantize(torch.randn(300, k), bits, group)
    x = torch.randn(k)
    exact, a8 = torch.empty(300), torch.empty(300)
    kernels.qmatvec(q, x, exact, act8=False)
    kernels.qmatvec(q, x, a8, act8=True)
    ref = q.dequantize().double() @ x.double()
    rel = float((a8.double() - ref).norm() / ref.norm())
    assert 1e-4 < rel < 0.02, rel  # rounded, and not by more than the rounding costs
    assert float((exact.double() - ref).norm() / ref.norm()) < 1e-5
    # the bound the rounding gives, row by row: sum |code - middle| * scale * dx / 2, plus float error
    middle = 128 if bits == 8 else 8
    g = torch.arange(k) // group
    dx = x.view(-1, group).abs().amax(1) / 127 if k % group == 0 else None
    if dx is not None:
        bound = ((q.unpacked().double() - middle).abs() * q.scales[:, g].double() * dx[g].double() / 2).sum(1)
        assert bool(((a8.double() - ref).abs() <= bound * 1.01 + 1e-4).all())


@needs_vnni
def test_int8_activations_decode_the_same_tokens_at_world_sizes_1_and_2(quant_models):
    model, refs = quant_models
    env = {"PLEXUS_INT8_ACTIVATIONS": "1"}
    runs = {}
    for n in (1, 2):
        cmd = plexus_cmd("generate", "--model", model, "--prompt", "Once upon a time there was", "--max-tokens", 16,
                         "--json", "--quantize", "int4", "--quant-group", "32")
        r = run_mpi(n, cmd, timeout=240, env={**os.environ, **env}) if n > 1 else run(cmd, timeout=240,
                                                                                       env={**os.environ, **env})
        assert r.rc == 0, r.describe()
        runs[n] = json.loads(r.stdout.strip().splitlines()[-1])["token_ids"]
    assert runs[1] == runs[2] and len(runs[1]) == 16
