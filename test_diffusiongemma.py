"""Tests for diffusiongemma. Run: python -m pytest -q test_diffusiongemma.py

transformers (5.23.0) is the oracle for the parity tests; they skip with a reason when it is absent.
Tests marked `slow` are skipped unless RUN_SLOW=1."""

import itertools
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import diffusiongemma as dg
import train_sudoku as ts
from diffusiongemma import Config, DiffusionGemma, DiffusionGemmaError

HERE = os.path.dirname(os.path.abspath(__file__))

try:
    from transformers import DiffusionGemmaForBlockDiffusion, DiffusionGemmaConfig
    HAVE_HF = True
except Exception:  # noqa: BLE001 - any import problem means "no oracle"
    HAVE_HF = False
needs_hf = pytest.mark.skipif(not HAVE_HF, reason="transformers>=5.23 (the test oracle) is not installed")
# minutes of compiling on a 2-core CPU, for what a faster test or a GPU test also covers; RUN_SLOW=1 runs them
slow = pytest.mark.skipif(os.environ.get("RUN_SLOW") != "1", reason="slow on a CPU; RUN_SLOW=1 runs it")


def rel_err(a, b):
    """max abs difference / max abs reference value"""
    return ((a - b).abs().max() / b.abs().max()).item()


def tiny_config(**kw):
    return Config.preset("tiny", **kw)


def randomise_(model, seed=0, std=0.08):
    """Random weights where a missing term would show: norms, router scales and both layer_scalar
    copies are drawn away from 1 (and the two layer_scalar copies differ)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif name.endswith("layer_scalar"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            else:
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
    return model


def hf_model(path, attn="eager"):
    m = DiffusionGemmaForBlockDiffusion.from_pretrained(path, dtype=torch.float32, attn_implementation=attn)
    return m.eval()


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A tiny random DiffusionGemma written by our save_pretrained."""
    path = str(tmp_path_factory.mktemp("ckpt") / "tiny")
    model = randomise_(DiffusionGemma(tiny_config()), seed=1)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def gentle_ckpt(tmp_path_factory):
    """Like tiny_ckpt with smaller matrices (std 0.02). With std 0.08 the random model is chaotic
    under self-conditioning: a 1e-6 float difference between two correct implementations grows ~4x
    per denoising step, so whole-run token equality would test luck, not correctness. At std 0.02 the
    per-step difference stays at 1e-6 and whole runs can be compared token for token."""
    path = str(tmp_path_factory.mktemp("ckpt") / "gentle")
    randomise_(DiffusionGemma(tiny_config()), seed=1, std=0.02).save_pretrained(path)
    return path


# -----------------------------------------------------------------------------
# Parity with transformers

@needs_hf
@pytest.mark.parametrize("prompt_len", [5, 20])  # inside and beyond the sliding window of 8
def test_two_denoise_steps_match_transformers(tiny_ckpt, prompt_len):
    ours = DiffusionGemma.from_pretrained(tiny_ckpt, device="cpu", dtype=torch.float32,
                                          sliding_window_mode="anchored")
    ref = hf_model(tiny_ckpt)
    g = torch.Generator().manual_seed(prompt_len)
    prompt = torch.randint(3, 500, (2, prompt_len), generator=g)
    canvas = torch.randint(0, 512, (2, 16), generator=g)
    canvas2 = torch.randint(0, 512, (2, 16), generator=g)
    with torch.no_grad():
        out = ref(input_ids=prompt, decoder_input_ids=canvas)
        out2 = ref(past_key_values=out.past_key_values, decoder_input_ids=canvas2,
                   self_conditioning_logits=out.logits / 0.7)
        cache = ours.new_cache(2)
        ours.encode(prompt, cache)
        l1 = ours.denoise(canvas, cache)
        l2 = ours.denoise(canvas2, cache, l1 / 0.7)
    assert rel_err(l1, out.logits) < 1e-4
    assert rel_err(l2, out2.logits) < 1e-4
    # the forward() contract is transformers' model(input_ids, decoder_input_ids, self_conditioning_logits)
    with torch.no_grad():
        assert rel_err(ours(prompt, canvas2, l1 / 0.7), out2.logits) < 1e-4


@needs_hf
def test_band_and_anchored_modes():
    """The two sliding-window geometries agree when the window covers context + canvas, and differ
    when it does not (so the switch is real)."""
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, 500, (1, 20), generator=g)
    canvas = torch.randint(0, 512, (1, 16), generator=g)
    logits = {}
    for window in (8, 64):
        for mode in ("band", "anchored"):
            model = randomise_(DiffusionGemma(tiny_config(sliding_window=window, sliding_window_mode=mode)), seed=5)
            with torch.no_grad():
                logits[window, mode] = model(prompt, canvas)
    assert not torch.allclose(logits[8, "band"], logits[8, "anchored"], atol=1e-3)
    assert torch.allclose(logits[64, "band"], logits[64, "anchored"], atol=1e-6)


@needs_hf
def test_band_mode_matches_transformers_flash_geometry(tiny_ckpt):
    """Band mode equals transformers run with an explicit per-query band mask |q-k| < window,
    the geometry its flash-attention path (and Google's JAX code) uses."""
    ours = DiffusionGemma.from_pretrained(tiny_ckpt, device="cpu", sliding_window_mode="band")
    ref = hf_model(tiny_ckpt, attn="sdpa")
    from transformers import DynamicCache
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(3, 500, (1, 20), generator=g)
    canvas = torch.randint(0, 512, (1, 16), generator=g)
    W, L, C = 8, 20, 16
    with torch.no_grad():
        # transformers' full-length cache (no sliding trim) + our own band masks, as 4D float masks
        cache = DynamicCache()
        ref.model.encoder(input_ids=prompt, past_key_values=cache)
        q = torch.arange(L, L + C)
        k = torch.arange(0, L + C)
        d = q[:, None] - k[None]
        band = torch.where(d.abs() < W, 0.0, float("-inf"))[None, None]
        full = torch.zeros(1, 1, C, L + C)
        out = ref(past_key_values=cache, decoder_input_ids=canvas,
                  decoder_attention_mask={"sliding_attention": band, "full_attention": full})
        assert rel_err(ours(prompt, canvas), out.logits) < 1e-4


@needs_hf
def test_commit_then_next_block_matches_transformers(tiny_ckpt):
    """Prefill, commit one block through the encoder, denoise the next block at continued positions."""
    ours = DiffusionGemma.from_pretrained(tiny_ckpt, device="cpu", sliding_window_mode="anchored")
    ref = hf_model(tiny_ckpt)
    g = torch.Generator().manual_seed(7)
    prompt = torch.randint(3, 500, (1, 6), generator=g)
    block1 = torch.randint(3, 500, (1, 16), generator=g)
    canvas = torch.randint(0, 512, (1, 16), generator=g)
    with torch.no_grad():
        out = ref(input_ids=prompt, decoder_input_ids=canvas)
        ref.model.encoder(input_ids=block1, past_key_values=out.past_key_values)  # the commit
        out2 = ref(past_key_values=out.past_key_values, decoder_input_ids=canvas)
        cache = ours.new_cache(1)
        ours.encode(prompt, cache)
        ours.encode(block1, cache)
        assert cache.length == 22
        mine = ours.denoise(canvas, cache)
    assert rel_err(mine, out2.logits) < 1e-4


@needs_hf
def test_hf_checkpoint_loads_and_ours_loads_in_hf(tmp_path):
    """transformers -> disk -> ours, and ours -> disk -> transformers, same logits."""
    hf_cfg = Config.preset("tiny").to_hf()
    ref = DiffusionGemmaForBlockDiffusion(DiffusionGemmaConfig.from_dict(hf_cfg)).eval()
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():  # randomise the norms and scales transformers initialises to ones
        for name, p in ref.named_parameters():
            if p.dim() == 1:
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
        for i, layer in enumerate(ref.model.decoder.layers):
            layer.layer_scalar.fill_(0.6 + 0.1 * i)
        for i, layer in enumerate(ref.model.encoder.language_model.layers):
            layer.layer_scalar.fill_(1.3 - 0.1 * i)
    ref.save_pretrained(tmp_path / "hf")
    ours = DiffusionGemma.from_pretrained(str(tmp_path / "hf"), sliding_window_mode="anchored", device="cpu")
    assert ours.layers[0].encoder_layer_scalar.item() == pytest.approx(1.3)
    assert ours.layers[1].layer_scalar.item() == pytest.approx(0.7)
    prompt = torch.randint(3, 500, (1, 12), generator=g)
    canvas = torch.randint(0, 512, (1, 16), generator=g)
    with torch.no_grad():
        expected = ref(input_ids=prompt, decoder_input_ids=canvas).logits
        assert rel_err(ours(prompt, canvas), expected) < 1e-4
        ours.save_pretrained(str(tmp_path / "ours"))
        back = hf_model(str(tmp_path / "ours"))
        assert rel_err(back(input_ids=prompt, decoder_input_ids=canvas).logits, expected) < 1e-4


# -----------------------------------------------------------------------------
# The model on its own

def test_grouped_experts_match_loop():
    """The grouped-GEMM fast path computes what the per-expert loop computes (fp32 and bf16)."""
    cfg = tiny_config(num_experts=8, top_k_experts=3)
    model = randomise_(DiffusionGemma(cfg), seed=2)
    experts, router = model.layers[0].experts, model.layers[0].router
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, cfg.hidden_size, generator=g)
    w, ids = router(x)
    ref = experts.forward_loop(x, w, ids)
    assert rel_err(experts.forward_grouped(x, w, ids), ref) < 1e-5
    eb = experts.to(torch.bfloat16)
    xb = x.bfloat16()
    assert rel_err(eb.forward_grouped(xb, w, ids).float(), eb.forward_loop(xb, w, ids).float()) < 2e-2
    # the whole model: same logits either way
    model.float()
    prompt = torch.randint(3, 500, (2, 9), generator=g)
    canvas = torch.randint(0, 512, (2, 16), generator=g)
    with torch.no_grad():
        a = model.set_experts_impl("loop")(prompt, canvas)
        b = model.set_experts_impl("grouped")(prompt, canvas)
    assert rel_err(b, a) < 1e-5


def test_sort_pairs_is_a_stable_sort_by_expert():
    """The counting sort behind the grouped experts: the pairs in the order of a stable sort by expert, and each
    expert's end row (experts that got no pair included)."""
    g = torch.Generator().manual_seed(0)
    for E, P in ((8, 50), (128, 2048), (4, 1)):
        expert = torch.randint(0, E // 2 + 1, (P,), generator=g) * 2 % E  # odd experts get nothing
        order, offsets = dg.sort_pairs(expert, E)
        assert torch.equal(order, torch.sort(expert, stable=True).indices)
        assert offsets.dtype == torch.int32
        assert torch.equal(offsets, torch.bincount(expert, minlength=E).cumsum(0).to(torch.int32))


try:
    import triton  # torch's CUDA wheels bring it; .ci/run installs it for its CPU interpreter
    HAVE_TRITON = True
    # Triton 3.6's interpreter hands a kernel's integer arguments to range() as numpy arrays, which numpy 2.4
    # refuses to convert; 3.7, 3.8 and 3.9 run the kernel
    TRITON_INTERPRETS = tuple(int(p) for p in triton.__version__.split(".")[:2]) >= (3, 7)
except ImportError:
    HAVE_TRITON = TRITON_INTERPRETS = False

needs_triton_interpreter = pytest.mark.skipif(
    not TRITON_INTERPRETS, reason="needs Triton >= 3.7 for its CPU interpreter (torch's CUDA wheels bring it; "
                                  ".ci/run installs 3.9.0)")


def interpreted(script):
    """Runs a kernel check in a fresh process under Triton's CPU interpreter -> the numbers it prints."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-c", script], cwd=HERE, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    return [float(line) for line in run.stdout.split()]


FEW_ROWS_CHECK = """
import torch, diffusiongemma as dg
g = torch.Generator().manual_seed(0)
E, N, K = 8, 96, 80
expert = torch.randint(0, E // 2 + 1, (300,), generator=g) * 2 % E  # odd experts get no rows
expert[:150] = 4                                                   # and expert 4 more than 2 tiles of rows
_, ends = dg.sort_pairs(expert, E)
x, w = torch.randn(300, K, generator=g), torch.randn(E, N, K, generator=g)
want = torch._grouped_mm(x, w.transpose(1, 2), offs=ends)
for blocks in ((64, 128, 64), (16, 32, 32)):  # the default tiles; tiles that split N and K unevenly
    got = dg.grouped_mm_few_rows(x, w, ends, None, None, None, *blocks)
    print(((got - want).abs().max() / want.abs().max()).item())
got = dg.grouped_mm_few_rows(x, w, ends, **dg.MANY_ROWS_TILES)  # a prefill chunk's tiles
print(((got - want).abs().max() / want.abs().max()).item())
# grouped rows read from a smaller x by index, and written out to permuted rows
x_few, rows, out_rows = x[:30], torch.randint(0, 30, (300,), generator=g), torch.randperm(300, generator=g)
want = torch.empty_like(want).index_copy(0, out_rows, torch._grouped_mm(x_few[rows], w.transpose(1, 2), offs=ends))
got = dg.grouped_mm_few_rows(x_few, w, ends, rows, out_rows)
print(((got - want).abs().max() / want.abs().max()).item())
# float8 weights with a scale per output row (Experts.to_fp8; x quantised per row), against the dequantised product
w8, scale = dg.quantize_fp8(w)
want = dg.grouped_mm_sorted(x, w8, ends, scale)
for blocks in ((64, 128, 64), (16, 32, 32)):
    got = dg.grouped_mm_few_rows(x, w8, ends, None, None, scale, *blocks)
    print(((got - want).abs().max() / want.abs().max()).item())
"""


@needs_triton_interpreter
def test_few_rows_grouped_kernel_matches_aten_in_triton_interpreter():
    """grouped_mm_few_rows, the Triton kernel of the denoising step's experts, run by Triton's CPU interpreter in
    fp32 (the interpreter's bf16 products are wrong), computes torch._grouped_mm: experts without rows, an
    expert with more rows than a tile, output and input sizes that the tiles do not divide, the tiles of a prefill
    chunk (MANY_ROWS_TILES), rows read and written by index (rows, out_rows), and float8 weights with their
    scales, against grouped_mm_sorted's dequantised reference."""
    errors = interpreted(FEW_ROWS_CHECK)
    assert len(errors) == 6 and max(errors) < 1e-5, errors


def skewed_expert_gemms():
    """The 26B experts' GEMMs on the GPU, routed with a skew (later experts get more rows), for a canvas (256
    tokens) and a prefill chunk (2,048), gate/up and down: yields x [T*8, K] bf16, w [128, N, K] fp32, ends."""
    g = torch.Generator(device="cuda").manual_seed(0)
    E, H, I = 128, 2816, 704
    for T, (N, K) in itertools.product((256, 2048), ((2 * I, H), (H, I))):
        logits = torch.randn(T, E, device="cuda", generator=g) + torch.linspace(0, 3, E, device="cuda")
        _, ends = dg.sort_pairs(logits.topk(8, -1).indices.reshape(-1), E)
        x = torch.randn(T * 8, K, device="cuda", generator=g).bfloat16()
        yield x, torch.randn(E, N, K, device="cuda", generator=g) * 0.02, ends


@pytest.mark.skipif(not (torch.cuda.is_available() and HAVE_TRITON), reason="needs a CUDA GPU and Triton")
def test_few_rows_grouped_kernel_matches_aten_on_gpu():
    """On the GPU in bf16, grouped_mm(kernel=True) (which runs grouped_mm_few_rows outside autograd, as a
    FastPath's experts do) gives torch._grouped_mm's results up to bf16 rounding, at the 26B experts' sizes with a
    skewed routing, for a canvas (its default tiles) and a prefill chunk (MANY_ROWS_TILES)."""
    for x, w, ends in skewed_expert_gemms():
        w = w.bfloat16()
        want = torch._grouped_mm(x, w.transpose(1, 2), offs=ends).float()
        with torch.no_grad():
            got = dg.grouped_mm(x, w, ends, kernel=True).float()
        assert ((got - want).norm() / want.norm()).item() < 1e-2
    model = randomise_(DiffusionGemma(tiny_config())).to("cuda", torch.bfloat16)
    assert not model.layers[0].experts.few_rows_kernel
    dg.FastPath(model, capacity=64)
    ampere = torch.cuda.get_device_capability() >= (8, 0)
    assert all(layer.experts.few_rows_kernel == ampere for layer in model.layers)



ONE_ROW_CHECK = """
import torch, diffusiongemma as dg
from test_diffusiongemma import randomise_, tiny_config
g = torch.Generator().manual_seed(0)
for N, K in ((37, 64), (50, 96), (8, 200)):  # outputs that the tiles do not divide; K a power of 2 or not
    x, w = torch.randn(1, 1, K, generator=g), torch.randn(N, K, generator=g)
    want = torch.nn.functional.linear(x, w)
    print(((dg.gemv(x, w) - want).abs().max() / want.abs().max()).item())
cfg = tiny_config(num_experts=8, top_k_experts=3, hidden_size=72, moe_intermediate_size=24)  # H, I not powers of 2
layer = randomise_(dg.DiffusionGemma(cfg), seed=2).layers[0]
experts = layer.experts
x = torch.randn(2, cfg.hidden_size, generator=g)
w, ids = layer.router(x)
want = experts.forward_loop(x, w, ids)
for tiles in (((1, 1), (1, 1)), ((2, 4), (4, 2))):
    dg.ONE_TOKEN_TILES = tiles
    print(((dg.one_token_experts(x[:1], experts.gate_up_proj, experts.down_proj, w[:1], ids[:1]) - want[:1]).abs().max()
           / want[:1].abs().max()).item())
experts.impl, experts.few_rows_kernel = "grouped", True  # as FastPath sets them: one token takes the kernels
with torch.no_grad():
    print(float(not torch.equal(experts(x[:1], w[:1], ids[:1]),
                                dg.one_token_experts(x[:1], experts.gate_up_proj, experts.down_proj, w[:1], ids[:1]))))
    print(((experts(x, w, ids) - want).abs().max() / want.abs().max()).item())  # two tokens: grouped
"""


@needs_triton_interpreter
def test_one_row_kernels_match_torch_in_triton_interpreter():
    """An AR token's Triton kernels for its linears (gemv) and its experts (one_token_experts), run by Triton's CPU
    interpreter in fp32, compute F.linear and Experts.forward_loop: outputs that the tiles do not divide, widths
    that are not powers of 2, two tile settings; Experts.forward takes the kernels for one token once FastPath has
    picked our kernels (few_rows_kernel), and the grouped path for two."""
    errors = interpreted(ONE_ROW_CHECK)
    assert len(errors) == 7 and max(errors) < 1e-5, errors


@pytest.mark.skipif(not (torch.cuda.is_available() and HAVE_TRITON), reason="needs a CUDA GPU and Triton")
def test_one_row_kernels_match_torch_on_gpu():
    """On the GPU in bf16, at the 26B shapes of an AR token: gemv gives F.linear up to bf16 rounding for q/k/v,
    o_proj and the dense MLP's widths, and compiled, linear takes it for one row; one_token_experts gives
    Experts.forward_loop's output for 8 of 128 experts."""
    g = torch.Generator(device="cuda").manual_seed(0)
    for N, K in ((8192, 2816), (9216, 2816), (2816, 8192), (4224, 2816), (2816, 2112)):
        x = torch.randn(1, 1, K, device="cuda", generator=g).bfloat16()
        w = (torch.randn(N, K, device="cuda", generator=g) * 0.02).bfloat16()
        want = torch.nn.functional.linear(x.float(), w.float())
        with torch.no_grad():
            got = dg.gemv(x, w)
            torch._dynamo.reset()
            assert torch.equal(torch.compile(dg.linear, dynamic=False)(x, w), got)
        assert ((got.float() - want).norm() / want.norm()).item() < 1e-2, (N, K)
    cfg = Config.preset("26b-a4b")
    with torch.device("cuda"), torch.no_grad():
        experts = dg.Experts(cfg).bfloat16()
        experts.gate_up_proj.normal_(0, 0.02, generator=g)
        experts.down_proj.normal_(0, 0.02, generator=g)
        x = torch.randn(1, cfg.hidden_size, device="cuda", generator=g).bfloat16()
        ids = torch.randperm(cfg.num_experts, device="cuda", generator=g)[:cfg.top_k_experts][None]
        w = torch.rand(1, cfg.top_k_experts, device="cuda", generator=g)
        want = experts.forward_loop(x, w, ids).float()
        got = dg.one_token_experts(x, experts.gate_up_proj, experts.down_proj, w, ids).float()
    assert ((got - want).norm() / want.norm()).item() < 1e-2


NORM_ROPE_CHECK = """
import torch, diffusiongemma as dg
from test_diffusiongemma import randomise_, tiny_config
model = randomise_(dg.DiffusionGemma(tiny_config()), seed=4)
cfg, g = model.cfg, torch.Generator().manual_seed(0)
for i in (0, cfg.layer_types.index(dg.FULL)):  # a sliding layer (v_proj), a full one (K=V, partial RoPE)
    attn = model.layers[i].self_attn
    fused = dg.fuse_linears(attn.projections())
    x = torch.randn(1, 1, cfg.hidden_size, generator=g)
    cos, sin = dg.rope_cos_sin(torch.tensor([[37]]), model.inv_freq("cpu")[cfg.layer_types[i]], torch.float32)
    q, k, v = attn.project(x, cos, sin)
    got = dg.norm_rope_one_token(x @ fused.T, attn.q_norm.weight, attn.k_norm.weight, cos, sin, attn.heads,
                                 attn.kv_heads, attn.eps)
    want = torch.cat([q.flatten(0, 2), k.flatten(0, 2), v.flatten(0, 2)])
    print(((got - want).abs().max() / want.abs().max()).item())
"""


@needs_triton_interpreter
def test_norm_rope_kernel_matches_project_in_triton_interpreter():
    """norm_rope_one_token, an AR token's q, k and v norms and RoPE as one Triton kernel (one program per head),
    run by Triton's CPU interpreter in fp32, gives Attention.project's q, k and v from the fused projection's
    output: a sliding layer's (its own v_proj) and a full layer's (v from k's raw output, RoPE on part of the
    head)."""
    errors = interpreted(NORM_ROPE_CHECK)
    assert len(errors) == 2 and max(errors) < 1e-5, errors


@pytest.mark.skipif(not (torch.cuda.is_available() and HAVE_TRITON), reason="needs a CUDA GPU and Triton")
def test_norm_rope_kernel_matches_project_on_gpu():
    """On the GPU in bf16 at the 26B shapes (a sliding layer: 16 q and 8 KV heads 256 wide; a full one: 2 KV heads
    512 wide, K=V, RoPE on a quarter), norm_rope_one_token gives Attention.project's eager q, k and v up to bf16
    rounding, and compiled, Attention.project takes it for one row."""
    from torch._inductor.utils import run_and_get_code
    model_cfg = Config.preset("26b-a4b")
    g = torch.Generator(device="cuda").manual_seed(0)
    with torch.device("cuda"), torch.no_grad():
        for i in (0, model_cfg.layer_types.index(dg.FULL)):
            attn = dg.Attention(model_cfg, i).bfloat16()
            for p in attn.parameters():  # weights small, norm weights away from 1
                p.copy_(torch.randn(p.shape, generator=g) * 0.02 if p.dim() == 2 else
                        0.5 + torch.rand(p.shape, generator=g))
            attn.fused = dg.fuse_linears(attn.projections())
            inv = (dg.rope_inv_freq(model_cfg.head_dim, model_cfg.rope_theta) if i == 0 else
                   dg.rope_inv_freq(model_cfg.global_head_dim, model_cfg.global_rope_theta,
                                    model_cfg.global_partial_rotary_factor))
            cos, sin = dg.rope_cos_sin(torch.tensor([[3001]]), inv, torch.bfloat16)
            x = torch.randn(1, 1, model_cfg.hidden_size, generator=g).bfloat16()
            q, k, v = attn.project(x, cos, sin)
            want = torch.cat([q.flatten(0, 2), k.flatten(0, 2), v.flatten(0, 2)]).float()
            got = dg.norm_rope_one_token(dg.linear(x, attn.fused), attn.q_norm.weight, attn.k_norm.weight, cos, sin,
                                         attn.heads, attn.kv_heads, attn.eps).float()
            assert ((got - want).norm() / want.norm()).item() < 1e-2, i
            torch._dynamo.reset()
            _, codes = run_and_get_code(torch.compile(attn.project, dynamic=False), x, cos, sin)
            assert any("norm_rope_one_token" in code for code in codes)


ROUTE_CHECK = """
import torch, diffusiongemma as dg
from test_diffusiongemma import randomise_, tiny_config
cfg = tiny_config(num_experts=12, top_k_experts=3, hidden_size=72)  # E and H not powers of 2
layer = randomise_(dg.DiffusionGemma(cfg), seed=3).layers[0]
r, g = layer.router, torch.Generator().manual_seed(0)
for tiles in ((1, 4), (2, 2), (4, 1)):  # experts and warps per program
    dg.ROUTER_TILE, dg.ROUTER_WARPS = tiles
    for t in range(2):
        x = torch.randn(1, cfg.hidden_size, generator=g) * 3
        w, ids = r(x)
        normed = layer.pre_feedforward_layernorm_2(x)
        got_w, got_ids, got_normed = dg.route_one_token(x, r.scale, r.proj.weight, r.per_expert_scale,
                                                        layer.pre_feedforward_layernorm_2.weight, r.top_k, r.eps)
        print(float(not torch.equal(got_ids, ids)), ((got_w - w).abs().max() / w.abs().max()).item(),
              ((got_normed - normed).abs().max() / normed.abs().max()).item())
"""


@needs_triton_interpreter
def test_router_kernel_matches_router_in_triton_interpreter():
    """route_one_token, an AR token's router and experts' norm as two Triton kernels (each program of the first some
    experts' logits, the second the softmax and top k), run by Triton's CPU interpreter in fp32, gives
    Router.forward's ids in order and its weights, and pre_feedforward_layernorm_2's output: expert counts and
    widths that are not powers of 2, three tile settings."""
    errors = interpreted(ROUTE_CHECK)
    assert len(errors) == 18 and max(errors) < 1e-5, errors


ROUTE_ROWS_CHECK = """
import torch, torch.nn.functional as F, diffusiongemma as dg
g = torch.Generator().manual_seed(0)
for N, E, k in ((5, 12, 3), (40, 128, 8)):  # E not a power of 2; the 26B router's shape
    logits = torch.randn(N, E, generator=g) * 2
    logits[::2, E // 2] = logits[::2, 1]  # ties, some in the top k: the lower id comes first
    logits[1::3, 3] = logits[1::3].max(1).values
    scale = torch.rand(E, generator=g) + 0.5
    probs = F.softmax(logits, dim=-1)
    top, ids = probs.sort(dim=-1, descending=True, stable=True)
    w = top[:, :k] / top[:, :k].sum(-1, keepdim=True) * scale[ids[:, :k]]
    got_w, got_ids = dg.route_rows(logits, scale, k)
    print(float(not torch.equal(got_ids, ids[:, :k])), ((got_w - w).abs().max() / w.abs().max()).item())
for block, (E, P) in ((16, (8, 50)), (4096, (128, 2048)), (512, (128, 4352)), (16, (4, 1))):
    dg.SORT_BLOCK = block  # pairs per loop step: one step, several, and a last one part full
    expert = torch.randint(0, E // 2 + 1, (P,), generator=g) * 2 % E  # odd experts get nothing
    order, ends = dg.sort_pairs_by_kernel(expert, E)
    print(float(not torch.equal(order, torch.sort(expert, stable=True).indices)),
          float(not torch.equal(ends, torch.bincount(expert, minlength=E).cumsum(0).to(torch.int32))))
"""


@needs_triton_interpreter
def test_routing_kernels_for_rows_match_in_triton_interpreter():
    """The routing of a compiled pass's rows by our kernels, run by Triton's CPU interpreter: route_rows (one
    program per row) gives the softmax's top k in the order of a stable sort (the lower id first where
    probabilities tie) and their renormalised, scaled weights; sort_pairs_by_kernel (one program per expert) the
    pairs in the order of a stable sort by expert and each expert's end row, experts without pairs included, over
    one step of its loops, several, and a last one part full."""
    errors = interpreted(ROUTE_ROWS_CHECK)
    assert len(errors) == 12 and max(errors) < 1e-6, errors


@pytest.mark.skipif(not (torch.cuda.is_available() and HAVE_TRITON), reason="needs a CUDA GPU and Triton")
def test_router_kernel_matches_router_on_gpu():
    """On the GPU at the 26B router's shape (128 experts, top 8, 2,816 wide): in fp32 route_one_token gives
    Router.forward's ids in order, its weights and the experts' norm; in bf16, whose rounded logits tie now and
    then (and the two break ties apart), the same set of experts for nearly every token; compiled, Layer.moe
    takes it for one row."""
    from torch._inductor.utils import run_and_get_code
    cfg = Config.preset("26b-a4b")
    g = torch.Generator(device="cuda").manual_seed(0)
    with torch.device("cuda"), torch.no_grad():
        layer = dg.Layer(cfg, 0)
        layer.router.proj.weight.normal_(0, 0.02, generator=g)
        for p in (layer.router.scale, layer.router.per_expert_scale, layer.pre_feedforward_layernorm_2.weight):
            p.uniform_(0.5, 1.5, generator=g)
        r, norm = layer.router, layer.pre_feedforward_layernorm_2
        x = torch.randn(100, cfg.hidden_size, device="cuda", generator=g) * 5
        for t in range(5):
            w, ids = r(x[t:t + 1])
            got_w, got_ids, got_normed = dg.route_one_token(x[t:t + 1], r.scale, r.proj.weight, r.per_expert_scale,
                                                            norm.weight, r.top_k, r.eps)
            assert torch.equal(got_ids, ids)
            assert ((got_w - w).abs().max() / w.abs().max()).item() < 1e-5
            assert ((got_normed - norm(x[t:t + 1])).abs().max()).item() < 1e-5
        layer.bfloat16()
        x, same = x.bfloat16(), 0
        for t in range(100):
            w, ids = r(x[t:t + 1])
            got_w, got_ids, got_normed = dg.route_one_token(x[t:t + 1], r.scale, r.proj.weight, r.per_expert_scale,
                                                            norm.weight, r.top_k, r.eps)
            same += torch.equal(got_ids.sort().values, ids.sort().values)
            assert ((got_normed.float() - norm(x[t:t + 1]).float()).norm() / got_normed.float().norm()) < 1e-2
        assert same >= 90, same
        layer.experts.impl, layer.experts.few_rows_kernel = "grouped", True  # as FastPath sets them
        torch._dynamo.reset()
        _, codes = run_and_get_code(torch.compile(layer.moe, dynamic=False), x[None, :1])
        assert any("route_one_token" in code for code in codes)


@pytest.mark.skipif(not (torch.cuda.is_available() and HAVE_TRITON), reason="needs a CUDA GPU and Triton")
def test_routing_kernels_for_rows_match_on_gpu():
    """On the GPU at the 26B router's shape and a canvas's 256 rows: in fp32 route_rows gives Router.forward's ids
    in order and its weights, and sort_pairs_by_kernel a stable sort's order; in bf16, whose rounded logits tie
    now and then, the same set of experts for nearly every row; compiled, Layer.moe takes both kernels for a
    canvas and leaves a prefill chunk's 2,048 rows to inductor's."""
    from torch._inductor.utils import run_and_get_code
    cfg = Config.preset("26b-a4b")
    g = torch.Generator(device="cuda").manual_seed(0)
    with torch.device("cuda"), torch.no_grad():
        layer = dg.Layer(cfg, 0)
        layer.router.proj.weight.normal_(0, 0.02, generator=g)
        for p in (layer.router.scale, layer.router.per_expert_scale):
            p.uniform_(0.5, 1.5, generator=g)
        r = layer.router
        for dtype in (torch.float32, torch.bfloat16):
            layer.to(dtype)
            x = torch.randn(256, cfg.hidden_size, device="cuda", generator=g, dtype=dtype) * 5
            w, ids = r(x)
            z = dg.rms_norm(x, None, r.eps) * r.scale * x.shape[-1] ** -0.5
            got_w, got_ids = dg.route_rows(r.proj(z), r.per_expert_scale, r.top_k)
            if dtype == torch.float32:
                assert torch.equal(got_ids, ids)
                assert ((got_w - w).abs().max() / w.abs().max()).item() < 1e-5
            else:
                same = (got_ids.sort(-1).values == ids.sort(-1).values).all(-1).float().mean().item()
                assert same >= 0.95, same
            order, ends = dg.sort_pairs_by_kernel(got_ids.reshape(-1), cfg.num_experts)
            assert torch.equal(order, torch.sort(got_ids.reshape(-1), stable=True).indices)
            assert torch.equal(ends, torch.bincount(got_ids.reshape(-1), minlength=cfg.num_experts).cumsum(0).int())
        layer.experts.impl, layer.experts.few_rows_kernel = "grouped", True  # as FastPath sets them
        for rows, ours in ((256, True), (2048, False)):
            torch._dynamo.reset()
            x = torch.randn(1, rows, cfg.hidden_size, device="cuda", generator=g, dtype=torch.bfloat16)
            _, codes = run_and_get_code(torch.compile(layer.moe, dynamic=False), x)
            assert any("route_rows" in code for code in codes) == ours
            assert any("sort_pairs_by_kernel" in code for code in codes) == ours


SOFTMAX_ROWS_CHECK = """
import torch, diffusiongemma as dg
g = torch.Generator().manual_seed(0)
B, kv, G, T, S = 2, 2, 3, 5, 300  # rows of 3 query heads share a bias row; S not a multiple of the block
scores = torch.randn(B, kv, G * T, S, generator=g) * 4
mask = torch.rand(B, 1, T, S, generator=g) < 0.7
mask[..., 0] = True                # every row sees a key
mask[1, 0, 1, :200] = False        # a row whose first blocks show no key
bias = dg.attention_bias(mask, torch.float32)
want = dg.masked_softmax(scores, bias, torch.float32)
print((dg.masked_softmax_rows(scores, bias, torch.float32, block=64) - want).abs().max().item())
"""


@needs_triton_interpreter
def test_softmax_rows_kernel_matches_masked_softmax_in_triton_interpreter():
    """masked_softmax_rows, the Triton kernel of a prefill chunk's explicit softmax, run by Triton's CPU
    interpreter in fp32, computes masked_softmax: query heads sharing a bias row, a key count that the blocks do not
    divide (so the online max and sum rescale across blocks), and a row whose first blocks show no key."""
    errors = interpreted(SOFTMAX_ROWS_CHECK)
    assert len(errors) == 1 and errors[0] < 1e-6, errors


@pytest.mark.skipif(not (torch.cuda.is_available() and HAVE_TRITON), reason="needs a CUDA GPU and Triton")
def test_prefill_attention_with_softmax_kernel_matches_explicit_on_gpu():
    """On the GPU in bf16, attend(kernel=True) for a prefill chunk of a 26B full layer (2 KV heads, 8 query heads
    each, 512 wide, 2,048 tokens against 4,096 keys, causal) runs masked_softmax_rows (its output is exactly that
    of the products around the kernel's softmax) and gives the eager softmax's attention up to bf16 rounding; the
    kernel's probabilities are the eager softmax's to a bf16 rounding step."""
    g = torch.Generator(device="cuda").manual_seed(0)
    kv, G, T, S, D = 2, 8, 2048, 4096, 512
    q = torch.randn(1, kv, G * T, D, device="cuda", generator=g).bfloat16()
    k, v = torch.randn(2, 1, kv, S, D, device="cuda", generator=g).bfloat16()
    pos = torch.arange(S - T, S, device="cuda")
    mask = (torch.arange(S, device="cuda")[None, :] <= pos[:, None])[None, None]  # [1, 1, T, S]
    bias = dg.attention_bias(mask, torch.bfloat16)
    with torch.no_grad():
        want = dg.attend(q, k, v, bias).float()
        got = dg.attend(q, k, v, bias, kernel=True).float()
        qf, kf = q.flatten(0, 1), k.flatten(0, 1)  # attend's one product: all 8 heads' scores fit under 256M
        scores = (torch.bmm(qf, kf.transpose(1, 2), out_dtype=torch.float32) if dg.BMM_FP32_OUT
                  else torch.bmm(qf.float(), kf.float().transpose(1, 2))).view(1, kv, G * T, S)
        probs = dg.masked_softmax_rows(scores, bias, torch.bfloat16)
        eager = dg.masked_softmax(scores, bias, torch.bfloat16)
        by_kernel = torch.bmm(probs.flatten(0, 1), v.flatten(0, 1)).float().view(q.shape)
    assert (probs.float() - eager.float()).abs().max().item() <= 2 ** -8
    assert torch.equal(got, by_kernel)  # the kernel's path was taken
    assert ((got - want).norm() / want.norm()).item() < 1e-2

DECODE_CHECK = """
import torch, diffusiongemma as dg
g = torch.Generator().manual_seed(0)
B, kv, R, S, D = 2, 2, 3, 150, 48  # 3 query heads per KV head; keys that the blocks do not divide; a head 48 wide
q = torch.randn(B, kv, R, D, generator=g)
cache = torch.randn(2, B, kv, S + 10, D, generator=g)  # keys and values as the static cache holds them
k, v = cache[0, :, :, :S], cache[1, :, :, :S]             # views: a head's keys contiguous, heads strided
mask = torch.rand(B, 1, 1, S, generator=g) > 0.5
mask[..., :100] = False     # no key in the first spans
mask[..., 120] = True       # every row sees a key
bias = dg.attention_bias(mask, torch.float32)
want = dg.attend(q, k, v, bias)  # the explicit matmuls
for block_n, programs in ((None, 264), (32, 1), (16, 40)):  # many spans; one; several with whole blocks each
    got = dg.attend_decode(q, k, v, bias, block_n, programs)
    print(((got - want).abs().max() / want.abs().max()).item())
"""


@needs_triton_interpreter
def test_decode_attention_kernels_match_explicit_in_triton_interpreter():
    """attend_decode, an AR token's attention as two Triton kernels (spans of keys, then their merge), run by
    Triton's CPU interpreter in fp32, computes attend's explicit attention: query heads sharing a KV head, keys and
    values read in place from a cache-like buffer, key counts that the blocks do not divide, one span or several,
    and spans in which no key is visible."""
    errors = interpreted(DECODE_CHECK)
    assert len(errors) == 3 and max(errors) < 1e-5, errors


@pytest.mark.skipif(not (torch.cuda.is_available() and HAVE_TRITON), reason="needs a CUDA GPU and Triton")
def test_decode_attention_kernels_match_explicit_on_gpu():
    """On the GPU in bf16, attend(kernel=True) (which picks attend_decode for one token) gives the explicit
    matmuls' attention up to bf16 rounding at the 26B shapes of an AR token against a static cache: sliding
    layers (8 KV heads, 2 query heads each, 256 wide, a ring of 1,280 slots and 8 tail slots) and full layers
    (2 KV heads, 8 query heads each, 512 wide, 4,608 slots, half of them empty); FastPath sets the flag."""
    g = torch.Generator(device="cuda").manual_seed(0)
    for kv, R, S, D, seen in ((8, 2, 1288, 256, 1288), (2, 8, 4616, 512, 2304)):
        q = torch.randn(1, kv, R, D, device="cuda", generator=g).bfloat16()
        cache = torch.randn(2, 1, kv, S + 248, D, device="cuda", generator=g).bfloat16()
        k, v = cache[0, :, :, :S], cache[1, :, :, :S]
        mask = torch.zeros(1, 1, 1, S, dtype=torch.bool, device="cuda")
        mask[..., :seen] = True
        mask[..., -8:] = False
        mask[..., -8] = True  # the token's own key in the tail
        bias = dg.attention_bias(mask, torch.bfloat16)
        with torch.no_grad():
            want = dg.attend(q, k, v, bias).float()
            got = dg.attend(q, k, v, bias, kernel=True).float()
        assert ((got - want).norm() / want.norm()).item() < 1e-2, (kv, D)
    model = randomise_(DiffusionGemma(tiny_config())).to("cuda", torch.bfloat16)
    assert not model.layers[0].self_attn.decode_kernel
    dg.FastPath(model, capacity=64)
    ampere = torch.cuda.get_device_capability() >= (8, 0)
    assert all(layer.self_attn.decode_kernel == ampere for layer in model.layers)


def test_explicit_attention_matches_sdpa():
    """attend's explicit matmuls (few query rows, or heads wider than 256; no autograd: the fast path) compute
    SDPA's attention, masked, at scale 1, with one mask shared by the G query heads of a KV head, also when
    the scores are split over several products (max_scores), by whole query heads or, where one head does not
    fit, by parts of a head's rows; many query rows of narrow heads (a prefill chunk) go to SDPA itself."""
    g = torch.Generator().manual_seed(0)
    G = 2
    # (query rows per head, head_dim, max_scores): explicit; explicit, one query head per product; 4 parts of a
    # head's rows (20, 20, 20, 4); SDPA; explicit for 320-wide heads despite many rows, in two products; the
    # same in parts of 1,000 rows
    for rows, D, max_scores in ((64, 32, 2 ** 28), (64, 32, 2 * 64 * 300), (64, 32, 2 * 20 * 300),
                                (4096, 32, 2 ** 28), (2100, 320, 2 * 2100 * 300), (2100, 320, 2 * 1000 * 300)):
        q, k, v = (torch.randn(1, 2, n, D, generator=g) for n in (G * rows, 300, 300))
        mask = torch.rand(1, 1, rows, 300, generator=g) > 0.3
        mask[..., 0] = True  # every row sees a key
        bias = dg.attention_bias(mask, torch.float32)
        with torch.no_grad():
            got = dg.attend(q, k, v, bias, max_scores=max_scores)
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.repeat(1, 1, G, 1), scale=1.0)
        assert rel_err(got, want) < 1e-5, (rows, D, max_scores)


def test_fused_projections_match_separate_ones(tmp_path):
    """fuse_projections: q/k(/v) and gate/up run as one GEMM each and give the same logits; the weights become
    views of the fused tensors (stored once), gradients still reach them, and a fused model saves and reloads."""
    model = randomise_(DiffusionGemma(tiny_config()), seed=3)
    g = torch.Generator().manual_seed(0)
    prompt, canvas = torch.randint(3, 500, (2, 9), generator=g), torch.randint(0, 512, (2, 16), generator=g)
    with torch.no_grad():
        before = model(prompt, canvas)
        model.fuse_projections()
        after = model(prompt, canvas)
    assert rel_err(after, before) < 1e-6
    attn, mlp = model.layers[2].self_attn, model.layers[0].mlp  # a full layer (no v_proj) and a dense MLP
    assert attn.fused.shape[0] == attn.q_proj.out_features + attn.k_proj.out_features
    assert attn.k_proj.weight.data_ptr() == attn.fused[attn.q_proj.out_features:].data_ptr()
    assert mlp.up_proj.weight.data_ptr() == mlp.fused[mlp.gate_proj.out_features:].data_ptr()
    model(prompt, canvas).square().mean().backward()  # with autograd on, the separate linears run
    assert attn.q_proj.weight.grad is not None and mlp.up_proj.weight.grad.abs().sum() > 0
    model.save_pretrained(str(tmp_path / "fused"))
    with torch.no_grad():
        reloaded = DiffusionGemma.from_pretrained(str(tmp_path / "fused"), device="cpu")
        assert torch.equal(reloaded(prompt, canvas), before)


def test_fp8_experts_approximate_bf16(tmp_path):
    """experts_to_fp8 halves the experts' bytes and stays close to the exact model (it is an approximation:
    per-row e4m3 keeps ~3 significant bits); the loop reference and saving refuse float8 experts."""
    cfg = tiny_config(num_experts=8, top_k_experts=3)
    model = randomise_(DiffusionGemma(cfg), seed=2).set_experts_impl("grouped")
    experts, router = model.layers[0].experts, model.layers[0].router
    w = experts.gate_up_proj.detach().clone()
    g = torch.Generator().manual_seed(0)
    prompt, canvas = torch.randint(3, 500, (2, 9), generator=g), torch.randint(0, 512, (2, 16), generator=g)
    x = torch.randn(50, cfg.hidden_size, generator=g)
    with torch.no_grad():
        weights, ids = router(x)
        exact, exact_out = model(prompt, canvas), experts(x, weights, ids)
        model.experts_to_fp8()
        approx, approx_out = model(prompt, canvas), experts(x, weights, ids)
    assert experts.gate_up_proj.dtype == dg.FP8 and experts.gate_up_proj.element_size() == 1
    # each weight is within half an e4m3 step (2^-3 relative, at most 448 * 2^-4 of its row's scale) of the original
    deq = experts.gate_up_proj.float() * experts.gate_up_scale[..., None]
    assert ((deq - w).abs() <= experts.gate_up_scale[..., None] * 448 / 16 + 1e-12).all()
    assert (w.abs().amax(-1) - deq.abs().amax(-1)).abs().max() < 1e-6  # each row's largest weight is exact
    # float8 operands carry ~2^-4 rounding each: one expert layer moves by a few percent (changed, so the float8
    # path ran), and after three random layers (routing may flip) the logits still agree closely
    def norm_err(a, b):
        return ((a - b).norm() / b.norm()).item()
    assert 1e-3 < norm_err(approx_out, exact_out) < 0.1
    assert norm_err(approx, exact) < 0.2
    with pytest.raises(DiffusionGemmaError, match="grouped only"):
        model.set_experts_impl("loop")
    with pytest.raises(DiffusionGemmaError, match="inference-only"):
        model.save_pretrained(tmp_path / "fp8")
    assert not os.listdir(tmp_path)  # nothing half-written


@pytest.mark.skipif(not (torch.cuda.is_available() and HAVE_TRITON
                         and torch.cuda.get_device_capability() >= (8, 9)),
                    reason="Triton's float8 e4m3 needs an sm89+ CUDA GPU")
def test_fp8_grouped_kernel_matches_reference_on_gpu():
    """On the GPU in bf16, grouped_mm(kernel=True) with float8 weights (grouped_mm_few_rows: activations quantised
    per row, float8 products) gives grouped_mm_sorted's dequantised reference up to bf16 rounding, at the 26B
    experts' sizes with a skewed routing, for a canvas (FP8_TILES) and a prefill chunk (MANY_ROWS_TILES); and a
    FastPath over float8 experts picks the kernel."""
    for x, w, ends in skewed_expert_gemms():
        w, scale = dg.quantize_fp8(w)
        want = dg.grouped_mm_sorted(x, w, ends, scale).float()
        with torch.no_grad():
            got = dg.grouped_mm(x, w, ends, scale, kernel=True).float()
        assert ((got - want).norm() / want.norm()).item() < 1e-2
    model = randomise_(DiffusionGemma(tiny_config())).to("cuda", torch.bfloat16).experts_to_fp8()
    dg.FastPath(model, capacity=64)
    assert all(layer.experts.few_rows_kernel for layer in model.layers)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="max-autotune's Triton GEMM templates need a CUDA GPU")
def test_autotuned_layers_match_eager_on_gpu(gentle_ckpt):
    """compile_layers(autotune=True) (Triton grouped-GEMM templates) on the GPU: compiled bf16 keeps fp32
    between fused ops, so it is not bit-equal to eager bf16; its logits are no further from the fp32 model's
    than the eager bf16 ones (as in test_fast_path_with_compiled_layers_matches_eager)."""
    g = torch.Generator().manual_seed(0)
    prompt, canvas = torch.randint(3, 500, (2, 9), generator=g), torch.randint(0, 512, (2, 16), generator=g)
    with torch.no_grad():
        ref = DiffusionGemma.from_pretrained(gentle_ckpt, device="cpu", dtype=torch.float32)(prompt, canvas)
        model = DiffusionGemma.from_pretrained(gentle_ckpt, device="cuda", dtype=torch.bfloat16)
        model.set_experts_impl("grouped")
        eager = model(prompt.cuda(), canvas.cuda()).cpu()
        tuned = model.compile_layers(autotune=True)(prompt.cuda(), canvas.cuda()).cpu()
    assert rel_err(tuned, ref) < 1.25 * rel_err(eager, ref)


def test_sudoku_small_rope_gives_columns_one_phase():
    """sudoku-small's RoPE base puts its second rotary frequency at exactly 2*pi/9 rad per position, so
    two cells of one column (9 positions apart) get the same rotation there."""
    cfg = Config.preset("sudoku-small")
    inv_freq = dg.rope_inv_freq(cfg.head_dim, cfg.rope_theta).double()
    assert set(cfg.layer_types) == {dg.SLIDING}
    assert abs(inv_freq[1].item() - 2 * math.pi / 9) < 1e-6
    cos, sin = dg.rope_cos_sin(torch.tensor([[83, 92]]), inv_freq, torch.float64)  # cells 0 and 9 of the canvas
    assert abs(cos[0, 0, 1] - cos[0, 1, 1]) < 1e-4 and abs(sin[0, 0, 1] - sin[0, 1, 1]) < 1e-4
    assert abs(cos[0, 0, 2] - cos[0, 1, 2]) > 0.1                                  # the other frequencies differ


def test_compiled_layers_match_eager_in_training():
    """compile_layers (the training fast path) gives the eager loss and gradients (fp32, CPU inductor)."""
    rows = [dict(puzzle=EASY, solution=GRID)] * 4
    tok = dg.Tokenizer.from_json(ts.compact_tokenizer_json())
    results = []
    for compiled in (False, True):
        cfg = Config.preset("sudoku-small", layer_types=[dg.SLIDING, dg.FULL] * 2)  # both layer types compiled
        model = DiffusionGemma(cfg).init_weights(generator=torch.Generator().manual_seed(0))
        if compiled:
            model.compile_layers()
        prompt, valid, target, g = ts.Batches(rows, tok, "compact", 81, 4, 0, "cpu").get(0)
        loss = ts.Objective(model)(prompt, valid, target, g)[0]
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert rel_err(loss_b, loss_a) < 1e-5
    flat = lambda grads: torch.cat([grads[n].flatten() for n in grads_a])  # noqa: E731
    assert rel_err(flat(grads_b), flat(grads_a)) < 1e-4  # fp32 rounding of fused kernels: ~1e-5
    largest = max(g.abs().max() for g in grads_a.values())
    for n, grad in grads_a.items():  # (the last layer's layer_scalar gets ~1e-8: the final norm absorbs it)
        if grad.abs().max() > 1e-3 * largest:
            assert rel_err(grads_b[n], grad) < 1e-4, n


def test_26b_preset_shape_and_parameter_count():
    """Built on the meta device: 25.25B text parameters and the real checkpoint's names and shapes."""
    with torch.device("meta"):
        model = DiffusionGemma(Config.preset("26b-a4b"))
    n = model.num_params()
    assert round(n / 1e9, 2) == 25.25
    shapes = {dg.hf_name(k): tuple(v.shape) for k, v in model.named_parameters()}
    assert len([k for k in shapes if k.startswith("model.decoder.")]) == 661
    assert len([k for k in shapes if k.startswith("model.encoder.")]) == 30
    expect = {
        "model.decoder.embed_tokens.weight": (262144, 2816),
        "model.decoder.norm.weight": (2816,),
        "model.decoder.layers.0.self_attn.q_proj.weight": (4096, 2816),
        "model.decoder.layers.0.self_attn.k_proj.weight": (2048, 2816),
        "model.decoder.layers.0.self_attn.v_proj.weight": (2048, 2816),
        "model.decoder.layers.0.self_attn.o_proj.weight": (2816, 4096),
        "model.decoder.layers.0.self_attn.q_norm.weight": (256,),
        "model.decoder.layers.5.self_attn.q_proj.weight": (8192, 2816),
        "model.decoder.layers.5.self_attn.k_proj.weight": (1024, 2816),
        "model.decoder.layers.5.self_attn.o_proj.weight": (2816, 8192),
        "model.decoder.layers.5.self_attn.k_norm.weight": (512,),
        "model.decoder.layers.3.mlp.gate_proj.weight": (2112, 2816),
        "model.decoder.layers.3.mlp.down_proj.weight": (2816, 2112),
        "model.decoder.layers.3.router.proj.weight": (128, 2816),
        "model.decoder.layers.3.router.scale": (2816,),
        "model.decoder.layers.3.router.per_expert_scale": (128,),
        "model.decoder.layers.3.experts.gate_up_proj": (128, 1408, 2816),
        "model.decoder.layers.3.experts.down_proj": (128, 2816, 704),
        "model.decoder.layers.3.pre_feedforward_layernorm_2.weight": (2816,),
        "model.decoder.layers.29.layer_scalar": (1,),
        "model.encoder.language_model.layers.29.layer_scalar": (1,),
        "model.decoder.self_conditioning.pre_norm.weight": (2816,),
        "model.decoder.self_conditioning.gate_proj.weight": (2112, 2816),
        "model.decoder.self_conditioning.down_proj.weight": (2816, 2112),
    }
    for k, shape in expect.items():
        assert shapes[k] == shape, k
    assert "model.decoder.layers.5.self_attn.v_proj.weight" not in shapes
    assert [i for i, t in enumerate(model.cfg.layer_types) if t == dg.FULL] == [5, 11, 17, 23, 29]


def test_config_round_trips_through_hf_dict():
    cfg = Config.preset("26b-a4b")
    back = Config.from_hf(json.loads(json.dumps(cfg.to_hf())))
    assert back == cfg


def test_bf16_embedding_scale_is_53():
    model = DiffusionGemma(Config.preset("tiny", hidden_size=2816, intermediate_size=8, moe_intermediate_size=8,
                                         vocab_size=16)).bfloat16()
    with torch.no_grad():
        model.embed_tokens.weight.fill_(1.0)
    assert model.embed(torch.tensor([[3]])).float().flatten()[0].item() == 53.0


def test_save_is_sharded_and_reloads(tmp_path):
    model = randomise_(DiffusionGemma(tiny_config()), seed=4)
    model.save_pretrained(str(tmp_path / "m"), max_shard_bytes=200_000)
    files = sorted(os.listdir(tmp_path / "m"))
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 1
    back = DiffusionGemma.from_pretrained(str(tmp_path / "m"), device="cpu")
    for (n, a), (_, b) in zip(model.named_parameters(), back.named_parameters()):
        assert torch.equal(a, b), n
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


# -----------------------------------------------------------------------------
# Bad checkpoints: one clear error each

def _copy_ckpt(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return str(dst)


def _rewrite_tensors(path, fn):
    from safetensors.torch import load_file, save_file
    f = os.path.join(path, "model.safetensors")
    tensors = load_file(f)
    fn(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


def test_bad_checkpoints(tiny_ckpt, tmp_path):
    with pytest.raises(DiffusionGemmaError, match="does not exist"):
        DiffusionGemma.from_pretrained(str(tmp_path / "nowhere"), device="cpu")

    p = _copy_ckpt(tiny_ckpt, tmp_path / "noconfig")
    os.remove(os.path.join(p, "config.json"))
    with pytest.raises(DiffusionGemmaError, match="no config.json"):
        DiffusionGemma.from_pretrained(p, device="cpu")

    p = _copy_ckpt(tiny_ckpt, tmp_path / "missing")
    _rewrite_tensors(p, lambda t: t.pop("model.decoder.layers.1.router.scale"))
    with pytest.raises(DiffusionGemmaError, match="missing .*router.scale"):
        DiffusionGemma.from_pretrained(p, device="cpu")

    p = _copy_ckpt(tiny_ckpt, tmp_path / "extra")
    _rewrite_tensors(p, lambda t: t.update({"model.decoder.layers.2.self_attn.v_proj.weight": torch.zeros(32, 64)}))
    with pytest.raises(DiffusionGemmaError, match="unexpected tensor .*layers.2.self_attn.v_proj"):
        DiffusionGemma.from_pretrained(p, device="cpu")

    p = _copy_ckpt(tiny_ckpt, tmp_path / "shape")
    _rewrite_tensors(p, lambda t: t.update({"model.decoder.norm.weight": torch.ones(65)}))
    with pytest.raises(DiffusionGemmaError, match=r"norm.weight.*shape \[65\]"):
        DiffusionGemma.from_pretrained(p, device="cpu")

    p = _copy_ckpt(tiny_ckpt, tmp_path / "mismatch")
    cfg = json.load(open(os.path.join(p, "config.json")))
    cfg["text_config"]["num_experts"] = 8
    json.dump(cfg, open(os.path.join(p, "config.json"), "w"))
    with pytest.raises(DiffusionGemmaError, match="does not match the weights"):
        DiffusionGemma.from_pretrained(p, device="cpu")

    p = _copy_ckpt(tiny_ckpt, tmp_path / "badjson")
    open(os.path.join(p, "config.json"), "w").write("{not json")
    with pytest.raises(DiffusionGemmaError, match="config.json is malformed"):
        DiffusionGemma.from_pretrained(p, device="cpu")

    p = _copy_ckpt(tiny_ckpt, tmp_path / "truncated")
    f = os.path.join(p, "model.safetensors")
    data = open(f, "rb").read()
    open(f, "wb").write(data[: len(data) // 2])
    with pytest.raises(DiffusionGemmaError, match="corrupt or truncated"):
        DiffusionGemma.from_pretrained(p, device="cpu")


def test_bad_device_and_dtype():
    with pytest.raises(DiffusionGemmaError, match="unknown device"):
        dg.resolve_device("tpu")
    with pytest.raises(DiffusionGemmaError, match="unknown dtype"):
        dg.resolve_dtype("float8")
    with pytest.raises(DiffusionGemmaError, match="unknown config preset"):
        Config.preset("huge")
    with pytest.raises(DiffusionGemmaError, match="prefill_chunk must be a positive number of tokens, not 0"):
        dg.FastPath(DiffusionGemma(tiny_config()), prefill_chunk=0)


# -----------------------------------------------------------------------------
# Generation

from diffusiongemma import GenerationConfig, entropy_bound_accept, generate, generate_ar  # noqa: E402


@needs_hf
@pytest.mark.parametrize("bound", [0.0, 0.05, 0.1, 1.0, 5.0])
def test_entropy_bound_accept_matches_transformers(bound):
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import (EntropyBoundSampler,
                                                                                EntropyBoundSamplerConfig)
    g = torch.Generator().manual_seed(int(bound * 100))
    logits = torch.randn(3, 40, 50, generator=g) * torch.rand(3, 40, 1, generator=g) * 12
    ent = dg.entropy(logits)
    ours = entropy_bound_accept(ent, bound)
    s = EntropyBoundSampler(EntropyBoundSamplerConfig(entropy_bound=max(bound, 1e-12)), 40, 50, 1)
    cur, den = torch.zeros(3, 40, dtype=torch.long), torch.ones(3, 40, dtype=torch.long)
    s.accept_canvas(cur, den, logits, 1)
    assert torch.equal(ours, s.accepted_token_mask)
    assert ours.sum(-1).min() >= 1  # at least one position per row


def test_entropy_bound_accept_rule():
    ent = torch.tensor([[0.3, 0.01, 0.05, 0.02, 2.0]])
    # sorted: 0.01, 0.02, 0.05, 0.3, 2.0; sums before: 0, .01, .03, .08, .38
    assert entropy_bound_accept(ent, 0.1).tolist() == [[True, True, True, True, False]]
    assert entropy_bound_accept(ent, 0.0).tolist() == [[False, True, False, False, False]]


@needs_hf
def test_stop_rule_matches_transformers_step_by_step():
    """Our is_stable/confidence test equals StableAndConfidentStoppingCriteria at every step, including
    the vLLM #45965 regression: the first step can never stop (history starts empty)."""
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import StableAndConfidentStoppingCriteria
    for threshold in (1, 2):
        ref = StableAndConfidentStoppingCriteria(stability_threshold=threshold, confidence_threshold=0.5)
        history = torch.full((threshold, 2, 6), -1)
        g = torch.Generator().manual_seed(threshold)
        confident_logits = torch.zeros(2, 6, 10)
        confident_logits[..., 3] = 30.0  # near-zero entropy
        argmaxes = [torch.randint(0, 3, (2, 6), generator=g)] * 4 + [torch.randint(0, 3, (2, 6), generator=g)] * 3
        for step, a in enumerate(argmaxes):
            expected = ref(a, confident_logits)
            ours = dg.is_stable(a, history) & (dg.entropy(confident_logits).mean(-1) < 0.5)
            history = dg.push_history(history, a)
            assert torch.equal(ours, expected), (threshold, step)
            if step == 0:
                assert not ours.any()


def _hf_generate(ref, prompt, **kw):
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig
    bound = kw.pop("entropy_bound")
    return ref.generate(prompt, sampler_config=EntropyBoundSamplerConfig(entropy_bound=bound), **kw)


@needs_hf
@pytest.mark.parametrize("settings", [
    dict(max_new_tokens=32, max_denoising_steps=5, entropy_bound=0.1, confidence_threshold=0.005),
    # the random model's entropy sits near log(512) = 6.238 and falls as the temperature anneals, so
    # this threshold stops rows at different steps: frozen rows must not change the others
    dict(max_new_tokens=48, max_denoising_steps=8, entropy_bound=2.0, confidence_threshold=6.2, stability_threshold=0),
])
def test_generate_matches_transformers_token_for_token(gentle_ckpt, settings):
    """Same weights, same random draws (one generator, transformers' call order): same tokens.
    transformers draws from the global RNG, so it gets torch.manual_seed(s); ours a Generator seeded s."""
    ours = DiffusionGemma.from_pretrained(gentle_ckpt, sliding_window_mode="anchored", device="cpu")
    ref = hf_model(gentle_ckpt)
    prompt = torch.randint(3, 500, (2, 7), generator=torch.Generator().manual_seed(1))
    common = dict(t_min=0.4, t_max=0.8, eos_token_id=[1, 106, 50], pad_token_id=0)
    settings = {"stability_threshold": 1, **settings}
    for seed in (1234, 7, 99):
        torch.manual_seed(seed)
        expected = _hf_generate(ref, prompt, **settings, **common)
        res = generate(ours, prompt, GenerationConfig(**settings, **common),
                       generator=torch.Generator().manual_seed(seed))
        assert torch.equal(res.tokens, expected.sequences[:, prompt.shape[1]:]), seed
        # transformers' tokens_per_forward = non-pad new tokens / the row's decoder forwards
        n_valid = (res.tokens != 0).sum(1).float()
        assert torch.allclose(n_valid / torch.tensor(res.forwards, dtype=torch.float), expected.tokens_per_forward)
        if settings["confidence_threshold"] > 1:
            assert max(res.steps) < settings["max_denoising_steps"]  # the adaptive stop fired


def test_seed_reproduces_and_differs(tiny_ckpt):
    model = DiffusionGemma.from_pretrained(tiny_ckpt, device="cpu")
    gen = GenerationConfig(max_new_tokens=32, max_denoising_steps=4)
    def run(seed):
        return generate(model, [[2, 5, 6, 7]], gen, generator=torch.Generator().manual_seed(seed)).tokens
    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))


def test_stop_tokens_pad_the_rest():
    tokens = torch.tensor([[5, 6, 106, 7, 1, 8], [5, 6, 7, 8, 9, 10], [1, 2, 3, 4, 5, 6]])
    out, stopped = dg.truncate_after_stop(tokens, [1, 106, 50], 0)
    assert out.tolist() == [[5, 6, 106, 0, 0, 0], [5, 6, 7, 8, 9, 10], [1, 0, 0, 0, 0, 0]]
    assert stopped.tolist() == [True, False, True]


def test_generation_stops_at_eos_and_pads(gentle_ckpt):
    """With a token the model emits often declared a stop token, rows end there and later blocks are pad."""
    model = DiffusionGemma.from_pretrained(gentle_ckpt, device="cpu")
    g = torch.Generator().manual_seed(0)
    first = generate(model, [[2, 9, 9]], GenerationConfig(max_new_tokens=16, max_denoising_steps=3), generator=g)
    stop = first.tokens[0, 5].item()  # a token the model emits for this prompt and seed
    gen = GenerationConfig(max_new_tokens=64, max_denoising_steps=3, eos_token_id=[stop])
    res = generate(model, [[2, 9, 9]], gen, generator=torch.Generator().manual_seed(0))
    row = res.tokens[0]
    k = (row == stop).nonzero()[0].item()
    assert k <= 5 and (row[k + 1:] == 0).all() and res.new_tokens == [k + 1]
    assert len(res.steps) == 1  # no further block after the stop


def test_left_padding_does_not_change_a_row(tiny_ckpt):
    """A short prompt batched (left padded) with a long one gets the logits it gets alone."""
    model = DiffusionGemma.from_pretrained(tiny_ckpt, device="cpu")
    short, long_ = [2, 7, 8, 9], [2] + list(range(20, 31))
    canvas = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ids, valid = dg.left_pad([short, long_], 0, "cpu")
        cache = model.new_cache(2)
        model.encode(ids, cache, valid)
        batched = model.denoise(canvas, cache)
        alone = model(torch.tensor([short]), canvas[:1])
    assert rel_err(batched[0], alone[0]) < 1e-4


def test_ar_baseline_is_greedy_decoding(tiny_ckpt):
    model = DiffusionGemma.from_pretrained(tiny_ckpt, device="cpu")
    prompt = [2, 11, 12, 13]
    res = generate_ar(model, [prompt], max_new_tokens=5, eos_token_id=[9999])
    seq = list(prompt)
    with torch.no_grad():  # recompute every step from scratch with no cache reuse
        for _ in range(5):
            cache = model.new_cache(1)
            h = model.encode(torch.tensor([seq]), cache)
            seq.append(model.head(h)[0, -1].argmax().item())
    assert res.tokens[0].tolist() == seq[len(prompt):]


def test_generation_settings_are_validated():
    with pytest.raises(DiffusionGemmaError, match="max_denoising_steps must be >= 1"):
        GenerationConfig(max_denoising_steps=0)
    with pytest.raises(DiffusionGemmaError, match="t_min"):
        GenerationConfig(t_min=0.9, t_max=0.8)


def test_prompt_longer_than_the_context_is_refused(tiny_ckpt):
    model = DiffusionGemma.from_pretrained(tiny_ckpt, device="cpu")
    with pytest.raises(DiffusionGemmaError, match="exceeds the context of 1024"):
        generate(model, [[2] * 1010], GenerationConfig(max_new_tokens=16))
    with pytest.raises(DiffusionGemmaError, match="exceeds the context of 1024"):
        generate_ar(model, [[2] * 1020], max_new_tokens=5)
    with pytest.raises(DiffusionGemmaError, match="empty prompt"):
        generate(model, [[2], []], GenerationConfig(max_new_tokens=16))


def test_prompts_go_to_the_model_device():
    """A batch of prompts, as lists or as a LongTensor on the CPU, reaches the generation device with its
    validity mask (meta stands in for a GPU here)."""
    cfg = tiny_config()
    for prompts in ([[2, 5, 6], [2, 7]], torch.tensor([[2, 5, 6], [2, 7, 8]])):
        ids, valid = dg.batch_prompts(prompts, cfg, 16, "meta")
        assert ids.device.type == valid.device.type == "meta" and ids.shape == valid.shape == (2, 3)


def test_temperature_schedule():
    assert dg.temperature(0, 48, 0.4, 0.8) == pytest.approx(0.8)
    assert dg.temperature(47, 48, 0.4, 0.8) == pytest.approx(0.4 + 0.4 / 48)


def test_sampler_draws_like_multinomial():
    """sample_logits draws exactly what torch.multinomial draws from the same generator (the plain path's
    transformers parity depends on it), whatever the row chunk; the scaled logits come back new or written
    into a given buffer (the fast path's), in bf16 as the weights' dtype rounds them."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 300, generator=g) * 4
    probs = torch.softmax(logits / 0.7, -1)
    expected = torch.multinomial(probs.view(-1, 300), 1, generator=torch.Generator().manual_seed(9))[:, 0]
    for rows, dtype, buffer in ((None, torch.float32, None), (4, torch.float32, None), (None, torch.bfloat16, None),
                                (4, torch.bfloat16, torch.zeros(3, 7, 300, dtype=torch.bfloat16))):
        sample, argmax, ent, sc = dg.sample_logits(logits, 0.7, torch.Generator().manual_seed(9), dtype, rows,
                                                   sc=buffer)
        assert torch.equal(sample.flatten(), expected)
        assert torch.equal(argmax, logits.argmax(-1)) and torch.equal(ent, dg.entropy(logits / 0.7))
        assert torch.equal(sc, (logits / 0.7).to(dtype)) and (buffer is None or sc is buffer)


SAMPLER_CHECK = """
import torch, diffusiongemma as dg
g = torch.Generator().manual_seed(3)
logits = torch.randn(40, 300, generator=g) * 6
logits[:5, 7] += 60      # nearly one-hot rows: entropies near 0
logits[5, 250:] = 40     # a row whose largest logit repeats in two chunks: the first is its argmax
q = torch.empty_like(logits).exponential_(generator=g)
inv_t = (torch.ones(()) / 0.7).item()  # the kernels scale by fp32's 1 / t, as CUDA's torch divides by a number
ref = dg.sampler_math(logits * inv_t, 1.0, q, torch.float32)
for chunk in (128, 64, 512):  # three chunks (the last ragged); five; one
    got = dg.sampler_kernels(logits, 0.7, q, torch.float32, chunk=chunk, warps=4)
    same = [torch.equal(a, b) for a, b in zip(ref[:2] + ref[3:], got[:2] + got[3:])]
    print(int(all(same)), (got[2] - ref[2]).abs().max().item())
print(ref[1][5].item(), ref[2][:5].max().item())
"""


@needs_triton_interpreter
def test_sampler_kernels_agree_with_sampler_math_in_triton_interpreter():
    """sampler_kernels (the fast path's sampler on a GPU: two Triton kernels over chunks of the vocabulary), run
    by Triton's CPU interpreter in fp32 (its bf16 casts truncate), gives sampler_math's draws, argmax and scaled
    logits exactly and its entropy to rounding (scaling as CUDA does, by 1 / t): vocabularies of one chunk,
    several, and a ragged last one."""
    *runs, (first_max, confident) = zip(*[iter(interpreted(SAMPLER_CHECK))] * 2)
    assert [same for same, _ in runs] == [1, 1, 1] and max(err for _, err in runs) < 1e-5, runs
    assert first_max == 250 and confident < 1e-3


@pytest.mark.skipif(not (torch.cuda.is_available() and HAVE_TRITON), reason="needs a CUDA GPU and Triton")
def test_sampler_kernels_agree_with_sampler_math_on_gpu():
    """On the GPU at the 26B vocabulary (262,144, 32 chunks), sampler_kernels gives sampler_math's argmax and
    bf16 scaled logits exactly, its entropy to rounding and its draws for all but the rare row whose two best
    softmax / q differ by a rounding; FastPath(sampler_kernel=True) uses it."""
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = 30 * torch.tanh(torch.randn(256, 262144, device="cuda", generator=g) * 4 / 30)  # softcapped
    logits[:32, 123] += 40  # confident rows
    q = torch.empty_like(logits).exponential_(generator=g)
    ref = dg.sampler_math(logits, 0.6, q, torch.bfloat16)
    got = dg.sampler_kernels(logits, 0.6, q, torch.bfloat16)
    assert torch.equal(got[1], ref[1]) and torch.equal(got[3], ref[3])
    assert torch.allclose(got[2], ref[2], atol=1e-4, rtol=1e-5)
    assert (got[0] == ref[0]).sum() >= 255
    model = randomise_(DiffusionGemma(tiny_config())).to("cuda")
    assert dg.FastPath(model, capacity=64, sampler_kernel=True).sampler is dg.sampler_kernels


def fast_path(model, batch_size, capacity=128):
    """A FastPath with every chunk small, so each chunked loop runs several times (and ends ragged)."""
    return dg.FastPath(model, batch_size=batch_size, capacity=capacity, prefill_chunk=7, vocab_chunk=100,
                       sampler_rows=5)


@pytest.mark.parametrize("mode", ["band", "anchored"])
def test_fast_path_logits_match_plain(tiny_ckpt, mode):
    """The static cache (sliding layers in a ring), chunked prefill, chunked head and self-conditioning
    give the plain path's logits: after the prefill of a left-padded batch longer than the window (its last chunk
    alone, or in one pass with the first step), with and without self-conditioning, and after a commit, run alone or
    in one pass with the next block's first step (commit_and_denoise), whose cache then serves the next step too.
    (The plain path runs first, so before FastPath fuses the projections: this also compares fused and separate
    GEMMs.)"""
    model = DiffusionGemma.from_pretrained(tiny_ckpt, sliding_window_mode=mode, device="cpu")
    g = torch.Generator().manual_seed(5)
    ids, valid = dg.left_pad([[2] + list(range(20, 41)), [2, 7, 8, 9]], 0, "cpu")
    canvas, block = torch.randint(0, 512, (2, 16), generator=g), torch.randint(3, 500, (2, 16), generator=g)
    with torch.no_grad():
        cache = model.new_cache(2)
        model.encode(ids, cache, valid)
        l1 = model.denoise(canvas, cache)
        l2 = model.denoise(canvas, cache, l1 / 0.7)
        model.encode(block, cache)
        l3 = model.denoise(canvas, cache, l1 / 0.7)
        l4 = model.denoise(canvas, cache)
        fast = fast_path(model, 2)
        for fused in (False, True):
            fast.start(2, ids.shape[1] + 32)
            if fused:  # the prompt's last chunk with the first step, the commit with the next block's
                assert rel_err(fast.prefill(ids, valid, canvas), l1) < 1e-5
                assert rel_err(fast.denoise(canvas, l1 / 0.7), l2) < 1e-5
                assert rel_err(fast.commit_and_denoise(block, canvas), l4) < 1e-5
            else:
                fast.prefill(ids, valid)
                assert rel_err(fast.denoise(canvas, None), l1) < 1e-5
                assert rel_err(fast.denoise(canvas, l1 / 0.7), l2) < 1e-5
                fast.commit(block)
            assert fast.cache.host_length == cache.length == ids.shape[1] + 16
            assert rel_err(fast.denoise(canvas, l1 / 0.7), l3) < 1e-5


@pytest.mark.parametrize("mode", ["band", "anchored"])
@pytest.mark.parametrize("static", [False, True])
def test_encode_and_denoise_matches_encode_then_denoise(mode, static):
    """One pass over new tokens for the cache and the next canvas (encode_and_denoise) gives the canvas the logits
    of an encoder pass followed by a denoising step, and leaves the cache as that encoder pass does (the next step's
    logits match too; the keys may differ in the last bit, from GEMMs over more rows), on both caches. The new
    tokens: a finished block (the commit) after a prompt inside and beyond the sliding window of 8, with a canvas of
    16, so that the block's first tokens drop out of the window the canvas sees; and a prompt's chunk (the prefill),
    the first or after an earlier one, shorter and longer than a canvas (on the static cache a pass that stores more
    than a canvas reads only the written slots)."""
    cfg = tiny_config(sliding_window_mode=mode)
    model = randomise_(DiffusionGemma(cfg)).eval()
    g = torch.Generator().manual_seed(1)
    for before, n in ((5, 16), (20, 16), (0, 12), (0, 20), (5, 20)):  # tokens in the cache, new tokens
        ids, new, canvas, later = (torch.randint(0, 512, (2, t), generator=g) for t in (before, n, 16, 16))

        def cache_with_ids():
            cache = dg.StaticKVCache(cfg, 2, 64, "cpu", torch.float32) if static else model.new_cache(2)
            if before:
                model.encode(ids, cache)
            return cache
        with torch.no_grad():
            apart, joint = cache_with_ids(), cache_with_ids()
            model.encode(new, apart)
            want = model.denoise(canvas, apart)
            got = model.encode_and_denoise(new, canvas, joint)
            joint.advance(torch.ones(2, n, dtype=torch.bool))
            assert rel_err(got, want) < 1e-5, (before, n)
            assert rel_err(model.denoise(later, joint), model.denoise(later, apart)) < 1e-5, (before, n)


def test_block_mask_with_flex_attention_matches_the_dense_mask():
    """block_mask turns a prefill chunk's sliding-layer mask (keys: a scrambled ring of older positions, some
    invalid, then the chunk's own) into a BlockMask with whole, partial and skipped blocks of keys, and
    attend under it (flex attention, eager here: the math it compiles on the GPU) gives attend's explicit output
    under the dense mask: query heads sharing a KV head, the scrambled key order."""
    g = torch.Generator().manual_seed(0)
    B, kv, G, T, D, ring = 1, 2, 2, 256, 16, 128
    k_pos = torch.cat([torch.randperm(ring, generator=g) + 128, torch.arange(256, 512)])
    valid = torch.ones(B, ring + T, dtype=torch.bool)
    valid[0, :20] = False
    mask = dg.attention_mask(torch.arange(256, 512), k_pos, valid, causal=True, window=256, band=False)
    blocks = dg.block_mask(mask)
    # per block of 128 queries: the ring's block partly seen (invalid keys, window), an own block whole (the second
    # query block's first), the diagonal blocks partly (causal), the first query block's future block skipped
    assert blocks.kv_num_blocks.flatten().tolist() == [2, 2] and blocks.full_kv_num_blocks.flatten().tolist() == [0, 1]
    q = torch.randn(B, kv, G * T, D, generator=g)
    k, v = torch.randn(2, B, kv, ring + T, D, generator=g)
    want = dg.attend(q, k, v, dg.attention_bias(mask, torch.float32))
    assert rel_err(dg.attend(q, k, v, blocks), want) < 1e-5


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not (torch.cuda.is_available() and HAVE_TRITON), reason="needs a CUDA GPU and Triton"))])
def test_fast_path_prefill_with_flex_attention_matches_plain(tiny_ckpt, device, fused):
    """With model.flex_rows set to its prefill chunks' lengths (FastPath sets them on a GPU, where flex attention
    runs compiled; on the CPU the test sets them, and flex runs eagerly), a prefill's full and half chunks give
    their sliding layers BlockMasks, and the first step's logits match the plain path's: a prompt of a remainder, a
    chunk of 128 and one of 256; a canvas of 16 and a window of 60 (a ring of 128 slots, so that the chunk's keys
    come in whole blocks). fused: a canvas of 128 and a window of 100 (a ring of 256), and the last chunk in one
    pass with the first step (FastPath.prefill with the canvas): 384 rows, the canvas's masks inside the
    BlockMask."""
    C, W = (128, 100) if fused else (16, 60)
    model = DiffusionGemma.from_pretrained(tiny_ckpt, sliding_window=W, canvas_length=C, device=device)
    g = torch.Generator().manual_seed(7)
    ids, valid = dg.left_pad([[2] + torch.randint(3, 500, (393,), generator=g).tolist(), [2, 7, 8]], 0, device)
    canvas = torch.randint(0, 512, (2, C), generator=g).to(device)
    with torch.no_grad():
        cache = model.new_cache(2)
        model.encode(ids, cache, valid)
        want = model.denoise(canvas, cache).cpu()
        fast = dg.FastPath(model, batch_size=2, capacity=1024, prefill_chunk=256)
        lengths = (256, 384, 256) if fused else (256, 128)  # the chunks longer than a canvas, in whole blocks
        assert model.flex_rows == (lengths if device == "cuda" else ())
        model.flex_rows = lengths
        assert [b - a for a, b in dg.prefill_chunks(ids.shape[1], 256)] == [10, 128, 256]
        fast.start(2, ids.shape[1] + C)
        for T, enc_rows in ((256, 256), (384, 256)) if fused else ((128, 128), (256, 256)):
            rope, masks = model.pass_inputs(torch.arange(T, device=device), fast.cache, torch.ones(2, T, dtype=bool,
                                            device=device), enc_rows, model.inv_freq(device), 2, torch.float32)
            assert isinstance(masks[dg.SLIDING], dg.BlockMask) and not isinstance(masks[dg.FULL], dg.BlockMask)
        if fused:
            got = fast.prefill(ids, valid, canvas)
        else:
            fast.prefill(ids, valid)
            got = fast.denoise(canvas, None)
        assert rel_err(got.cpu(), want) < 1e-5


def test_prefill_chunks():
    """A prompt's chunks: the remainder first, then at most one half chunk, then full chunks; they tile the
    prompt, and only the remainder has a length of its own."""
    for T, n, lengths in ((4096, 4096, [4096]), (3000, 4096, [952, 2048]), (7000, 4096, [856, 2048, 4096]),
                          (8192, 4096, [4096, 4096]), (2048, 4096, [2048]), (5, 4096, [5]), (22, 7, [1, 7, 7, 7]),
                          (6, 7, [3, 3]), (3, 1, [1, 1, 1])):
        chunks = dg.prefill_chunks(T, n)
        assert [b - a for a, b in chunks] == lengths
        assert chunks[0][0] == 0 and chunks[-1][1] == T and all(x[1] == y[0] for x, y in zip(chunks, chunks[1:]))


def test_fast_path_long_prefill_chunks_read_only_written_slots(tiny_ckpt):
    """Prefill chunks that store more than a canvas are eager, so their layers attend only to the slots written so
    far, not to the whole capacity or ring: the logits still match the plain path's, the keys such a chunk reads
    stop at the cache's length (a sliding layer's at whole blocks of FLEX_BLOCK, or its ring), and a first chunk
    reads no slot, so its own keys are not copied."""
    model = DiffusionGemma.from_pretrained(tiny_ckpt, sliding_window=200, device="cpu")  # a ring of 256 slots
    g = torch.Generator().manual_seed(6)
    ids, valid = dg.left_pad([[2] + list(range(20, 80)), [2] + list(range(100, 140))], 0, "cpu")
    canvas = torch.randint(0, 512, (2, 16), generator=g)
    full, sliding = (model.cfg.layer_types.index(kind) for kind in (dg.FULL, dg.SLIDING))
    with torch.no_grad():
        cache = model.new_cache(2)
        model.encode(ids, cache, valid)
        want = model.denoise(canvas, cache)
        fast = dg.FastPath(model, batch_size=2, capacity=512, prefill_chunk=20)  # 1 + 3 chunks of 20 > 16 (a canvas)
        fast.start(2, ids.shape[1] + 16)
        k = torch.zeros(2, model.cfg.num_global_key_value_heads, 20, model.cfg.global_head_dim)
        ks = torch.zeros(2, model.cfg.num_key_value_heads, 20, model.cfg.head_dim)
        # nothing cached yet: a chunk of 20 stored tokens reads nothing and copies nothing (the prefill overwrites)
        stored = torch.arange(20)
        assert fast.cache.keys_values(full, k, k, stored)[0] is k
        assert fast.cache.keys_values(sliding, ks, ks, stored)[0] is ks
        fast.prefill(ids, valid)
        assert rel_err(fast.denoise(canvas, None), want) < 1e-5
        keys, _ = fast.cache.keys_values(full, k, k, stored + 200)  # (slots no pass reads after this)
        assert keys.shape[2] == ids.shape[1] + 20 < fast.cache.capacity
        ring = fast.cache.slots[dg.SLIDING]
        assert ring == 256 and fast.cache.read_slots(dg.SLIDING, 20) == 128  # 61 written: one whole block
        assert fast.cache.read_slots(dg.SLIDING, 16) == ring  # a pass that fits the tail reads every slot
        fast.cache.host_length = 300  # more than the ring holds: all of it
        assert fast.cache.read_slots(dg.SLIDING, 20) == ring and fast.cache.read_slots(dg.FULL, 20) == 300


def fast_path_passes(ckpt, dtype, device="cpu", compiled=False, autotune=False, seeds=range(6), batch=2):
    """fp32 logits of the fast path's passes on one small batch, once per seed of the canvas, block and
    self-conditioning inputs: a denoising step without and with self-conditioning, then (after a commit) an
    AR token; then, from the prompt again, the commit in one pass with a denoising step (commit_and_denoise),
    and an AR token after it; then the prompt's last chunk in one pass with the first step (FastPath.prefill with a
    canvas). Returns the six passes' logits, each stacked over the seeds. The 18-token prompt is padded on the
    left to one chunk of 20 tokens, longer than a canvas of 16 (pad_prompt, as compiled layers do, in every variant,
    so that all compute the same sums). The
    self-conditioned step reads the same given logits in every variant, not the variant's own first step, so that
    its error is the pass's own. batch=1 keeps the first prompt only: its AR token is
    one row, whose experts compiled layers gather (Experts.forward_gathered), as in the 26B benchmark."""
    ids, valid = dg.left_pad([[2] + list(range(20, 37)), [2, 7, 8, 9]][:batch], 0, device)
    model = DiffusionGemma.from_pretrained(ckpt, dtype=dtype, device=device)
    fast = dg.FastPath(model, batch, capacity=64, prefill_chunk=20, compile_layers=compiled, autotune=autotune,
                       pad_prompt=True)
    runs = []
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        canvas, block = torch.randint(0, 512, (2, 16), generator=g), torch.randint(3, 500, (2, 16), generator=g)
        sc_logits = torch.randn(2, 16, 512, generator=g) * 4  # a previous step's temperature-scaled logits
        canvas, block, sc_logits = canvas[:batch], block[:batch], sc_logits[:batch]
        fast.start(batch, ids.shape[1] + 33)
        with torch.no_grad():
            fast.prefill(ids, valid)
            first = fast.denoise(canvas.to(device), None).float().cpu()
            second = fast.denoise(canvas.to(device), sc_logits.to(device)).float().cpu()
            fast.commit(block.to(device))
            ar = fast.ar_step(block[:, -1].to(device)).float().cpu()
            fast.start(batch, ids.shape[1] + 33)
            fast.prefill(ids, valid)
            fused = fast.commit_and_denoise(block.to(device), canvas.to(device)).float().cpu()
            fused_ar = fast.ar_step(block[:, -1].to(device)).float().cpu()
            fast.start(batch, ids.shape[1] + 33)
            prefilled = fast.prefill(ids, valid, canvas.to(device)).float().cpu()
        runs.append((first, second, ar, fused, fused_ar, prefilled))
    return [torch.stack(outs) for outs in zip(*runs)]


def token_err(a, b):
    """The median over tokens of ||a_t - b_t|| / ||b_t|| (logits [..., V]). In bf16 a few tokens of a random
    model pick other experts than in fp32, and their logits move by up to ~80%; which tokens, depends on
    every rounding. The median reads the rounding error of the rest, which a wrong kernel would move for all."""
    a, b = a.flatten(0, -2), b.flatten(0, -2)
    return ((a - b).norm(dim=-1) / b.norm(dim=-1)).median().item()


@pytest.mark.parametrize("batch", [pytest.param(2, marks=slow), 1])  # batch 2: the autotuned GPU test's too
def test_fast_path_with_compiled_layers_matches_eager(gentle_ckpt, batch):
    """FastPath(compile_layers=True) computes what the eager fast path computes, for a denoising step (with
    and without self-conditioning), a commit and an AR token (at batch 1: one row, gathered experts). The
    compiled experts need bf16, whose own rounding moves this random model's logits (bf16 eager against fp32
    eager: ~3% for most tokens, up to ~80% for a token whose experts change), so the check is that the
    compiled bf16 logits are no further from fp32 than the eager bf16 ones, token by token (token_err; CPU
    inductor here)."""
    ref, eager = (fast_path_passes(gentle_ckpt, dt, batch=batch) for dt in (torch.float32, torch.bfloat16))
    compiled = fast_path_passes(gentle_ckpt, torch.bfloat16, compiled=True, batch=batch)
    for r, e, c in zip(ref, eager, compiled):
        assert token_err(c, r) < 1.25 * token_err(e, r)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="max-autotune's Triton GEMM templates need a CUDA GPU")
def test_fast_path_autotuned_matches_eager_on_gpu(gentle_ckpt):
    """The same with FastPath(compile_layers=True, autotune=True) on the GPU, CUDA graphs included: every
    compiled GEMM (projections, o_proj, experts, the head's chunks, the self-conditioning product) may run
    as a Triton template. The eager GPU passes are held to bf16's own rounding too (a median of ~0.035 on the
    CPU), so that a fault both share (the AR step's second CUDA stream, Layer.feed_forward_overlapped) fails."""
    ref = fast_path_passes(gentle_ckpt, torch.float32)
    eager = fast_path_passes(gentle_ckpt, torch.bfloat16, "cuda")
    tuned = fast_path_passes(gentle_ckpt, torch.bfloat16, "cuda", compiled=True, autotune=True)
    for r, e, t in zip(ref, eager, tuned):
        assert token_err(e, r) < 0.1
        assert token_err(t, r) < 1.25 * token_err(e, r)


def pdl_races(code):
    """Where inductor's generated code (one compiled graph's, from run_and_get_code) leaves programmatic dependent
    launch a race: a kernel launched with it that never waits (gdc_wait), so that the kernel after it may start
    before the ones ahead of it have finished; or one that loads, before its wait, a buffer that the kernel
    launched just before it writes. A multi-kernel's launch (triton.multi_kernel: one of its kernels, picked by
    timing) counts as any of its kernels. Returns one line per race."""
    # per launched name: whether it launches with PDL, its kernel's body from its own def on (a source may define
    # helper functions before it, as a cumsum's combine), and its parameters
    pdl, bodies, params = {}, {}, {}
    for name, kernel, src in re.findall(r"^(\w+) = async_compile\.triton\('(\w+)', '''(.*?)'''", code, re.S | re.M):
        pdl[name], bodies[name] = "'launch_pdl': True" in src, src[src.index(f"def {kernel}("):]
        params[name] = re.match(r"def \w+\((.*?)\):", bodies[name], re.S).group(1).replace(" ", "").split(",")
    choices = {name: re.findall(r"\w+", kernels) for name, kernels in
               re.findall(r"^(\w+) = async_compile\.multi_kernel\('\w+', \[(.*?)\]", code, re.S | re.M)}
    alias, launches, races = {}, [], []  # launches: ([kernel, or its choices], or None for an extern one; buffers)
    def buffer(arg):
        name = re.match(r"(?:reinterpret_tensor\()?(\w+)", arg).group(1)
        while name in alias:
            name = alias[name]
        return name
    for line in code[code.index("def call("):].splitlines():
        line = line.strip()
        if m := re.fullmatch(r"(\w+) = (\w+)(?:; del \2  # reuse)?", line):
            alias[m.group(1)] = m.group(2)
        elif (m := re.fullmatch(r"(\w+)\.run\((.*)\)", line)) and (m.group(1) in bodies or m.group(1) in choices):
            args = [a for a in re.split(r",\s*(?![^()]*\))", m.group(2)) if not a.startswith("stream=")]
            launches.append((choices.get(m.group(1), [m.group(1)]), [buffer(a) for a in args]))
        elif "extern_kernels." in line or "torch.ops." in line:
            launches.append((None, [buffer(a) for a in re.findall(r"(?:out=|^)(\w+)", line)]))
    for i, (kernels, args) in enumerate(launches):
        before, written = launches[i - 1] if i else ([], [])
        if before is not None:  # an inductor kernel writes its out_ptr and in_out_ptr; one of ours, any pointer
            written = [a for k in before for p, a in zip(params[k], written) if not p.startswith("in_ptr")]
        for name in kernels or []:
            body = bodies[name]
            if not pdl[name]:
                continue
            if "gdc_wait()" not in body:
                races.append(f"{name} never waits")
                continue
            early = set(re.findall(r"tl\.load\((\w+)", body[:body.index("gdc_wait()")]))
            loaded = {a for p, a in zip(params[name], args) if p in early}
            races += [f"{name} loads {b} before it waits for {' or '.join(before or ['an extern kernel'])}, which "
                      f"writes it" for b in loaded & set(written)]
    return races


def generated_code(kernels, launches):
    """A compiled graph's code in the form inductor writes it (as run_and_get_code returns it), reduced to what
    pdl_races reads: kernels {name: body lines}, each launched with PDL (a name "multi_kernel_i:a,b" declares a
    multi-kernel of kernels a and b), and the launches in call()."""
    parts = []
    for name, body in kernels.items():
        if name.startswith("multi_kernel"):
            name, choices = name.split(":")
            parts.append(f"{name} = async_compile.multi_kernel('{name}', [\n    " + ",\n    ".join(choices.split(","))
                         + ",\n], arg_index=arg_index)")
            continue
        params = sorted(set(re.findall(r"\b(?:in|out)_ptr\d", " ".join(body))), key=lambda p: (p[0] == "o", p))
        helper = "@triton.jit\ndef _triton_helper_fn_add0(arg0_0, arg1_0):\n    return arg0_0 + arg1_0\n\n"
        parts.append(f"{name} = async_compile.triton('{name}', '''\nimport triton\n"
                     f"@triton_heuristics.pointwise(inductor_meta={{'launch_pdl': True}})\n{helper}@triton.jit\n"
                     f"def {name}({', '.join(params)}, xnumel, XBLOCK : tl.constexpr):\n    "
                     + "\n    ".join(body) + "\n''', device_str='cuda')")
    return "\n\n".join(parts) + "\n\nclass Runner:\n    def call(self, args):\n" + "".join(
        f"        {line}\n" for line in launches)


def test_pdl_race_checker_reads_multi_kernels_and_helper_functions():
    """pdl_races, the checker the GPU test below runs on every compiled graph, on code written in inductor's form:
    a kernel that loads, before its wait, what the launch just before it writes is a race also where that launch is
    a multi-kernel (triton.multi_kernel: either of its kernels may run) and where the kernel's source defines a
    helper function first (its parameters are its own def's); a multi-kernel's choice that never waits is one too.
    Waiting first, or loading only what was written two launches back, is not."""
    wait, launch = "tl.extra.cuda.gdc_wait()", "tl.extra.cuda.gdc_launch_dependents()"
    def races(c_body, b_body=(wait, "tl.store(out_ptr0, tl.load(in_ptr0))", launch)):
        kernels = {"triton_per_a": [wait, "x = tl.load(in_ptr0)", launch, "tl.store(out_ptr0, x)"],
                   "triton_red_b": list(b_body), "triton_per_b": list(b_body),
                   "multi_kernel_0:triton_red_b,triton_per_b": [], "triton_poi_c": list(c_body)}
        launches = ["buf0 = empty_strided_cuda((4, ), (1, ), torch.float32)",
                    "triton_per_a.run(arg0_1, buf0, 4, stream=stream0)",
                    "multi_kernel_0.run(buf0, buf1, 4, stream=stream0)",
                    "triton_poi_c.run(buf1, buf0, buf2, 4, stream=stream0)"]
        return pdl_races(generated_code(kernels, launches))
    early_b1 = ["x = tl.load(in_ptr0)", wait, "y = tl.load(in_ptr1)", launch, "tl.store(out_ptr0, x + y)"]
    assert races(early_b1) == ["triton_poi_c loads buf1 before it waits for triton_red_b or triton_per_b, which "
                               "writes it"]
    assert races(early_b1[1:2] + early_b1[:1] + early_b1[2:]) == []  # waits first
    early_b0 = ["y = tl.load(in_ptr1)", wait, "x = tl.load(in_ptr0)", launch, "tl.store(out_ptr0, x + y)"]
    assert races(early_b0) == []  # buf0 was written by triton_per_a, which the multi-kernel waited for
    assert races(early_b1[1:2] + early_b1[:1] + early_b1[2:],
                 b_body=("tl.store(out_ptr0, tl.load(in_ptr0))", launch)) == ["triton_red_b never waits",
                                                                              "triton_per_b never waits"]


@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)
                         and HAVE_TRITON and dg.pdl_options()),
                    reason="programmatic dependent launch needs a Hopper or later GPU, Triton and inductor's option")
def test_fast_path_with_dependent_launch_matches_eager_on_gpu(gentle_ckpt):
    """FastPath(compile_layers=True) on a Hopper GPU at batch 1, CUDA graphs included: inductor's kernels
    and the AR token's attention kernels (attend_decode) launch with programmatic dependent launch (pdl_options,
    pdl_launch), so each may start before the one ahead of it has finished. A kernel that read too early would
    read a stale buffer, rarely: so the generated code of every compiled graph must leave no race (pdl_races; the
    kernel after an in-place scatter of inductor's own did, see invert_permutation), and the logits must stay as
    close to fp32 as the eager GPU passes' (see the test above)."""
    from torch._inductor.utils import run_and_get_code
    assert dg.pdl_launch(torch.device("cuda"))
    ref = fast_path_passes(gentle_ckpt, torch.float32, batch=1)
    eager = fast_path_passes(gentle_ckpt, torch.bfloat16, "cuda", batch=1)
    with torch._inductor.config.patch(fx_graph_cache=False):  # a cached graph's code is not shown
        compiled, codes = run_and_get_code(fast_path_passes, gentle_ckpt, torch.bfloat16, "cuda", compiled=True,
                                           batch=1)
    assert len(codes) > 5 and sum("gdc_wait()" in c for c in codes) > 5
    assert [race for code in codes for race in pdl_races(code)] == []
    for r, e, c in zip(ref, eager, compiled):
        assert token_err(e, r) < 0.1
        assert token_err(c, r) < 1.25 * token_err(e, r)


def test_fast_path_pads_the_prompt_to_whole_chunks(gentle_ckpt):
    """FastPath(pad_prompt=True), the default with compiled layers, pads a prompt on the left with invalid tokens
    to whole chunks (prompt_length), so that no chunk is a remainder (which compiled layers would run eagerly):
    the cache holds the padded length, the first step runs in the last chunk, and generate and generate_ar give
    the plain path's tokens (the shifted positions change only roundings)."""
    model = DiffusionGemma.from_pretrained(gentle_ckpt, device="cpu")
    prompts = [[2] + list(range(20, 39)), [2, 7, 8, 9]]  # 20 tokens: 21 in chunks of 3, 6, 6, 6
    fast = dg.FastPath(model, 2, capacity=20 + 48, prefill_chunk=6, vocab_chunk=100, pad_prompt=True)
    assert [fast.prompt_length(T) for T in (1, 3, 20, 21)] == [3, 3, 21, 21] and fast.fuses_prefill(20)
    assert dg.FastPath(model, 2, prefill_chunk=6).prompt_length(20) == 20  # eager layers: no padding
    gen = GenerationConfig(max_new_tokens=48, max_denoising_steps=5, confidence_threshold=0)
    plain = generate(model.set_experts_impl("loop"), prompts, gen, generator=torch.Generator().manual_seed(5))
    quick = generate(model, prompts, gen, generator=torch.Generator().manual_seed(5), fast=fast)
    assert fast.cache.host_length == 21 + 32 and quick.first_step_in_prefill  # 2 blocks committed, the 3rd not
    assert torch.equal(plain.tokens, quick.tokens)
    plain = generate_ar(model.set_experts_impl("loop"), prompts, max_new_tokens=20, eos_token_id=[9999])
    quick = generate_ar(model, prompts, max_new_tokens=20, eos_token_id=[9999], fast=fast)
    assert torch.equal(plain.tokens, quick.tokens)


@pytest.mark.parametrize("settings", [
    dict(max_new_tokens=48, max_denoising_steps=5, confidence_threshold=0),  # fixed steps: no host syncs
    dict(max_new_tokens=48, max_denoising_steps=8, entropy_bound=2.0, confidence_threshold=6.2, stability_threshold=0),
    dict(max_new_tokens=40, max_denoising_steps=4),
])
def test_fast_path_generates_the_plain_tokens(gentle_ckpt, settings):
    """generate and generate_ar give the same tokens on the fast path as on the plain one: a left-padded
    batch, a prompt beyond the sliding window, three blocks (the first block's first step in the prompt's last
    chunk and two commits in the next block's first step, or all apart), adaptive stopping on and off."""
    model = DiffusionGemma.from_pretrained(gentle_ckpt, device="cpu")
    prompts = [[2] + list(range(20, 39)), [2, 7, 8, 9]]
    gen = GenerationConfig(**settings)
    fast = fast_path(model, 2)
    assert fast.fuses_prefill(20) and not fast.fuses_prefill(2)  # chunks of 7: [3, 3, 7, 7]; a remainder of 2
    for seed, fused in ((3, True), (4, False)):  # the first steps in the passes before them, or apart
        fast.fuse_commit = fast.fuse_prefill = fused
        plain = generate(model.set_experts_impl("loop"), prompts, gen, generator=torch.Generator().manual_seed(seed))
        quick = generate(model, prompts, gen, generator=torch.Generator().manual_seed(seed), fast=fast)
        assert torch.equal(plain.tokens, quick.tokens), seed
        assert plain.steps == quick.steps and plain.forwards == quick.forwards
        assert quick.first_step_in_prefill == fused and not plain.first_step_in_prefill
    plain = generate_ar(model.set_experts_impl("loop"), prompts, max_new_tokens=20, eos_token_id=[9999])
    quick = generate_ar(model, prompts, max_new_tokens=20, eos_token_id=[9999], fast=fast)
    assert torch.equal(plain.tokens, quick.tokens)
    # every row stops early: the fast loop asks only every 16 tokens, and cuts what it made after
    stops = [plain.tokens[0, 3].item(), plain.tokens[1, 5].item()]
    plain = generate_ar(model.set_experts_impl("loop"), prompts, max_new_tokens=20, eos_token_id=stops)
    quick = generate_ar(model, prompts, max_new_tokens=20, eos_token_id=stops, fast=fast)
    assert plain.tokens.shape[1] <= 6
    assert torch.equal(plain.tokens, quick.tokens) and plain.new_tokens == quick.new_tokens
    assert plain.forwards == quick.forwards


def test_static_cache_pads_a_pass_own_keys_to_8_slots():
    """A pass attends to its own keys padded to a multiple of 8 tail slots where the tail has room (aligned
    rows for cuBLAS), the padding masked; a pass as long as an unaligned canvas is not padded."""
    cache = dg.StaticKVCache(tiny_config(), 1, 64, "cpu", torch.float32)  # canvas (the tail) of 16
    assert [cache.padded(T) for T in (1, 7, 8, 9, 16, 30)] == [8, 8, 8, 16, 16, 30]
    pos, valid = cache.own_keys(torch.arange(5, 8), torch.ones(1, 3, dtype=torch.bool))
    assert pos.tolist() == [5, 6, 7] + [cache.EMPTY] * 5 and valid.tolist() == [[True] * 3 + [False] * 5]
    assert dg.StaticKVCache(tiny_config(canvas_length=81), 1, 64, "cpu", torch.float32).padded(81) == 81


def test_compiled_step_inputs_match_eager_and_compile_once():
    """compile_layers compiles a fast-path step's RoPE tables and attention biases (step_inputs): for the three
    recorded passes (a canvas denoised and committed, an AR token), on a left-padded batch whose cache wraps the
    sliding ring, they equal pass_inputs' eager ones, and later steps reuse the compiled code as the cache grows
    (its length is a device tensor)."""
    cfg = tiny_config()
    model = DiffusionGemma(cfg).compile_layers()
    cache = dg.StaticKVCache(cfg, 2, 128, "cpu", torch.float32)
    C = cfg.canvas_length

    def check():
        for T, enc_rows in ((C, 0), (C, C), (1, 1), (2 * C, C)):
            args = cache.positions(T, "cpu"), torch.ones(2, T, dtype=torch.bool), enc_rows, model.inv_freq("cpu")
            (rope, masks), (rope_c, masks_c) = (f(args[0], cache, *args[1:], 2, torch.bfloat16)
                                                for f in (model.pass_inputs, model.step_inputs))
            for kind in masks:
                assert torch.equal(masks_c[kind], masks[kind]) and bool((masks[kind] == 0).any()), (T, enc_rows)
                for a, b in zip(rope_c[kind], rope[kind]):
                    torch.testing.assert_close(a, b, rtol=0, atol=2 ** -7)

    prompt = torch.ones(2, 60, dtype=torch.bool)
    prompt[1, :45] = False  # the second row left-padded
    cache.advance(prompt)
    check()
    cache.advance(torch.ones(2, C, dtype=torch.bool))  # a committed block: the sliding ring (64 slots) wraps
    assert cache.host_length > cache.slots[dg.SLIDING]
    with torch.compiler.set_stance("fail_on_recompile"):
        check()


def test_fast_path_checks_its_sizes(tiny_ckpt):
    model = DiffusionGemma.from_pretrained(tiny_ckpt, device="cpu")
    fast = fast_path(model, 1, capacity=64)
    with pytest.raises(DiffusionGemmaError, match="batch size 1, not 2"):
        generate(model, [[2, 3], [2, 4]], GenerationConfig(max_new_tokens=16), fast=fast)
    with pytest.raises(DiffusionGemmaError, match="do not fit"):
        generate(model, [[2] * 40], GenerationConfig(max_new_tokens=32), fast=fast)
    with pytest.raises(DiffusionGemmaError, match="compiled layers need bf16 weights"):
        dg.FastPath(model, 1, capacity=64, compile_layers=True)  # the model is fp32


# -----------------------------------------------------------------------------
# Tokenizer and sample.py

SPECIALS = {0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>", 4: "<mask>", 50: "<|tool_response>",
            100: "<|channel>", 101: "<channel|>", 105: "<|turn>", 106: "<turn|>"}


@pytest.fixture(scope="module")
def text_ckpt(tmp_path_factory):
    """A tiny checkpoint with a real tokenizer.json (character level, Gemma's special ids)."""
    import string
    path = str(tmp_path_factory.mktemp("ckpt") / "text")
    model = randomise_(DiffusionGemma(tiny_config()), seed=1, std=0.02)
    dg.save_checkpoint(model, path, extra_files={
        "tokenizer.json": dg.Tokenizer.char_level_json(string.printable, SPECIALS, 512)})
    return path


def test_tokenizer_round_trip_and_chat_format(text_ckpt):
    tok = dg.Tokenizer.from_pretrained(text_ckpt)
    text = "Why is the sky blue?\nTell me."
    assert tok.decode(tok.encode(text)) == text
    ids = tok.encode_prompt(text, chat=True)
    assert ids[:2] == [2, 105] and ids[-1] == 101  # <bos><|turn> ... <|channel>thought\n<channel|>
    assert tok.decode(ids, strip_thoughts=False).endswith("model\nthought\n")
    assert tok.decode(ids) == "user\n" + text + "\nmodel\n"
    assert tok.encode_prompt("hi", chat=False) == [2] + tok.encode("hi")


def run_sample(*args):
    return subprocess.run([sys.executable, os.path.join(HERE, "sample.py"), *args], capture_output=True, text=True,
                          timeout=300, cwd=HERE)


def test_sample_py_end_to_end(text_ckpt):
    base = ["--checkpoint", text_ckpt, "--prompt", "The capital of France is", "--no-chat", "--device", "cpu",
            "--max-new-tokens", "32", "--steps", "6"]
    a, b, c = run_sample(*base, "--seed", "1"), run_sample(*base, "--seed", "1"), run_sample(*base, "--seed", "2")
    assert a.returncode == 0, a.stderr
    assert "tok/s" in a.stdout and "steps/block" in a.stdout and "tokens/forward" in a.stdout
    assert a.stdout.splitlines()[:-1] == b.stdout.splitlines()[:-1]  # same text (the stats line has timings)
    assert a.stdout.splitlines()[:-1] != c.stdout.splitlines()[:-1]
    shown = run_sample(*base, "--seed", "1", "--show")
    assert shown.returncode == 0 and "block 1 step 6" in shown.stdout and "\x1b[" in shown.stdout
    ar = run_sample(*base, "--mode", "ar")
    assert ar.returncode == 0 and "tok/s" in ar.stdout, ar.stderr
    batch = run_sample(*base, "--batch", "3")
    assert batch.returncode == 0, batch.stderr
    fp8 = run_sample(*base, "--seed", "1", "--fp8")  # float8 experts (the CPU reference math)
    assert fp8.returncode == 0 and "tok/s" in fp8.stdout, fp8.stderr
    assert fp8.stdout.splitlines()[:-1] != a.stdout.splitlines()[:-1]  # they ran: the approximation moves the text


def assert_one_error_line(r, message):
    """A command line that failed the way users should see it: exit status != 0, one stderr line
    'error: ...' that contains message, no traceback."""
    assert r.returncode != 0, r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], r.stderr


@pytest.mark.parametrize("args,message", [
    (["--prompt", ""], "empty prompt"),
    (["--prompt", "x" * 1100], "does not fit the context"),
    (["--prompt", "hi", "--device", "tpu"], "unknown device"),
    (["--prompt", "hi", "--dtype", "int3"], "unknown dtype"),
    (["--prompt", "hi", "--steps", "0"], "max_denoising_steps must be >= 1"),
    (["--prompt", "hi", "--compile-layers"], "add --fast"),
    (["--prompt", "hi", "--autotune"], "add --compile-layers"),
    (["--prompt", "hi", "--fast", "--compile-layers"], "compiled layers need bf16 weights"),
    (["--prompt", "hi", "--batch", "0"], "--batch must be >= 1"),
    (["--prompt", "hi", "--repeat", "0"], "--repeat must be >= 1"),
    (["--prompt", "hi", "--no-fast", "--compile-layers"], "drop --no-fast"),
    (["--prompt-file", "/no/such/prompt.txt"], "prompt file '/no/such/prompt.txt' does not exist"),
])
def test_sample_py_bad_input(text_ckpt, args, message):
    r = run_sample("--checkpoint", text_ckpt, "--device", "cpu", *args)
    assert_one_error_line(r, message)


def test_sample_py_missing_checkpoint(tmp_path):
    r = run_sample("--checkpoint", str(tmp_path / "none"), "--prompt", "hi", "--device", "cpu")
    assert_one_error_line(r, "does not exist")


# -----------------------------------------------------------------------------
# Sudoku data: generation, validation, solving, grading (train_sudoku.py)

import numpy as np  # noqa: E402

EASY = "003020600900305001001806400008102900700000008006708200002609500800203009005010300"
HARD = "8..........36......7..9.2...5...7.......457.....1...3...1....68..85...1..9....4.."
HARD_SOLUTION = "812753649943682175675491283154237896369845721287169534521974368438526917796318452"
# needs locked candidates: singles stall, the ladder finishes it without guessing
INTERMEDIATE = "562400001008010000000036020000900300005170008310804500000050100090300050150600040"
GRID = "534678912672195348198342567859761423426853791713924856961537284287419635345286179"


def _solution_count(puzzle):
    return len(ts.solve(puzzle, limit=2)[0])


def _check_rows(rows, clues):
    for row in rows:
        p, s = row["puzzle"], row["solution"]
        assert len(p) == 81 and set(p) <= set("0123456789")
        assert ts.solve(p, limit=2)[0] == [s]            # exactly one solution, and it is the stored one
        assert ts.is_valid_solution(s, p)
        assert row["clues"] == sum(ch != "0" for ch in p)
        if clues is not None:
            assert row["clues"] == clues
        assert row["grade"] == ts.grade(p)
    assert len({row["puzzle"] for row in rows}) == len(rows)


# ----------------------------------------------------------------------------- parsing

def test_parse_accepts_dots_zeros_and_comments():
    dots = EASY.replace("0", ".")
    assert ts.parse_puzzle(EASY) == EASY
    assert ts.parse_puzzle(dots) == EASY
    assert ts.parse_puzzle(f"  {dots}   # from Project Euler 96\n") == EASY
    assert ts.parse_puzzle(dots + "\tsolution follows 123") == EASY
    assert ts.parse_puzzle(f"{EASY},{EASY}\r\n") == EASY  # a "puzzle,solution" CSV row


def test_puzzle_files_skip_only_a_header_line(tmp_path):
    f = tmp_path / "p.csv"
    f.write_text(f"puzzle,solution\n{EASY},{EASY}\n")
    assert ts.read_puzzle_file(str(f)) == [EASY]
    f.write_text("." * 81 + "\n" + EASY + "\n")  # no digits, but a (blank) grid: read, not skipped
    assert ts.read_puzzle_file(str(f)) == ["0" * 81, EASY]


@pytest.mark.parametrize("line, message", [
    (EASY[:80], "puzzle has 80 cells, expected 81"),
    (EASY + "1", "puzzle has 82 cells, expected 81"),
    ("", "puzzle has 0 cells, expected 81"),
    (EASY[:11] + "x" + EASY[12:], "bad character 'x' at cell 12"),
    (EASY[:5] + "-" + EASY[6:], "bad character '-' at cell 6"),
    ("55" + "0" * 79, "contradictory clues: digit 5 twice in row 1"),
    ("7" + "0" * 26 + "7" + "0" * 53, "contradictory clues: digit 7 twice in column 1"),
    ("9" + "0" * 9 + "9" + "0" * 70, "contradictory clues: digit 9 twice in box 1"),
    ("0" * 60 + "3" + "0" * 19 + "3", "contradictory clues: digit 3 twice in box 9"),
])
def test_parse_rejects_bad_input(line, message):
    with pytest.raises(ValueError) as err:
        ts.parse_puzzle(line)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- validation

def test_validator_accepts_a_valid_grid():
    assert ts.is_valid_solution(GRID)
    assert ts.is_valid_solution(GRID, GRID)
    assert ts.is_valid_solution(GRID, "5" + "." * 80)
    assert ts.is_valid_solution(HARD_SOLUTION, HARD)


def test_validator_rejects_bad_grids():
    swapped = GRID[1] + GRID[0] + GRID[2:]               # rows still fine, columns get repeats
    assert not ts.is_valid_solution(swapped)
    repeated = "1" + GRID[1:]                            # digit 1 twice in row 1
    assert not ts.is_valid_solution(repeated)
    shifted = "".join("123456789"[(r + c) % 9] for r in range(9) for c in range(9))  # rows/cols ok, boxes not
    assert not ts.is_valid_solution(shifted)
    assert not ts.is_valid_solution(GRID[:80])
    assert not ts.is_valid_solution(GRID[:80] + "0")
    assert not ts.is_valid_solution(GRID, "6" + "0" * 80)  # valid grid, but disagrees with a clue


# ----------------------------------------------------------------------------- solver and grader

def test_solve_hard_unique():
    sols, guesses = ts.solve(HARD, limit=2)
    assert sols == [HARD_SOLUTION]
    assert guesses > 0


def test_solve_counts_multiple_and_zero_solutions():
    two = GRID.replace("1", "0").replace("2", "0")       # 1s and 2s can be swapped everywhere
    sols, _ = ts.solve(two, limit=2)
    assert len(sols) == 2 and GRID in sols and all(ts.is_valid_solution(s, two) for s in sols)
    assert len(ts.solve("0" * 81, limit=5)[0]) == 5
    assert ts.solve("11" + "0" * 79)[0] == []            # contradictory clues: no solution
    sols, guesses = ts.solve(EASY)
    assert len(sols) == 1 and guesses == 0 and ts.is_valid_solution(sols[0], EASY)


def test_batched_search_matches_scalar():
    rng = np.random.default_rng(0)
    grids = ts._random_grids(40, rng)
    puzzles = []
    for g, k in zip(grids, rng.integers(18, 40, len(grids))):  # some unique, many not
        keep = rng.permutation(81)[:k]
        puzzles.append("".join(str(g[i]) if i in keep else "0" for i in range(81)))
    puzzles += ["11" + "0" * 79, EASY]
    S = np.array([ts._cands(p) for p in puzzles], np.uint16)
    for small in (0, len(puzzles)):                      # all numpy, all scalar tail
        count, sols = ts._batch_search(S, 2, small=small)
        for p, n, s in zip(puzzles, count, sols):
            ref = ts.solve(p, limit=2)[0]
            assert n == len(ref)
            got = ["".join(map(str, row)) for row in s[:n]]
            assert sorted(got) == sorted(ref)
        assert 0 < (count == 1).sum() and (count == 2).sum() and (count == 0).sum()  # all three kinds


def test_batched_search_hard_puzzle():
    S = np.array([ts._cands(ts.parse_puzzle(HARD))] * 6, np.uint16)
    count, sols = ts._batch_search(S, 2, small=5)
    assert (count == 1).all()
    assert all("".join(map(str, s[0])) == HARD_SOLUTION for s in sols)


def test_grade_buckets():
    assert ts.grade(EASY) == "singles"
    assert ts.grade(HARD) == "hard"
    c = ts._cands(INTERMEDIATE)
    assert ts._propagate(c) and any(ts.POP[m] > 1 for m in c)   # singles alone stall
    assert ts.grade(INTERMEDIATE) == "intermediate"
    assert ts.grade(HARD_SOLUTION) == "singles"


def test_random_grids_valid_and_distinct():
    grids = ts._random_grids(64, np.random.default_rng(1))
    strings = ["".join(map(str, g)) for g in grids]
    assert all(ts.is_valid_solution(s) for s in strings)
    assert len(set(strings)) == 64


# ----------------------------------------------------------------------------- generation

def test_generate_30_clues_unique():
    rows = ts.generate_puzzles(60, 30, seed=0)
    assert len(rows) == 60
    _check_rows(rows, 30)


@pytest.mark.parametrize("clues", [26, 45])
def test_generate_clue_counts(clues):
    rows = ts.generate_puzzles(20, clues, seed=1)
    assert len(rows) == 20
    _check_rows(rows, clues)


def test_generate_minimal_puzzles_are_minimal():
    rows = ts.generate_puzzles(8, None, seed=2)
    _check_rows(rows, None)
    for row in rows:
        p = row["puzzle"]
        assert row["clues"] <= 30
        for i in range(81):
            if p[i] != "0":                              # every clue is needed
                assert _solution_count(p[:i] + "0" + p[i + 1:]) == 2


def test_make_test_sets_writes_every_bucket_and_the_easy_sets(tmp_path):
    ts.make_test_sets(str(tmp_path), n=6, seed=5)
    expect = {"singles": (30, {"singles"}), "harder": (None, {"intermediate", "hard"}), "minimal": (None, None),
              "singles36": (36, {"singles"}), "singles40": (40, {"singles"}), "singles45": (45, {"singles"})}
    seen = []
    for name, (clues, grades) in expect.items():
        lines = (tmp_path / f"{name}.txt").read_text().splitlines()
        assert len(lines) == 6, name
        for line in lines:
            puzzle, solution, n, grade = line.split("\t")
            assert ts.is_valid_solution(solution, puzzle) and int(n) == 81 - puzzle.count("0")
            assert clues is None or int(n) == clues
            assert grades is None or grade in grades
            assert name != "minimal" or int(n) <= 24
            seen.append(solution)
    assert len(set(seen[18:])) == 18 and set(seen[18:]).isdisjoint(seen[:18])  # the easy sets use new grids


def test_generate_deterministic_by_seed():
    a = ts.generate_puzzles(30, 30, seed=7)
    b = ts.generate_puzzles(30, 30, seed=7)
    c = ts.generate_puzzles(30, 30, seed=8)
    assert a == b
    assert {r["puzzle"] for r in a}.isdisjoint(r["puzzle"] for r in c)


def test_generate_rejects_bad_clue_count():
    with pytest.raises(ValueError, match="out of range"):
        ts.generate_puzzles(1, 16, seed=0)


def test_generate_dataset_mix():
    rows = ts.generate_dataset(40, clue_range=(28, 36), minimal_frac=0.25, seed=0)
    assert len(rows) == 40
    assert len({r["puzzle"] for r in rows}) == 40
    assert all(28 <= r["clues"] <= 36 or r["clues"] < 28 for r in rows)
    assert sum(r["clues"] < 28 for r in rows) >= 5                  # the minimal share is there
    assert len({r["clues"] for r in rows}) >= 5                      # a spread of clue counts
    assert rows == ts.generate_dataset(40, clue_range=(28, 36), minimal_frac=0.25, seed=0)
    for r in rows[:10]:
        assert ts.solve(r["puzzle"])[0] == [r["solution"]]


# ----------------------------------------------------------------------------- split and cache

def test_split_by_solution_no_overlap():
    rng = np.random.default_rng(0)
    grids = ["".join(map(str, g)) for g in ts._random_grids(100, rng)]
    rows = [{"puzzle": f"p{k}-{g}", "solution": g} for g in grids for k in range(3)]  # 3 puzzles per grid
    train, val, test = ts.split_by_solution(rows, fractions=(0.5, 0.25, 0.25), seed=0)
    assert len(train) + len(val) + len(test) == len(rows)
    assert train and val and test
    sols = [{r["solution"] for r in part} for part in (train, val, test)]
    assert not (sols[0] & sols[1]) and not (sols[0] & sols[2]) and not (sols[1] & sols[2])
    assert (train, val, test) == ts.split_by_solution(rows, fractions=(0.5, 0.25, 0.25), seed=0)
    train2, _, _ = ts.split_by_solution(rows, fractions=(0.5, 0.25, 0.25), seed=1)
    assert train2 != train                               # seed changes the assignment
    with pytest.raises(ValueError):
        ts.split_by_solution(rows, fractions=(0.5, 0.25))


@pytest.mark.parametrize("name", ["puzzles.jsonl", "puzzles.jsonl.gz"])
def test_save_load_roundtrip(tmp_path, name):
    rows = ts.generate_puzzles(10, 35, seed=0)
    path = str(tmp_path / "cache" / name)
    ts.save_puzzles(path, rows)
    assert ts.load_puzzles(path) == rows
    ts.save_puzzles(path, rows[:3])                      # overwrite in place
    assert ts.load_puzzles(path) == rows[:3]
    assert os.listdir(tmp_path / "cache") == [name]      # no temp file left behind
    with pytest.raises(TypeError):                       # a write that fails halfway...
        ts.save_puzzles(path, rows[:3] + [{"bad": {1, 2}}])
    assert ts.load_puzzles(path) == rows[:3]             # ...leaves the old file intact
    assert os.listdir(tmp_path / "cache") == [name]


def test_bench_generator_runs():
    assert ts.bench_generator(n=50, clues=30) > 0


# -----------------------------------------------------------------------------
# Sudoku training and evaluation (train_sudoku.py)

def run_train_sudoku(*args, env=None):
    return subprocess.run([sys.executable, os.path.join(HERE, "train_sudoku.py"), *args], capture_output=True,
                          text=True, timeout=600, cwd=HERE, env=env)


def test_augmentation_keeps_puzzles_valid():
    rows = ts.generate_puzzles(16, 30, seed=3)
    p, s = ts.to_tensor(rows, "puzzle"), ts.to_tensor(rows, "solution")
    g = torch.Generator().manual_seed(0)
    pa, sa = ts.augment(p, s, g)
    assert not torch.equal(pa, p)
    for a, b in zip(pa, sa):
        puzzle, grid = "".join(map(str, a.tolist())), "".join(map(str, b.tolist()))
        assert ts.is_valid_solution(grid, puzzle) and ts.solve(puzzle)[0] == [grid]


def test_corruption_rate_follows_t():
    target = torch.full((4000, 81), 7)
    g = torch.Generator().manual_seed(0)
    noisy, t = ts.corrupt(target, 16, g)
    changed = (noisy != target).float().mean(1)
    # a replaced token is a uniform draw over 16 ids, so it stays 7 with probability 1/16
    assert torch.allclose(changed.mean(), (t * 15 / 16).mean(), atol=0.01)
    slope = ((changed - changed.mean()) * (t - t.mean())).sum() / ((t - t.mean()) ** 2).sum()
    assert abs(slope.item() - 15 / 16) < 0.05
    assert t.min() >= 1e-3 and t.max() <= 1


def test_format_and_read_answer():
    assert ts.read_answer("x" + GRID + "\n") == GRID
    assert ts.read_answer(GRID[:80]) is None
    grid = ts.format_grid(GRID, EASY)
    assert grid.count("\n") == 10 and "------+-------+------" in grid
    tok = dg.Tokenizer.from_json(ts.compact_tokenizer_json())
    ids = ts.prompt_ids(tok, EASY)
    assert len(ids) == 83 and ids[0] == tok.bos_id and tok.decode(ids[1:-1]) == EASY
    assert tok.decode(ts.answer_ids(tok, GRID)) == GRID


@pytest.fixture(scope="module")
def sudoku_run(tmp_path_factory):
    """A short CPU training run of a tiny Sudoku model, saved every 4 steps."""
    root = tmp_path_factory.mktemp("sudoku")
    args = ["--steps", "8", "--batch-size", "8", "--train-puzzles", "300", "--data-dir", str(root / "data"),
            "--eval-every", "8", "--eval-puzzles", "4", "--log-every", "2", "--save-every", "4",
            "--warmup", "2", "--lr", "3e-3", "--device", "cpu", "--workers", "1", "--compile", "off"]
    full = run_train_sudoku(*args, "--out", str(root / "full"))
    assert full.returncode == 0, full.stderr
    return root, full.stdout


def test_grades_trains_on_those_puzzles_only(sudoku_run, tmp_path):
    root, _ = sudoku_run
    r = run_train_sudoku("--grades", "intermediate,hard", "--steps", "1", "--batch-size", "4", "--train-puzzles", "300",
                         "--data-dir", str(root / "data"), "--eval-every", "0", "--out", str(tmp_path / "run"),
                         "--device", "cpu", "--compile", "off")
    assert r.returncode == 0, r.stderr
    rows = [row for row in ts.training_puzzles(300, 0, str(root / "data")) if row["grade"] != "singles"]
    kept = len(ts.split_by_solution(rows, (0.99, 0.01, 0.0), seed=0)[0])
    assert 0 < kept < 250 and f", {kept} training puzzles," in r.stdout
    r = run_train_sudoku("--grades", "hard", "--train-puzzles", "1", "--data-dir", str(root / "data"),
                         "--out", str(tmp_path / "none"), "--device", "cpu", "--compile", "off")
    assert ts.training_puzzles(1, 0, str(root / "data"))[0]["grade"] == "singles"  # seed 0's one puzzle
    assert_one_error_line(r, "--grades hard: none of the 1 training puzzles has these grades; raise --train-puzzles")


def test_max_minutes_shrinks_the_schedule_to_end_in_time(sudoku_run, tmp_path):
    """--max-minutes: after step 30 the run measures its pace and, if --steps would end it too late, trains fewer
    steps (the learning-rate schedule shrinks with them); a run that fits keeps its steps. The CPU demo's
    default (no --steps, no --time-budget) is a 9.5-minute ceiling on 800 steps."""
    root, _ = sudoku_run
    common = ["--batch-size", "4", "--train-puzzles", "300", "--data-dir", str(root / "data"), "--eval-every", "0",
              "--log-every", "10", "--device", "cpu", "--compile", "off", "--warmup", "2"]
    r = run_train_sudoku(*common, "--steps", "200", "--max-minutes", "0.001", "--out", str(tmp_path / "short"))
    assert r.returncode == 0, r.stderr
    assert "--max-minutes 0.001: at " in r.stdout and "200 steps would not end in time -> 31 steps" in r.stdout
    assert "step 31/31 " in r.stdout and "done: 31 steps" in r.stdout  # the schedule's end moved to step 31
    r = run_train_sudoku(*common, "--steps", "35", "--max-minutes", "60", "--out", str(tmp_path / "fits"))
    assert r.returncode == 0, r.stderr
    assert "would not end in time" not in r.stdout and "done: 35 steps" in r.stdout
    assert (ts.parse_args([]).steps, ts.parse_args([]).max_minutes) == (800, 9.5)
    assert ts.parse_args(["--steps", "800"]).max_minutes is None


def test_training_lowers_the_loss(sudoku_run):
    _, log = sudoku_run
    losses = [float(line.split("| loss ")[1].split()[0]) for line in log.splitlines() if "| loss " in line]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert "ETA" in log and "tok/s" in log and "eval:" in log


@pytest.mark.parametrize("stop, stopped_at", [(["--stop-after", "4"], 4),             # as Ctrl-C would
                                               (["--stop-after-minutes", "0"], 1)])   # out of time after step 1
def test_checkpoint_reloads_and_resumes_exactly(sudoku_run, stop, stopped_at):
    root, _ = sudoku_run
    full = DiffusionGemma.from_pretrained(str(root / "full"), device="cpu")
    # an 8-step run stopped early, then resumed, equals the uninterrupted run
    args = ["--steps", "8", "--batch-size", "8", "--train-puzzles", "300", "--data-dir", str(root / "data"),
            "--eval-every", "0", "--log-every", "2", "--save-every", "4", "--warmup", "2", "--lr", "3e-3",
            "--device", "cpu", "--workers", "1", "--compile", "off"]
    state = torch.load(root / "full" / "train_state.pt", weights_only=False)
    assert state["step"] == 8
    stopped, resumed_dir = root / f"stopped-{stopped_at}", root / f"resumed-{stopped_at}"
    r = run_train_sudoku(*args, "--out", str(stopped), *stop)
    assert r.returncode == 0, r.stderr
    assert torch.load(stopped / "train_state.pt", weights_only=False)["step"] == stopped_at
    r = run_train_sudoku("--resume", str(stopped), "--out", str(resumed_dir), "--device", "cpu", "--compile", "off")
    assert r.returncode == 0, r.stderr
    resumed = DiffusionGemma.from_pretrained(str(resumed_dir), device="cpu")
    for (n, a), (_, b) in zip(full.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), n
    # and the checkpoint is a Hugging Face one with the sampler's files
    for f in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "sudoku.json"):
        assert os.path.isfile(root / "full" / f), f


def test_data_parallel_training_resumes_exactly(sudoku_run, tmp_path):
    """torchrun, 2 CPU processes (gloo): a run stopped and resumed under DistributedDataParallel equals the
    uninterrupted one, and each process trains on puzzles of its own."""
    root, _ = sudoku_run

    def torchrun(*args):
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               os.path.join(HERE, "train_sudoku.py"), *args],
                              capture_output=True, text=True, timeout=600, cwd=HERE)

    def settings(batch):
        return ["--steps", "4", "--batch-size", str(batch), "--train-puzzles", "300", "--data-dir", str(root / "data"),
                "--eval-every", "0", "--log-every", "2", "--save-every", "0", "--warmup", "2", "--lr", "3e-3",
                "--device", "cpu", "--workers", "1", "--compile", "off"]

    args = settings(8)
    full = torchrun(*args, "--out", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr
    assert "batch 8, device cpu x2" in full.stdout and full.stdout.count("step 4/4") == 1  # only rank 0 logs
    r = torchrun(*args, "--out", str(tmp_path / "stopped"), "--stop-after", "2")
    assert r.returncode == 0, r.stderr
    r = torchrun("--resume", str(tmp_path / "stopped"), "--out", str(tmp_path / "resumed"), "--device", "cpu",
                 "--compile", "off")
    assert r.returncode == 0, r.stderr
    # each process draws its own 4 puzzles per step: had both drawn rank 0's, the result would be this run's
    # (one thread, as torchrun gives each process, so that the sums round the same way)
    r = run_train_sudoku(*settings(4), "--out", str(tmp_path / "single"), env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    a, b, single = (DiffusionGemma.from_pretrained(str(tmp_path / d), device="cpu")
                    for d in ("full", "resumed", "single"))
    for (n, x), (_, y) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(x, y), n
    assert any(not torch.equal(x, z) for x, z in zip(a.parameters(), single.parameters()))


def test_eval_only_and_sample_py_on_the_trained_checkpoint(sudoku_run, tmp_path):
    root, log = sudoku_run
    puzzles = tmp_path / "p.txt"
    # a CSV header line (skipped), a comment after whitespace, a blank line, a CSV row
    puzzles.write_text("quizzes,solutions\n" + EASY.replace("0", ".") + "  # a comment\n\n" + HARD + ",123\n")
    out = tmp_path / "r.jsonl"
    r = run_train_sudoku("--eval-only", "--checkpoint", str(root / "full"), "--puzzles", str(puzzles),
                         "--out", str(out), "--device", "cpu", "--max-steps", "4")
    assert r.returncode == 0, r.stderr
    assert "95% interval" in r.stdout and "grade singles" in r.stdout and "clues preserved" in r.stdout
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [x["puzzle"] for x in recs] == [EASY, HARD.replace(".", "0")]
    assert all(set(x) >= {"puzzle", "output", "steps"} and 1 <= x["steps"] <= 4 for x in recs)
    # training ends with a command to try the model on its easiest validation puzzle: it runs
    hint = [line for line in log.splitlines() if line.startswith("try it: python sample.py ")]
    assert len(hint) == 1
    tried = hint[0].split()[4:]
    assert tried[:2] == ["--checkpoint", str(root / "full")] and tried[-2] == "--prompt"
    assert ts.parse_puzzle(tried[-1]) == tried[-1]
    s = run_sample(*tried, "--device", "cpu", "--steps", "3")
    assert s.returncode == 0, s.stderr
    assert "------+-------+------" in s.stdout and "steps/block" in s.stdout


@pytest.mark.parametrize("line,message", [
    (EASY[:80], "line 1: puzzle has 80 cells"),
    (EASY[:3] + "x" + EASY[4:], "bad character 'x'"),
    ("55" + "0" * 79, "contradictory clues"),
    ("12345678." + "........9" + "." * 63, "has no solution"),  # the last cell of row 1 can hold nothing
])
def test_eval_only_and_sample_reject_malformed_puzzles(sudoku_run, tmp_path, line, message):
    root, _ = sudoku_run
    f = tmp_path / "bad.txt"
    f.write_text(line + "\n")
    r = run_train_sudoku("--eval-only", "--checkpoint", str(root / "full"), "--puzzles", str(f), "--device", "cpu")
    assert_one_error_line(r, message)
    assert str(f) in r.stderr  # the error names the file
    s = run_sample("--checkpoint", str(root / "full"), "--prompt", line, "--device", "cpu")  # the same, as a prompt
    assert_one_error_line(s, message.removeprefix("line 1: "))


@pytest.mark.parametrize("name,content,message", [
    ("generation_config.json", "{not json", "generation_config.json is not valid JSON"),
    ("generation_config.json", "[1, 2]", "must hold a JSON object of generation settings"),
    ("sudoku.json", "{not json", "sudoku.json is not valid JSON"),
    ("sudoku.json", '{"format": "grid"}', 'must say {"format": "compact"} or {"format": "chat"}'),
])
def test_malformed_side_files_of_a_checkpoint(tmp_path, name, content, message):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for f in os.listdir(ts.BUNDLED):  # the bundled checkpoint, with one side file replaced
        if f == name:
            (ckpt / f).write_text(content)
        else:
            (ckpt / f).symlink_to(os.path.join(ts.BUNDLED, f))
    r = run_sample("--checkpoint", str(ckpt), "--device", "cpu")
    assert_one_error_line(r, message)


@pytest.mark.parametrize("flag,value,message", [
    ("--batch-size", "0", "--batch-size must be > 0 (got 0)"),
    ("--lr", "-1e-3", "--lr must be > 0"),
    ("--warmup", "-5", "--warmup must be >= 0"),
    ("--max-minutes", "0", "--max-minutes must be > 0 (got 0.0)"),
    ("--sc-prob", "1.5", "--sc-prob is a share of the examples"),
    ("--grades", "hard,easy", "--grades: unknown grade 'easy'; choose from singles, intermediate, hard"),
])
def test_training_rejects_nonsense_settings(tmp_path, flag, value, message):
    r = run_train_sudoku(f"{flag}={value}", "--steps", "2", "--train-puzzles", "300",
                         "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "run"),
                         "--device", "cpu", "--compile", "off")
    assert_one_error_line(r, message)
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()  # stopped before any work


@pytest.mark.parametrize("args,message", [
    (["--out", "{file}", "--steps", "2"], "is a file; it must be a folder"),
    (["--make-test-sets", "{file}"], "is a file; it must be a folder"),
    (["--eval-only", "--puzzles", "{file}", "--out", "{dir}"], "must be a file path in an existing folder"),
    (["--eval-only", "--puzzles", "{file}", "--out", "{dir}/no/such/folder/r.jsonl"], "in an existing folder"),
])
def test_output_paths_of_the_wrong_kind_are_refused_up_front(tmp_path, args, message):
    (tmp_path / "a.txt").write_text(EASY + "\n")
    args = [a.format(file=tmp_path / "a.txt", dir=tmp_path) for a in args]
    r = run_train_sudoku(*args, "--train-puzzles", "300", "--data-dir", str(tmp_path / "data"), "--device", "cpu")
    assert_one_error_line(r, message)
    assert not (tmp_path / "data").exists()  # stopped before any work


# -----------------------------------------------------------------------------
# Attempts: several denoising chains per puzzle, a check of the rules picks one

def test_pick_attempt_takes_the_first_valid_grid():
    swapped = HARD_SOLUTION[:2] + HARD_SOLUTION[3] + HARD_SOLUTION[2] + HARD_SOLUTION[4:]  # two cells: breaks boxes
    relabelled = HARD_SOLUTION.translate(str.maketrans("12", "21"))   # a valid Sudoku that changes clues
    assert ts.is_valid_solution(relabelled) and not ts.is_valid_solution(relabelled, HARD)
    assert ts.pick_attempt([swapped, None, HARD_SOLUTION, HARD_SOLUTION], HARD) == 2
    assert ts.pick_attempt([relabelled, HARD_SOLUTION], HARD) == 1
    assert ts.pick_attempt([swapped, None, relabelled], HARD) == 0    # none valid: chain 0


@pytest.fixture(scope="module")
def bundled_sudoku():
    """The bundled Sudoku model (fp32, CPU) and its tokenizer."""
    model = DiffusionGemma.from_pretrained(ts.BUNDLED, dtype=torch.float32, device="cpu")
    return model, dg.Tokenizer.from_pretrained(ts.BUNDLED)


def test_evaluate_runs_chain_0_then_more_chains_for_the_unsolved(bundled_sudoku, monkeypatch, capsys):
    """attempts=K: chain 0 of every puzzle is the plain batched generate, draw for draw (attempts=1); then
    the K-1 other chains run side by side (neighbouring rows), only for the puzzles chain 0 left unsolved.
    Between generate calls it shows its progress on stderr."""
    model, tok = bundled_sudoku
    puzzles = [EASY, ts.parse_puzzle(HARD), INTERMEDIATE]
    gen = dg.GenerationConfig(max_new_tokens=81, max_denoising_steps=4, eos_token_id=[1])

    def generate(chunks, chains, g):
        grids, steps = [], []
        for chunk in chunks:
            out = dg.generate(model, [ts.prompt_ids(tok, p) for p in chunk for _ in range(chains)], gen, generator=g)
            grids += [ts.read_answer(tok.decode(t.tolist())) for t in out.tokens]
            steps += out.forwards
        return grids, steps
    g = torch.Generator().manual_seed(5)
    first, first_steps = generate([puzzles[:2], puzzles[2:]], 1, g)           # batch_size 2: puzzles 0-1, then 2
    unsolved = [i for i, p in enumerate(puzzles) if not ts.is_valid_solution(first[i], p)]
    assert unsolved and len(unsolved) < len(puzzles)  # 4 steps: the easy puzzle is solved, the hard one is not
    more, more_steps = generate([[puzzles[i]] for i in unsolved], 2, g)       # 2 chains: one puzzle per call
    monkeypatch.setattr(ts, "PROGRESS_SECONDS", 0)  # a progress line after every call (stderr is no terminal)
    capsys.readouterr()
    one = ts.evaluate(model, tok, "compact", puzzles, max_steps=4, batch_size=2, seed=5, attempts=1)["records"]
    assert "chain 0: 2/3 puzzles" in capsys.readouterr().err
    three = ts.evaluate(model, tok, "compact", puzzles, max_steps=4, batch_size=2, seed=5, attempts=3)["records"]
    for i, p in enumerate(puzzles):
        assert (one[i]["output"], one[i]["steps"], one[i]["chains"]) == (first[i], first_steps[i], 1)
        grids, steps = [first[i]], [first_steps[i]]
        if i in unsolved:
            j = unsolved.index(i)
            grids, steps = grids + more[2 * j:2 * j + 2], steps + more_steps[2 * j:2 * j + 2]
        k = ts.pick_attempt(grids, p)
        rec = three[i]
        assert (rec["attempt"], rec["output"], rec["steps"], rec["chains"]) == (k, grids[k], steps[k], len(grids))
        assert rec["valid_chains"] == sum(ts.is_valid_solution(x, p) for x in grids)
        assert rec["solved"] == ts.is_valid_solution(rec["output"], p)


def test_evaluate_uses_the_checkpoints_sampler_settings(bundled_sudoku, tmp_path):
    """generation_config.json sets the sampler; evaluate's canvas and step cap, then gen_overrides, win."""
    model, tok = bundled_sudoku
    sampler = {"entropy_bound": 0.5, "t_max": 1.5, "t_min": 1.0}
    (tmp_path / "generation_config.json").write_text(json.dumps({"max_new_tokens": 256, "max_denoising_steps": 48,
                                                                 **sampler}))
    puzzles = [ts.parse_puzzle(HARD), INTERMEDIATE]

    def records(**kw):
        return ts.evaluate(model, tok, "compact", puzzles, max_steps=3, seed=1, **kw)["records"]
    from_file = records(checkpoint=str(tmp_path))
    assert from_file == records(gen_overrides=sampler) != records()
    assert all(r["steps"] <= 3 for r in from_file)
    assert records(checkpoint=str(tmp_path), gen_overrides={"entropy_bound": 0.1, "t_max": 0.8, "t_min": 0.4}) \
        == records()


def test_eval_only_and_sample_py_with_attempts(tmp_path):
    puzzles = tmp_path / "p.txt"
    puzzles.write_text(EASY + "\n" + HARD + "\n")
    out = tmp_path / "r.jsonl"
    r = run_train_sudoku("--eval-only", "--puzzles", str(puzzles), "--out", str(out), "--device", "cpu",
                         "--max-steps", "8", "--attempts", "2")
    assert r.returncode == 0, r.stderr
    assert "2 chains + rule check" in r.stdout and "chain 0 alone" in r.stdout
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(recs) == 2 and any(x["solved"] for x in recs)
    for x in recs:
        assert x["attempt"] in (0, 1) and x["valid_chains"] in (0, 1, 2)
        assert x["solved"] == ts.is_valid_solution(x["output"], x["puzzle"]) == (x["valid_chains"] > 0)
    s = run_sample("--prompt", EASY, "--device", "cpu", "--attempts", "2")
    assert s.returncode == 0, s.stderr
    assert "solved by chain " in s.stdout and " of 2 " in s.stdout
    # without --max-steps (and --attempts): the bundled checkpoint's step cap and chains
    one = tmp_path / "one.txt"
    one.write_text(EASY + "\n")
    d = run_train_sudoku("--eval-only", "--puzzles", str(one), "--device", "cpu")
    cap = dg.GenerationConfig.from_pretrained(ts.BUNDLED).max_denoising_steps
    assert d.returncode == 0 and f"max {cap} steps" in d.stdout, d.stderr
    assert f"{ts.read_attempts(None, ts.BUNDLED)} chains + rule check" in d.stdout


def test_attempts_must_be_a_whole_number_of_chains(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text(EASY + "\n")
    r = run_train_sudoku("--eval-only", "--puzzles", str(f), "--device", "cpu", "--attempts", "0")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == ["error: --attempts must be a whole number of chains >= 1 (got 0)"]
    s = run_sample("--random-weights", "--config", "tiny", "--device", "cpu", "--attempts", "2")
    assert s.returncode != 0 and s.stderr.strip().splitlines() == [
        "error: --attempts is for Sudoku checkpoints (a rule check picks among the chains)"]
    # the default comes from sudoku.json, checked the same way
    for stored, expected in (({}, 1), ({"attempts": 4}, 4)):
        (tmp_path / "sudoku.json").write_text(json.dumps({"format": "compact", **stored}))
        assert ts.read_attempts(None, str(tmp_path)) == expected and ts.read_attempts(2, str(tmp_path)) == 2
    for bad in (0, 2.5, "8", True):
        (tmp_path / "sudoku.json").write_text(json.dumps({"format": "compact", "attempts": bad}))
        with pytest.raises(DiffusionGemmaError, match="sudoku.json must be a whole number of chains"):
            ts.read_attempts(None, str(tmp_path))


def test_a_run_from_a_sudoku_checkpoint_keeps_its_sampler_and_chains(sudoku_run, tmp_path):
    """--init-from the bundled checkpoint: the new checkpoints keep its generation_config.json and attempts."""
    root, _ = sudoku_run
    r = run_train_sudoku("--init-from", ts.BUNDLED, "--steps", "1", "--batch-size", "2", "--train-puzzles", "300",
                         "--data-dir", str(root / "data"), "--eval-every", "0", "--out", str(tmp_path / "ft"),
                         "--export", str(tmp_path / "bf16"), "--device", "cpu", "--compile", "off")
    assert r.returncode == 0, r.stderr
    bundled = [dg.read_json(os.path.join(ts.BUNDLED, f)) for f in ("generation_config.json", "sudoku.json")]
    assert bundled[0]["t_max"] == 1.2 and bundled[1]["attempts"] == 32
    for folder in ("ft", "bf16"):
        assert [dg.read_json(tmp_path / folder / f) for f in ("generation_config.json", "sudoku.json")] == bundled


def test_fine_tune_from_a_hugging_face_checkpoint_uses_the_chat_format(text_ckpt, tmp_path):
    """--init-from a (tiny) Hugging Face DiffusionGemma with its own tokenizer: Google's chat prompt."""
    r = run_train_sudoku("--init-from", text_ckpt, "--steps", "2", "--batch-size", "4", "--train-puzzles", "300",
                         "--data-dir", str(tmp_path / "data"), "--eval-every", "0", "--log-every", "1",
                         "--warmup", "1", "--out", str(tmp_path / "ft"), "--device", "cpu", "--workers", "1",
                         "--compile", "off")
    assert r.returncode == 0, r.stderr
    assert dg.read_json(tmp_path / "ft" / "sudoku.json") == {"format": "chat"}
    tok = dg.Tokenizer.from_pretrained(text_ckpt)
    prompt = tok.decode(ts.prompt_ids(tok, EASY, "chat"), strip_thoughts=False)
    assert prompt.startswith("system\nSolve the following Sudoku puzzle.") and "0 0 3 0 2 0 6 0 0\n9 0 0" in prompt
    # the fine-tuned weights moved away from the initial ones
    a = DiffusionGemma.from_pretrained(text_ckpt, device="cpu")
    b = DiffusionGemma.from_pretrained(str(tmp_path / "ft"), device="cpu")
    assert not torch.equal(a.layers[0].mlp.up_proj.weight, b.layers[0].mlp.up_proj.weight)
