"""Tests for diffusiongemma. Run: python -m pytest -q test_diffusiongemma.py

transformers (5.23.0) is the oracle for the parity tests; they skip with a reason when it is absent.
Tests marked `slow` are skipped unless RUN_SLOW=1."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import diffusiongemma as dg
from diffusiongemma import Config, DiffusionGemma, DiffusionGemmaError

HERE = os.path.dirname(os.path.abspath(__file__))

try:
    import transformers
    from transformers import DiffusionGemmaForBlockDiffusion, DiffusionGemmaConfig
    HAVE_HF = True
except Exception:  # noqa: BLE001 - any import problem means "no oracle"
    HAVE_HF = False
needs_hf = pytest.mark.skipif(not HAVE_HF, reason="transformers>=5.23 (the test oracle) is not installed")


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
    ours = DiffusionGemma.from_pretrained(str(tmp_path / "hf"), sliding_window_mode="anchored")
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
    back = DiffusionGemma.from_pretrained(str(tmp_path / "m"))
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
        DiffusionGemma.from_pretrained(str(tmp_path / "nowhere"))

    p = _copy_ckpt(tiny_ckpt, tmp_path / "noconfig")
    os.remove(os.path.join(p, "config.json"))
    with pytest.raises(DiffusionGemmaError, match="no config.json"):
        DiffusionGemma.from_pretrained(p)

    p = _copy_ckpt(tiny_ckpt, tmp_path / "missing")
    _rewrite_tensors(p, lambda t: t.pop("model.decoder.layers.1.router.scale"))
    with pytest.raises(DiffusionGemmaError, match="missing .*router.scale"):
        DiffusionGemma.from_pretrained(p)

    p = _copy_ckpt(tiny_ckpt, tmp_path / "extra")
    _rewrite_tensors(p, lambda t: t.update({"model.decoder.layers.2.self_attn.v_proj.weight": torch.zeros(32, 64)}))
    with pytest.raises(DiffusionGemmaError, match="unexpected tensor .*layers.2.self_attn.v_proj"):
        DiffusionGemma.from_pretrained(p)

    p = _copy_ckpt(tiny_ckpt, tmp_path / "shape")
    _rewrite_tensors(p, lambda t: t.update({"model.decoder.norm.weight": torch.ones(65)}))
    with pytest.raises(DiffusionGemmaError, match=r"norm.weight.*shape \[65\]"):
        DiffusionGemma.from_pretrained(p)

    p = _copy_ckpt(tiny_ckpt, tmp_path / "mismatch")
    cfg = json.load(open(os.path.join(p, "config.json")))
    cfg["text_config"]["num_experts"] = 8
    json.dump(cfg, open(os.path.join(p, "config.json"), "w"))
    with pytest.raises(DiffusionGemmaError, match="does not match the weights"):
        DiffusionGemma.from_pretrained(p)

    p = _copy_ckpt(tiny_ckpt, tmp_path / "badjson")
    open(os.path.join(p, "config.json"), "w").write("{not json")
    with pytest.raises(DiffusionGemmaError, match="config.json is malformed"):
        DiffusionGemma.from_pretrained(p)

    p = _copy_ckpt(tiny_ckpt, tmp_path / "truncated")
    f = os.path.join(p, "model.safetensors")
    data = open(f, "rb").read()
    open(f, "wb").write(data[: len(data) // 2])
    with pytest.raises(DiffusionGemmaError, match="corrupt or truncated"):
        DiffusionGemma.from_pretrained(p)


def test_bad_device_and_dtype():
    with pytest.raises(DiffusionGemmaError, match="unknown device"):
        dg.resolve_device("tpu")
    with pytest.raises(DiffusionGemmaError, match="unknown dtype"):
        dg.resolve_dtype("float8")
    with pytest.raises(DiffusionGemmaError, match="unknown config preset"):
        Config.preset("huge")


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
    ours = DiffusionGemma.from_pretrained(gentle_ckpt, sliding_window_mode="anchored")
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
    model = DiffusionGemma.from_pretrained(tiny_ckpt)
    gen = GenerationConfig(max_new_tokens=32, max_denoising_steps=4)
    run = lambda seed: generate(model, [[2, 5, 6, 7]], gen, generator=torch.Generator().manual_seed(seed)).tokens  # noqa
    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))


def test_stop_tokens_pad_the_rest():
    tokens = torch.tensor([[5, 6, 106, 7, 1, 8], [5, 6, 7, 8, 9, 10], [1, 2, 3, 4, 5, 6]])
    out, stopped = dg.truncate_after_stop(tokens, [1, 106, 50], 0)
    assert out.tolist() == [[5, 6, 106, 0, 0, 0], [5, 6, 7, 8, 9, 10], [1, 0, 0, 0, 0, 0]]
    assert stopped.tolist() == [True, False, True]


def test_generation_stops_at_eos_and_pads(gentle_ckpt):
    """With a token the model emits often declared a stop token, rows end there and later blocks are pad."""
    model = DiffusionGemma.from_pretrained(gentle_ckpt)
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
    model = DiffusionGemma.from_pretrained(tiny_ckpt)
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
    model = DiffusionGemma.from_pretrained(tiny_ckpt)
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


def test_temperature_schedule():
    assert dg.temperature(0, 48, 0.4, 0.8) == pytest.approx(0.8)
    assert dg.temperature(47, 48, 0.4, 0.8) == pytest.approx(0.4 + 0.4 / 48)


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


@pytest.mark.parametrize("args,message", [
    (["--prompt", ""], "empty prompt"),
    (["--prompt", "x" * 1100], "does not fit the context"),
    (["--prompt", "hi", "--device", "tpu"], "unknown device"),
    (["--prompt", "hi", "--dtype", "int3"], "unknown dtype"),
    (["--prompt", "hi", "--steps", "0"], "max_denoising_steps must be >= 1"),
])
def test_sample_py_bad_input(text_ckpt, args, message):
    r = run_sample("--checkpoint", text_ckpt, "--device", "cpu", *args)
    assert r.returncode != 0
    assert r.stderr.strip().startswith("error:") and message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_sample_py_missing_checkpoint(tmp_path):
    r = run_sample("--checkpoint", str(tmp_path / "none"), "--prompt", "hi", "--device", "cpu")
    assert r.returncode != 0 and "does not exist" in r.stderr and "Traceback" not in r.stderr
