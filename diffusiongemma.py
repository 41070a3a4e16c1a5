"""
DiffusionGemma in one file: google/diffusiongemma-26B-A4B-it, a block-diffusion language model.

One weight-tied Gemma 4 26B-A4B Mixture-of-Experts backbone runs in two modes:
  * encode  - a causal pass that appends keys/values to the KV cache: once over the prompt
              ("prefill") and once over every finished 256-token block ("commit");
  * denoise - a bidirectional pass over a 256-token canvas that reads the cache and never writes it,
              with a small self-conditioning MLP on its input. It returns fp32 logits.
Generation is uniform-noise diffusion: the canvas starts as random vocabulary tokens (there is no
mask token); each step samples every position, keeps the lowest-entropy ones under an entropy
bound and re-noises the rest; the block's argmax is emitted and committed; the next block follows.
The plain path (KVCache, an expert loop) is the readable reference, tested against transformers;
FastPath runs the same modules with a static cache, grouped-GEMM experts (on CUDA a Triton kernel of ours,
written for a canvas's few rows per expert) and CUDA graphs, tested against the plain path; it runs each block's
first step in the same pass as the encoder pass before it (encode_and_denoise: the prompt's last chunk, or the
commit of the block before), so the weights stream once for both.
experts_to_fp8() is an opt-in approximation for speed: float8 experts.

Quirks of the architecture that are easy to get wrong (all checked against transformers in tests):
  1. RMSNorm multiplies by `w`, not `1 + w` (Gemma 4, unlike Gemma 1-3); it runs in fp32 inside.
  2. Attention scale is 1.0 (q and k are RMS-normalised per head instead); no attention softcap.
  3. Values get a weightless RMSNorm and no RoPE.
  4. Full-attention layers (every 6th) have head_dim 512, 2 KV heads and no v_proj: V is the raw
     k_proj output (K=V). Their RoPE is "proportional": theta 1e6 on the first 25% of frequency
     pairs, exponent denominator = the full head_dim; the other pairs do not rotate.
  5. Sliding layers: head_dim 256, 8 KV heads, theta 1e4, window 1024. While denoising, a canvas
     query sees keys with |q - k| < window ("band", Google's JAX code and vLLM); transformers'
     eager/SDPA path instead lets every canvas query see the last window-1 cached tokens ("anchored").
  6. Each layer has a dense MLP and 128 routed experts (top-8) side by side. The router reads the
     raw residual: RMS(x) * scale * H^-1/2 -> softmax over all experts -> top-k -> renormalise ->
     * per_expert_scale. Dense and expert outputs are normed separately, summed, normed again.
  7. Every layer output is multiplied by a scalar `layer_scalar`; the encoder has its own copy.
  8. The embedding is scaled by sqrt(H) cast to the weight dtype (53.0 in bf16, not 53.07).
  9. The decoder input is RMS-normalised (weightless) after adding the self-conditioning signal;
     the encoder input is the raw scaled embedding.
 10. The head is the tied embedding; logits are softcapped in fp32: 30 * tanh(logits / 30).

References: transformers 5.23.0 `models/diffusion_gemma/` (the oracle our tests run against) and
Google's JAX code in google-deepmind/gemma `gemma/diffusion/`.
"""

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field, fields
from functools import partial
from itertools import accumulate

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

try:  # Triton comes with torch's CUDA wheels; the CPU wheel has none, and then aten's grouped GEMM serves
    import triton
    import triton.language as tl
except ImportError:
    triton = None


class DiffusionGemmaError(ValueError):
    """A problem with the user's input (checkpoint, config, prompt...). The message is one line
    that names the problem and the fix; scripts print it instead of a traceback."""


def read_json(path):
    """The JSON value in a file, closed after reading (a malformed file raises ValueError)."""
    with open(path) as f:
        return json.load(f)


# -----------------------------------------------------------------------------
# Config

SLIDING, FULL = "sliding_attention", "full_attention"


@dataclass
class Config:
    vocab_size: int = 262144             # tokens in the (Gemma 4) vocabulary; the head is tied to the embedding
    hidden_size: int = 2816              # H, width of the residual stream
    intermediate_size: int = 2112        # width of the dense MLP in every layer and of the self-conditioning MLP
    num_hidden_layers: int = 30          # transformer layers
    num_attention_heads: int = 16        # query heads, in every layer
    num_key_value_heads: int = 8         # KV heads of sliding layers
    head_dim: int = 256                  # head width of sliding layers
    num_global_key_value_heads: int = 2  # KV heads of full layers (which have K=V and no v_proj)
    global_head_dim: int = 512           # head width of full layers
    num_experts: int = 128               # routed experts per layer
    top_k_experts: int = 8               # experts each token is routed to
    moe_intermediate_size: int = 704     # hidden width of one expert
    sliding_window: int = 1024           # sliding layers see keys with q - k < window (|q - k| while denoising)
    layer_types: list = None             # per layer, "sliding_attention" or "full_attention";
                                         # None: 5 sliding then 1 full, repeated
    rope_theta: float = 10000.0          # RoPE base of sliding layers (all head dims rotate)
    global_rope_theta: float = 1000000.0  # RoPE base of full layers
    global_partial_rotary_factor: float = 0.25  # share of full-layer head dims that rotate ("proportional" RoPE)
    rms_norm_eps: float = 1e-6           # epsilon inside every RMSNorm
    final_logit_softcapping: float = 30.0  # logits = cap * tanh(logits / cap), in fp32
    max_position_embeddings: int = 262144  # longest context the model was trained for (prompt + generated)
    canvas_length: int = 256             # tokens denoised together: the block length of block diffusion
    pad_token_id: int = 0                # <pad>: the left padding of batched prompts
    eos_token_id: int = 1                # <eos>
    bos_token_id: int = 2                # <bos>, first token of every prompt
    sliding_window_mode: str = "band"    # denoising on sliding layers: "band" (|q-k| < window, Google/vLLM)
                                         # or "anchored" (the whole cached window and canvas: transformers eager)
    vision_config: dict = None           # passed through to config.json only; the vision tower is not implemented here
    image_token_id: int = 258880         # ids of the vision tower's tokens, passed through to config.json
    boi_token_id: int = 255999
    eoi_token_id: int = 258882

    def __post_init__(self):
        if self.layer_types is None:
            self.layer_types = [FULL if (i + 1) % 6 == 0 else SLIDING for i in range(self.num_hidden_layers)]
        self.layer_types = list(self.layer_types)
        problems = []
        if len(self.layer_types) != self.num_hidden_layers:
            problems.append(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        if set(self.layer_types) - {SLIDING, FULL}:
            problems.append(f"unknown layer types {sorted(set(self.layer_types) - {SLIDING, FULL})}")
        if self.sliding_window_mode not in ("band", "anchored"):
            problems.append(f"sliding_window_mode must be 'band' or 'anchored', not {self.sliding_window_mode!r}")
        if self.top_k_experts > self.num_experts:
            problems.append(f"top_k_experts {self.top_k_experts} > num_experts {self.num_experts}")
        for heads in (self.num_key_value_heads, self.num_global_key_value_heads):
            if self.num_attention_heads % heads:
                problems.append(f"{self.num_attention_heads} query heads do not divide into {heads} KV heads")
        if problems:
            raise DiffusionGemmaError("bad config: " + "; ".join(problems))

    def attn_shape(self, layer: int):
        """(head_dim, kv_heads) of a layer."""
        if self.layer_types[layer] == FULL:
            return self.global_head_dim, self.num_global_key_value_heads
        return self.head_dim, self.num_key_value_heads

    @classmethod
    def from_hf(cls, hf: dict, **overrides):
        """Reads a Hugging Face `config.json` (as a dict) of `DiffusionGemmaForBlockDiffusion`."""
        t = hf.get("text_config", hf)
        rope = t.get("rope_parameters") or {}
        full_rope, sliding_rope = rope.get(FULL, {}), rope.get(SLIDING, {})
        layer_types = t["layer_types"]
        # transformers turns global_head_dim/num_global_key_value_heads into per_layer_config on save
        full_layers = [i for i, lt in enumerate(layer_types) if lt == FULL]
        per_layer = t.get("per_layer_config") or {}
        full_cfg = per_layer.get(str(full_layers[0]), {}) if full_layers else {}
        eos = t.get("eos_token_id", 1)
        kw = dict(
            vocab_size=t["vocab_size"], hidden_size=t["hidden_size"], intermediate_size=t["intermediate_size"],
            num_hidden_layers=t["num_hidden_layers"], num_attention_heads=t["num_attention_heads"],
            num_key_value_heads=t["num_key_value_heads"], head_dim=t["head_dim"],
            num_global_key_value_heads=t.get("num_global_key_value_heads",
                                             full_cfg.get("num_key_value_heads", t["num_key_value_heads"])),
            global_head_dim=t.get("global_head_dim", full_cfg.get("head_dim", t["head_dim"])),
            num_experts=t["num_experts"], top_k_experts=t["top_k_experts"],
            moe_intermediate_size=t["moe_intermediate_size"], sliding_window=t["sliding_window"],
            layer_types=layer_types,
            rope_theta=sliding_rope.get("rope_theta", 10000.0),
            global_rope_theta=full_rope.get("rope_theta", 1000000.0),
            global_partial_rotary_factor=full_rope.get("partial_rotary_factor", 0.25),
            rms_norm_eps=t.get("rms_norm_eps", 1e-6),
            final_logit_softcapping=t.get("final_logit_softcapping", 30.0),
            max_position_embeddings=t.get("max_position_embeddings", 262144),
            canvas_length=hf.get("canvas_length", 256),
            pad_token_id=t.get("pad_token_id", 0), bos_token_id=t.get("bos_token_id", 2),
            eos_token_id=eos[0] if isinstance(eos, list) else eos,
            vision_config=hf.get("vision_config"),
            image_token_id=hf.get("image_token_id", 258880), boi_token_id=hf.get("boi_token_id", 255999),
            eoi_token_id=hf.get("eoi_token_id", 258882),
        )
        unsupported = {k: t.get(k) for k in ("attention_bias", "hidden_activation") if k in t}
        activation = unsupported.get("hidden_activation", "gelu_pytorch_tanh")
        if unsupported.get("attention_bias") or activation != "gelu_pytorch_tanh":
            raise DiffusionGemmaError(f"config.json asks for {unsupported}, which this implementation does not support")
        kw.update(overrides)
        return cls(**kw)

    def to_hf(self) -> dict:
        """The `config.json` dict that transformers' DiffusionGemmaForBlockDiffusion loads."""
        full_layers = [i for i, lt in enumerate(self.layer_types) if lt == FULL]
        text = dict(
            model_type="diffusion_gemma_text", vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim, num_experts=self.num_experts, top_k_experts=self.top_k_experts,
            moe_intermediate_size=self.moe_intermediate_size, sliding_window=self.sliding_window,
            layer_types=self.layer_types, max_position_embeddings=self.max_position_embeddings,
            per_layer_config={str(i): {"head_dim": self.global_head_dim,
                                       "num_key_value_heads": self.num_global_key_value_heads} for i in full_layers},
            rope_parameters={
                SLIDING: {"rope_type": "default", "rope_theta": self.rope_theta},
                FULL: {"rope_type": "proportional", "rope_theta": self.global_rope_theta,
                       "partial_rotary_factor": self.global_partial_rotary_factor}},
            rms_norm_eps=self.rms_norm_eps, final_logit_softcapping=self.final_logit_softcapping,
            hidden_activation="gelu_pytorch_tanh", attention_bias=False, tie_word_embeddings=True,
            use_bidirectional_attention="vision", pad_token_id=self.pad_token_id,
            eos_token_id=self.eos_token_id, bos_token_id=self.bos_token_id)
        return dict(
            architectures=["DiffusionGemmaForBlockDiffusion"], model_type="diffusion_gemma",
            canvas_length=self.canvas_length, text_config=text, tie_word_embeddings=True,
            vision_config=self.vision_config or TINY_VISION_CONFIG,
            image_token_id=self.image_token_id, boi_token_id=self.boi_token_id, eoi_token_id=self.eoi_token_id)

    @classmethod
    def preset(cls, name: str, **overrides):
        if name not in PRESETS:
            raise DiffusionGemmaError(f"unknown config preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


# A one-layer vision tower config written into config.json of models without one, so that
# transformers can build the model; the tower is never used for text.
TINY_VISION_CONFIG = dict(model_type="gemma4_vision", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=2, head_dim=16)

PRESETS = {
    # the released google/diffusiongemma-26B-A4B-it text backbone: 25.25B parameters
    "26b-a4b": dict(vision_config=dict(model_type="gemma4_vision", hidden_size=1152, intermediate_size=4304,
                                       num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16,
                                       head_dim=72, patch_size=16, pooling_kernel_size=3, standardize=True)),
    # the same shape with 6 layers: ~5.4B parameters, for memory and speed experiments
    "26b-a4b-6l": dict(num_hidden_layers=6),
    # small models of the same architecture (MoE, both layer types, K=V) for tests and Sudoku
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, num_global_key_value_heads=1, global_head_dim=32,
                 num_experts=4, top_k_experts=2, moe_intermediate_size=32, sliding_window=8,
                 layer_types=[SLIDING, SLIDING, FULL], max_position_embeddings=1024, canvas_length=16,
                 image_token_id=511, boi_token_id=509, eoi_token_id=510),
    # Sudoku models (vocab: 5 special tokens + "0123456789\n"; the canvas is the 81 answer digits).
    # "sudoku" (11.6M parameters, 23 MB in bf16) is the bundled solver. "sudoku-small" trains on 2 CPU cores
    # in minutes: its RoPE base makes the second rotary frequency exactly 2*pi/9 rad per position
    # (base**(-2/head_dim) = 2*pi/9), so cells of one column, 9 positions apart, share that phase; its four
    # layers all see the whole canvas. Both choices made it learn faster (README.md, "CPU demo").
    "sudoku-small": dict(vocab_size=16, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=16,
                         rope_theta=(9 / (2 * math.pi)) ** (16 / 2), num_experts=4, top_k_experts=2,
                         moe_intermediate_size=128, sliding_window=256, layer_types=[SLIDING] * 4,
                         # the next two shape full layers only: unused here, kept small for tests that add some
                         num_global_key_value_heads=1, global_head_dim=32,
                         max_position_embeddings=512, canvas_length=81, image_token_id=15, boi_token_id=13,
                         eoi_token_id=14),
    "sudoku": dict(vocab_size=16, hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_global_key_value_heads=1,
                   global_head_dim=128, num_experts=8, top_k_experts=2, moe_intermediate_size=128,
                   sliding_window=256, layer_types=[SLIDING, SLIDING, SLIDING, FULL] * 2,
                   max_position_embeddings=512, canvas_length=81, image_token_id=15, boi_token_id=13,
                   eoi_token_id=14),
}


# -----------------------------------------------------------------------------
# Building blocks

def rms_norm(x, weight=None, eps=1e-6):
    """x / rms(x) * weight, computed in fp32 and cast back. Gemma 4: no `1 +` on the weight.
    F.rms_norm does exactly that (upcast, normalise, multiply by the weight, cast once), in one kernel
    on GPU: (x.float() * (x.float().pow(2).mean(-1) + eps) ** -0.5 * weight.float()).type_as(x)."""
    if weight is not None and weight.dtype != x.dtype:  # bf16 activations, fp32 weights (autocast training)
        weight = weight.to(x.dtype)                     # matching dtypes keep the fused kernel
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


def rope_inv_freq(head_dim, theta, rotary_factor=1.0):
    """Inverse frequencies [head_dim/2]. "Proportional" RoPE keeps the exponent's denominator at the
    full head_dim and gives the non-rotating pairs frequency 0, so they pass through unchanged."""
    n_rot = int(rotary_factor * head_dim // 2)
    inv = 1.0 / theta ** (torch.arange(0, 2 * n_rot, 2, dtype=torch.float) / head_dim)
    return torch.cat([inv, torch.zeros(head_dim // 2 - n_rot)])


def rope_cos_sin(positions, inv_freq, dtype):
    """positions [B, T] -> cos, sin [B, T, head_dim] (rotate-half layout), in fp32 then cast.
    The first half of sin is negated: it carries the sign of rotate_half (see apply_rope)."""
    freqs = positions[..., None].float() * inv_freq.to(positions.device)
    return torch.cat([freqs, freqs], -1).cos().to(dtype), torch.cat([-freqs, freqs], -1).sin().to(dtype)


def apply_rope(x, cos, sin):
    """x [B, T, heads, D]; dim i pairs with dim i + D/2 (NeoX "rotate half", not interleaved):
    x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1] = roll(x, D/2) * [-1, 1] (the -1 is in sin)."""
    return torch.addcmul(x * cos[:, :, None], x.roll(x.shape[-1] // 2, dims=-1), sin[:, :, None])


class Attention(nn.Module):
    def __init__(self, cfg: Config, layer: int):
        super().__init__()
        self.head_dim, self.kv_heads = cfg.attn_shape(layer)
        self.heads = cfg.num_attention_heads
        H, D = cfg.hidden_size, self.head_dim
        self.q_proj = nn.Linear(H, self.heads * D, bias=False)
        self.k_proj = nn.Linear(H, self.kv_heads * D, bias=False)
        # full layers have no v_proj: values are the raw k_proj output (K=V)
        self.v_proj = nn.Linear(H, self.kv_heads * D, bias=False) if cfg.layer_types[layer] == SLIDING else None
        self.o_proj = nn.Linear(self.heads * D, H, bias=False)
        self.q_norm = RMSNorm(D, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(D, cfg.rms_norm_eps)
        self.eps = cfg.rms_norm_eps
        self.softmax = masked_softmax  # the explicit attention's softmax (compile_layers swaps in a fused one)
        self.decode_kernel = False  # attend(kernel=): attend_decode, masked_softmax_rows (FastPath sets it on a GPU)
        self.flex = flex_attention  # attention under a BlockMask (FastPath: compiled, with its tiles; see block_mask)
        self.register_buffer("fused", None, persistent=False)  # q, k (, v) weights in one tensor: fuse_linears

    def forward(self, q, k, v, keys_values, mask):
        """q [B, heads, T, D], k, v [B, kv_heads, T, D] from project(); keys_values(k, v) -> the keys and values
        to attend to [B, kv_heads, S+T, D]: the cache's S, then this pass's own T (see KVCache.keys_values);
        mask [B, 1, T, K] additive over the K keys that keys_values returns (0 or -inf, see attention_bias),
        the same for every head, or a BlockMask of it (block_mask: a fast-path prefill chunk's sliding layers).
        Returns the output [B, T, H]."""
        B, _, T, _ = q.shape
        k_all, v_all = keys_values(k, v)
        # grouped-query attention without copying K/V: the G query heads of one KV head become G*T query
        # rows of that head (SDPA's fused kernels take no enable_gqa, and the 512-wide heads fit only one)
        G = self.heads // self.kv_heads
        q = q.reshape(B, self.kv_heads, G * T, self.head_dim)
        return self.output(attend(q, k_all, v_all, mask, self.softmax, kernel=self.decode_kernel, flex=self.flex), T)

    def output(self, y, T):
        """The heads' outputs y [B, kv, G*T, D] (G query heads of T rows per KV head) -> o_proj of their
        concatenation per token [B, T, H]."""
        B, G = y.shape[0], self.heads // self.kv_heads
        y = y.unflatten(2, (G, T)).permute(0, 3, 1, 2, 4).reshape(B, T, self.heads * self.head_dim)
        return linear(y, self.o_proj.weight)

    def projections(self):
        """The linears that read the normed input: q, k, and v where the layer has one."""
        return [self.q_proj, self.k_proj] + ([self.v_proj] if self.v_proj is not None else [])

    def project(self, x, cos, sin):
        """x [B, T, H] -> q [B, heads, T, D], k, v [B, kv_heads, T, D]: normed per head, RoPE on q and k. One compiled
        row on a GPU with Triton (an AR token) is normed and rotated by our kernel, norm_rope_one_token."""
        B, T, _ = x.shape
        if one_compiled_row(x) and self.fused is not None:
            out = norm_rope_one_token(linear(x, self.fused), self.q_norm.weight, self.k_norm.weight, cos, sin,
                                      self.heads, self.kv_heads, self.eps)
            q, k, v = out.split([self.heads, self.kv_heads, self.kv_heads])  # [heads or kv, D] each, one token
            return q.view(B, self.heads, T, -1), k.view(B, self.kv_heads, T, -1), v.view(B, self.kv_heads, T, -1)
        outs = linears_forward(x, self.projections(), self.fused)
        q = outs[0].view(B, T, self.heads, self.head_dim)
        k_raw = outs[1].view(B, T, self.kv_heads, self.head_dim)
        v_raw = outs[2].view(B, T, self.kv_heads, self.head_dim) if len(outs) == 3 else k_raw
        # q contiguous per head: compiled, inductor's norm/RoPE kernel writes it so, and forward's reshape is a view
        q = apply_rope(self.q_norm(q), cos, sin).transpose(1, 2).contiguous()  # [B, heads, T, D]
        k = apply_rope(self.k_norm(k_raw), cos, sin).transpose(1, 2)          # [B, kv, T, D]
        v = rms_norm(v_raw, None, self.eps).transpose(1, 2)                   # weightless norm, no RoPE
        return q, k, v


@torch.library.custom_op("diffusiongemma::norm_rope_one_token", mutates_args=())
def norm_rope_one_token(raw: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, cos: torch.Tensor,
                        sin: torch.Tensor, heads: int, kv_heads: int, eps: float) -> torch.Tensor:
    """Attention.project's norms and RoPE for one token, by one Triton kernel (norm_rope_kernel): raw [.., N], the
    fused q/k(/v) projection (N = (heads + kv_heads) * D, + kv_heads * D where the layer has v_proj, else v is k's
    raw output), q_weight, k_weight [D], cos, sin [.., D] -> [heads + 2 kv_heads, D]: the q heads normed with
    q_weight and rotated, the k heads normed with k_weight and rotated, the v heads normed without a weight, each
    rounded as the compiled project rounds it. One program per head. In place of inductor's three kernels for an
    AR token (q's, k's and v's: their row counts differ). A custom operator, so that compiled code launches it as
    it is."""
    D = q_weight.shape[0]
    rows = heads + 2 * kv_heads
    assert raw.numel() in ((heads + kv_heads) * D, rows * D) and D & (D - 1) == 0
    out = raw.new_empty(rows, D)
    v_start = (heads + kv_heads if raw.numel() == rows * D else heads) * D  # v's rows, or k's again (K=V)
    pdl = pdl_launch(raw.device)
    norm_rope_kernel[(rows,)](raw.contiguous(), q_weight, k_weight, cos.contiguous(), sin.contiguous(), out, heads,
                              kv_heads, v_start, eps, D=D, PDL=pdl, launch_pdl=pdl)
    return out


@norm_rope_one_token.register_fake
def _norm_rope_one_token_shape(raw, q_weight, k_weight, cos, sin, heads, kv_heads, eps):
    return raw.new_empty(heads + 2 * kv_heads, q_weight.shape[0])


if triton is not None:
    @triton.jit
    def norm_rope_kernel(raw_ptr, q_w_ptr, k_w_ptr, cos_ptr, sin_ptr, out_ptr, HEADS, KV, V_START, eps,
                         D: tl.constexpr, PDL: tl.constexpr):
        """out[h] = rope(rms_norm(raw[h], q_w)) for h < HEADS (q), rope(rms_norm(raw[h], k_w)) for the KV heads
        after them (k), rms_norm(raw[V_START + j]) for the KV heads after those (v); raw's rows of D, rope(y) =
        y * cos + roll(y, D/2) * sin (sin's first half carries rotate_half's sign, see apply_rope). The weights
        and cos, sin are read before gdc_wait (written before the kernel ahead), raw after."""
        h = tl.program_id(0)
        d = tl.arange(0, D)
        rolled = (d + D // 2) % D                                              # roll(y, D/2)[d] = y[rolled[d]]
        is_q, is_v = h < HEADS, h >= HEADS + KV
        w = tl.where(is_q, tl.load(q_w_ptr + d), tl.load(k_w_ptr + d)).to(tl.float32)
        w_rolled = tl.where(is_q, tl.load(q_w_ptr + rolled), tl.load(k_w_ptr + rolled)).to(tl.float32)
        w, w_rolled = tl.where(is_v, 1.0, w), tl.where(is_v, 1.0, w_rolled)
        cos = tl.load(cos_ptr + d).to(tl.float32)
        sin = tl.load(sin_ptr + d).to(tl.float32)
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        row = raw_ptr + tl.where(is_v, V_START + (h - HEADS - KV) * D, h * D)
        x = tl.load(row + d).to(tl.float32)
        x_rolled = tl.load(row + rolled).to(tl.float32)
        inv_rms = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
        # the norm rounded to raw's dtype (F.rms_norm's output), RoPE in fp32 and rounded once (as compiled)
        y = (x * inv_rms * w).to(raw_ptr.dtype.element_ty).to(tl.float32)
        y_rolled = (x_rolled * inv_rms * w_rolled).to(raw_ptr.dtype.element_ty).to(tl.float32)
        y = tl.where(is_v, y, y * cos + y_rolled * sin)
        tl.store(out_ptr + h * D + d, y.to(out_ptr.dtype.element_ty))


BMM_FP32_OUT = "dtype" in torch.ops.aten.bmm.overloads()  # torch.bmm(..., out_dtype=) (CUDA, torch >= 2.8)


def masked_softmax(scores, bias, dtype):
    """fp32 scores [B, kv, G*T, S] + additive bias [B, 1, T, S], the same for the G query heads of a KV head
    -> softmax over S, cast to dtype. Three passes over the largest tensor of a pass when eager;
    model.compile_layers() fuses them into one."""
    B, kv, R, S = scores.shape
    T = bias.shape[2]
    return torch.softmax(scores.view(B, kv, R // T, T, S) + bias[:, :, None], dim=-1).to(dtype).view(B, kv, R, S)


PREFILL_ROWS = 2048  # attend(): more query rows than this (G heads x T tokens) make a pass a prefill chunk


def attend(q, k, v, bias, softmax=masked_softmax, max_scores=2 ** 28, kernel=False, flex=flex_attention):
    """softmax(q k^T + bias) v per KV head, scale 1.0 (q and k are RMS-normalised per head):
    q [B, kv, R, D] (R = G*T query rows: G query heads of T tokens each), k, v [B, kv, S, D], bias [B, 1, T, S]
    (0 or -inf, shared by the G heads) -> [B, kv, R, D].
    SDPA's fused kernels spread only query rows over the GPU: with the few rows of a denoising step, a
    commit or an AR token they leave most of it idle (one AR query row: a handful of blocks walk all the
    keys). There, outside autograd, explicit matmuls run instead, with fp32 scores like the fused kernels,
    a few query heads at a time (or a part of one head's rows) so that each product's scores stay under max_scores
    (256M: 1 GiB).
    kernel=True (FastPath on an Ampere or later GPU, Attention.decode_kernel): one token's attention in bf16 (at
    most DECODE_ROWS query rows per KV head) runs attend_decode instead, two Triton kernels in place of three, and
    a prefill chunk's explicit softmax (the 512-wide full layers) runs masked_softmax_rows, one kernel.
    bias may instead be a BlockMask (block_mask: a fast-path prefill chunk's sliding layers): then `flex` (flex
    attention; FastPath's is compiled) computes only the blocks of keys the mask leaves visible."""
    B, kv, R, D = q.shape
    if isinstance(bias, BlockMask):  # q's G heads of T rows per KV head are G consecutive query heads
        T = bias.seq_lengths[0]
        return flex(q.view(B, R // T * kv, T, D), k, v, block_mask=bias, scale=1.0, enable_gqa=True).view(q.shape)
    T, S = bias.shape[2], k.shape[2]
    G = R // T
    # the fused kernels: for training; for many query rows (a prefill chunk) where a flash kernel takes the
    # heads (head_dim <= 256; the 512-wide full layers get only the memory-efficient kernel, which took as long
    # as the matmuls over 4k keys and was slower over more, README.md)
    long = R > PREFILL_ROWS
    if torch.is_grad_enabled() or (long and D <= 256):
        bias = bias[:, :, None].expand(B, 1, G, T, S).reshape(B, 1, R, S)  # SDPA wants a mask row per query row
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
    if long:  # a prefill chunk: its key count grows chunk by chunk, and the compiled softmax would recompile
        softmax = masked_softmax_rows if kernel else masked_softmax
    elif kernel and T == 1 and R <= DECODE_ROWS and q.dtype != torch.float32:
        return attend_decode(q, k, v, bias)
    pad = -S % 8  # keys that the bias hides, so that the products' rows align: without, cuBLAS ran several times
    if pad:       # slower (H200: a 26B full layer's 4,096-token chunk over 4,097 keys, 5.8 against 1.9 ms; README.md)
        k, v, bias = F.pad(k, (0, 0, 0, pad)), F.pad(v, (0, 0, 0, pad)), F.pad(bias, (0, pad), value=float("-inf"))
        S += pad
    heads_per_product = max_scores // (B * kv * T * S)  # query heads whose scores fit under max_scores
    k, v = k.flatten(0, 1), v.flatten(0, 1)
    if heads_per_product:  # [B, kv, g*T, D]: g whole query heads, and the whole bias
        parts = [(qs, bias) for qs in q.split(heads_per_product * T, dim=2)]
    else:  # not even one head fits (a long prompt's chunk): n of one head's T rows, and their rows of the bias
        n = max(1, max_scores // (B * kv * S))
        parts = [(qh[:, :, t:t + n], bias[:, :, t:t + n]) for qh in q.split(T, dim=2) for t in range(0, T, n)]
    out = []
    for qs, part_bias in parts:
        qs = qs.flatten(0, 1)
        if q.is_cuda and q.dtype != torch.float32 and BMM_FP32_OUT:
            scores = torch.bmm(qs, k.transpose(1, 2), out_dtype=torch.float32)  # fp32 sums of the bf16 products
        else:
            scores = torch.bmm(qs.float(), k.float().transpose(1, 2))
        probs = softmax(scores.view(B, kv, -1, S), part_bias, v.dtype)
        out.append(torch.bmm(probs.flatten(0, 1), v).view(B, kv, -1, D))
    return out[0] if len(out) == 1 else torch.cat(out, 2)


DECODE_ROWS = 16  # attend_decode: query rows per KV head (one token's G query heads), the kernel's row block


def attend_decode(q, k, v, bias, block_n=None, programs=264, warps=4, stages=2):
    """attend for one token (flash decoding): q [B, kv, R, D] with R <= DECODE_ROWS, k, v [B, kv, S, D] (views
    of the cache: the keys of a head contiguous, the heads evenly strided), bias [B, 1, 1, S] -> [B, kv, R, D].
    The keys are split into spans, about `programs` programs in all, so that the few query rows fill the GPU:
    each program runs an online softmax of its rows over its span's keys in registers (decode_span_kernel) and
    writes its output and log-sum-exp per row; a second kernel weights each span's output by its share of the
    whole softmax's denominator and sums them (decode_merge_kernel). fp32 sums of the products, bf16
    probabilities times v, as the explicit path's; fp32 runs too (Triton's interpreter, the CPU test). The
    settings: the faster in whole AR passes on an H200; a sweep of the kernels alone, their keys and values
    resident in L2, favoured one stage and 64 keys a block for both widths, which the passes did not (README.md).
    On Hopper and later both launch with programmatic dependent launch (pdl_launch)."""
    B, kv, R, D = q.shape
    S, BH = k.shape[2], B * kv
    assert R <= DECODE_ROWS and bias.shape[2] == 1
    for t in (k, v):
        assert t.stride(3) == 1 and t.stride(0) == kv * t.stride(1), "heads must be evenly strided"
    q, bias = q.contiguous(), bias.contiguous()
    block_n = block_n or (64 if D <= 256 else 32)
    splits = max(1, min(triton.cdiv(S, block_n), programs // BH))
    span = triton.cdiv(triton.cdiv(S, splits), block_n) * block_n  # whole key blocks per span
    splits = triton.cdiv(S, span)
    part = torch.empty(splits, BH, R, D, dtype=torch.float32, device=q.device)
    lse = torch.empty(splits, BH, R, dtype=torch.float32, device=q.device)
    BLOCK_D = triton.next_power_of_2(D)
    pdl = pdl_launch(q.device)
    decode_span_kernel[(BH, splits)](q, k, v, bias, part, lse, R, S, span, kv, D, k.stride(1), k.stride(2),
                                     v.stride(1), v.stride(2), BLOCK_M=DECODE_ROWS, BLOCK_N=block_n,
                                     BLOCK_D=BLOCK_D, PDL=pdl, num_warps=warps, num_stages=stages, launch_pdl=pdl)
    out = torch.empty(B, kv, R, D, dtype=q.dtype, device=q.device)
    block_dm = min(BLOCK_D, 64)
    decode_merge_kernel[(BH * R, triton.cdiv(D, block_dm))](part, lse, out, splits, BH * R, D,
                                                            BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=block_dm,
                                                            PDL=pdl, launch_pdl=pdl)
    return out


if triton is not None:
    @triton.jit
    def decode_span_kernel(q_ptr, k_ptr, v_ptr, bias_ptr, part_ptr, lse_ptr, R, S, SPAN, KV, D,
                           k_head, k_key, v_head, v_key,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr):
        """For head group bh (= b * KV + KV head) and span s of the keys: part[s, bh, r] = softmax over the span's
        keys of (q[bh, r] . k[bh, key] + bias[b, key]) times v[bh, key], lse[s, bh, r] = the log of that softmax's
        denominator (-inf where the span shows no key). q [BH, R, D], bias [B, S], part [splits, BH, R, D] (fp32),
        lse [splits, BH, R]; k, v: key n of head bh at bh * head + n * key. PDL: see pdl_launch."""
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        bh, s = tl.program_id(0), tl.program_id(1)
        BH = tl.num_programs(0)
        r = tl.arange(0, BLOCK_M)                                               # query rows (R of them real)
        d = tl.arange(0, BLOCK_D)
        r_ok, d_ok = r < R, d < D
        q = tl.load(q_ptr + (bh * R + r[:, None]) * D + d[None, :], mask=r_ok[:, None] & d_ok[None, :], other=0.0)
        m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)               # running maximum per row
        denom = tl.zeros((BLOCK_M,), dtype=tl.float32)                          # running sum of exp
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        lo = s * SPAN
        hi = tl.minimum(lo + SPAN, S)
        for n0 in range(lo, hi, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)                                      # [BLOCK_N] keys
            n_ok = n < hi
            kv_mask = n_ok[:, None] & d_ok[None, :]
            key = tl.load(k_ptr + bh * k_head + n[:, None] * k_key + d[None, :], mask=kv_mask, other=0.0)
            scores = tl.dot(q, tl.trans(key))                                   # [BLOCK_M, BLOCK_N], fp32
            bias = tl.load(bias_ptr + (bh // KV) * S + n, mask=n_ok, other=float("-inf")).to(tl.float32)
            scores += bias[None, :]
            m_new = tl.maximum(m, tl.max(scores, axis=1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)               # no key yet: exp(-inf) = 0
            p = tl.exp(scores - m_use[:, None])
            alpha = tl.exp(m - m_use)
            denom = denom * alpha + tl.sum(p, axis=1)
            value = tl.load(v_ptr + bh * v_head + n[:, None] * v_key + d[None, :], mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(value.dtype), value)
            m = m_new
        seen = denom > 0
        part = acc / tl.where(seen, denom, 1.0)[:, None]
        tl.store(part_ptr + ((s * BH + bh) * R + r[:, None]) * D + d[None, :], part,
                 mask=r_ok[:, None] & d_ok[None, :])
        lse = tl.where(seen, tl.where(m == float("-inf"), 0.0, m) + tl.log(denom), float("-inf"))
        tl.store(lse_ptr + (s * BH + bh) * R + r, lse, mask=r_ok)

    @triton.jit
    def decode_merge_kernel(part_ptr, lse_ptr, out_ptr, SPLITS, ROWS, D, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
                            PDL: tl.constexpr):
        """out[row, d] = sum over spans s of part[s, row, d] * exp(lse[s, row] - logsumexp_s lse[s, row]) for
        BLOCK_D columns d; part [SPLITS, ROWS, D] (fp32), lse [SPLITS, ROWS], out [ROWS, D] (q's dtype). PDL: see
        pdl_launch."""
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        row, j = tl.program_id(0), tl.program_id(1)
        s = tl.arange(0, BLOCK_S)
        d = j * BLOCK_D + tl.arange(0, BLOCK_D)
        s_ok, d_ok = s < SPLITS, d < D
        lse = tl.load(lse_ptr + s * ROWS + row, mask=s_ok, other=float("-inf"))
        share = tl.exp(lse - tl.max(lse, axis=0))  # every row sees one key at least (itself): max is finite
        share = share / tl.sum(share, axis=0)
        part = tl.load(part_ptr + (s[:, None] * ROWS + row) * D + d[None, :], mask=s_ok[:, None] & d_ok[None, :],
                       other=0.0)
        out = tl.sum(part * share[:, None], axis=0)
        tl.store(out_ptr + row * D + d, out.to(out_ptr.dtype.element_ty), mask=d_ok)


def masked_softmax_rows(scores, bias, dtype, block=1024, warps=8):
    """masked_softmax as one Triton kernel (a prefill chunk's full layers on a GPU, attend(kernel=True)): one
    program per row of scores reads it twice, for its max and sum of exp (online, block by block) and then to
    write the softmax in dtype. Eager masked_softmax makes three passes over the fp32 scores and writes two of
    them; the key count, a runtime argument here, grows chunk by chunk without recompiling anything.
    scores [B, kv, G*T, S] fp32, bias [B, 1, T, S] -> [B, kv, G*T, S] in dtype."""
    B, kv, R, S = scores.shape
    T = bias.shape[2]
    scores, bias = scores.contiguous(), bias.contiguous()
    out = torch.empty(B, kv, R, S, dtype=dtype, device=scores.device)
    softmax_rows_kernel[(B * kv * R,)](scores, bias, out, kv * R, T, S, BLOCK=block, num_warps=warps)
    return out


if triton is not None:
    @triton.jit
    def softmax_rows_kernel(x_ptr, bias_ptr, out_ptr, HEAD_ROWS, T, S, BLOCK: tl.constexpr):
        """Program `row` of the B * HEAD_ROWS rows of x [B, HEAD_ROWS, S] (HEAD_ROWS = kv * G * T): out[row] =
        softmax(x[row] + bias[b, t]) over S, where b = row // HEAD_ROWS and t = row % T (the query heads of a row
        block share the bias [B, T, S]). A row that sees no key gives NaN, as torch.softmax does."""
        row = tl.program_id(0)
        b, t = row // HEAD_ROWS, row % T
        x_row = x_ptr + row.to(tl.int64) * S
        bias_row = bias_ptr + (b * T + t).to(tl.int64) * S
        m = tl.full((), float("-inf"), dtype=tl.float32)                       # running max
        denom = tl.zeros((), dtype=tl.float32)                                  # running sum of exp(x - m)
        for s0 in range(0, S, BLOCK):
            col = s0 + tl.arange(0, BLOCK)
            ok = col < S
            x = tl.load(x_row + col, mask=ok, other=float("-inf")) + tl.load(bias_row + col, mask=ok, other=0.0)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)              # no key seen yet: exp(-inf) = 0
            denom = denom * tl.exp(m - shift) + tl.sum(tl.exp(x - shift), axis=0)
            m = m_new
        for s0 in range(0, S, BLOCK):
            col = s0 + tl.arange(0, BLOCK)
            ok = col < S
            x = tl.load(x_row + col, mask=ok, other=float("-inf")) + tl.load(bias_row + col, mask=ok, other=0.0)
            tl.store(out_ptr + row.to(tl.int64) * S + col, (tl.exp(x - m) / denom).to(out_ptr.dtype.element_ty),
                     mask=ok)


def softcap(logits, cap):
    """cap * tanh(logits / cap), in fp32: Gemma's final logit softcapping."""
    return cap * torch.tanh(logits.float() / cap)


def head_chunk(out, h, w, cap):
    """out[...] = softcap(h @ w^T, cap): one vocabulary chunk w [chunk, H] of the fast path's head, written into
    its slice out [..., chunk] of the fp32 logits (compile_layers fuses the softcap into one kernel per chunk)."""
    out.copy_(softcap(F.linear(h, w), cap))


def fuse_linears(linears):
    """Concatenates the weights of linears that read the same input into one tensor [sum of outputs, in] and
    makes each weight a view of its rows: one GEMM instead of several (larger, so nearer the memory
    bandwidth), every weight still stored once. For inference once the model has its final device and dtype
    (.to() would copy the views apart)."""
    fused = torch.cat([lin.weight.detach() for lin in linears])
    row = 0
    for lin in linears:
        lin.weight.data = fused[row:row + lin.out_features]
        row += lin.out_features
    return fused


def linears_forward(x, linears, fused=None):
    """[lin(x) for lin in linears], computed as one GEMM with the fused weight (fuse_linears) when there is
    one and autograd is off (gradients reach the weights only through the linears themselves)."""
    if fused is None or torch.is_grad_enabled():
        return [lin(x) for lin in linears]
    return linear(x, fused).split([lin.out_features for lin in linears], -1)


def compiled_on_gpu(x):
    """Whether x is inside torch.compile, for inference, on a GPU with Triton: where kernels of ours may take over
    from inductor's (one_compiled_row, routed_by_kernels)."""
    return torch.compiler.is_compiling() and not torch.is_grad_enabled() and x.is_cuda and triton is not None


KERNEL_ROUTED_ROWS = 1024  # routed_by_kernels: the most rows routed by our kernels (a canvas or two)


def routed_by_kernels(x):
    """Whether the rows x [N, H] are routed by our kernels (route_rows, sort_pairs_by_kernel): compiled_on_gpu,
    and at most KERNEL_ROUTED_ROWS of them (a denoising step's canvas; a commit's block and the next canvas). On an
    H200 a denoising step took 0.984x its time with them; a prefill chunk's thousands of rows keep inductor's
    kernels (a 4k prefill took 1.02x its time with ours; README.md)."""
    return x.shape[0] <= KERNEL_ROUTED_ROWS and compiled_on_gpu(x)


def one_compiled_row(x):
    """Whether x is one row (an AR token at batch 1) and compiled_on_gpu: where our one-row kernels (gemv,
    norm_rope_one_token, route_one_token) take over from inductor's."""
    return x.numel() == x.shape[-1] and compiled_on_gpu(x)


def linear(x, weight):
    """F.linear(x, weight) (no bias), except for one row under torch.compile on a GPU with Triton: then our GEMV
    kernel (gemv), launched with programmatic dependent launch, in place of cuBLAS's GEMV (and its split-K
    reduction), which launches without it. q/k/v, o_proj and the dense MLP use it: on an H200 the AR token took
    0.975x its time with cuBLAS (README.md)."""
    if one_compiled_row(x):
        return gemv(x, weight)
    return F.linear(x, weight)


def pow2_split(n):
    """A width n as two power-of-2 slices for a kernel that reads a whole row at once (tl.arange needs powers of 2):
    n1, the largest power of 2 <= n, read unmasked, then n2 >= n - n1 (0 if none), read masked to n."""
    n1 = 1 << (n.bit_length() - 1)
    return n1, triton.next_power_of_2(n - n1) if n > n1 else 0


GEMV_TILES = (2, 4)  # gemv: outputs per program, warps (the fastest in a sweep on an H200; README.md)


@torch.library.custom_op("diffusiongemma::gemv", mutates_args=())
def gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight) for one row x [..., K] (x.numel() == K), weight [N, K] -> [..., N], by one Triton kernel
    (gemv_kernel): each program reads a few rows of the weight whole into registers, then multiplies them by x in
    fp32. On Hopper (pdl_launch) it launches with programmatic dependent launch and reads its weights before it
    waits for the kernel ahead of it, x after. A custom operator, so that compiled code launches it as it is."""
    N, K = weight.shape
    assert x.numel() == K and weight.stride(1) == 1
    K1, K2 = pow2_split(K)
    out = x.new_empty(x.shape[:-1] + (N,))
    (block_n, warps), pdl = GEMV_TILES, pdl_launch(x.device)
    gemv_kernel[(triton.cdiv(N, block_n),)](x.contiguous(), weight, out, N, weight.stride(0), K=K, K1=K1, K2=K2,
                                           BLOCK_N=block_n, PDL=pdl, num_warps=warps, launch_pdl=pdl)
    return out


@gemv.register_fake
def _gemv_shape(x, weight):
    return x.new_empty(x.shape[:-1] + (weight.shape[0],))


if triton is not None:
    @triton.jit
    def gemv_kernel(x_ptr, w_ptr, out_ptr, N, w_row, K: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
                    BLOCK_N: tl.constexpr, PDL: tl.constexpr):
        """out[n] = sum_k w[n, k] x[k] for BLOCK_N rows n: the columns below K1 as one slice, the K2 after them
        masked to K. PDL: the weights are read before gdc_wait (nothing writes them during a pass), x after; the
        next kernel launches when this one ends (letting it launch at the wait was slower, README.md)."""
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < N
        c1 = tl.arange(0, K1)
        w1 = tl.load(w_ptr + n[:, None] * w_row + c1[None, :], mask=n_ok[:, None], other=0.0)
        if K2 > 0:
            c2 = K1 + tl.arange(0, K2)
            w2 = tl.load(w_ptr + n[:, None] * w_row + c2[None, :], mask=n_ok[:, None] & (c2 < K)[None, :], other=0.0)
        if PDL:
            tl.extra.cuda.gdc_wait()
        acc = tl.sum(w1.to(tl.float32) * tl.load(x_ptr + c1).to(tl.float32)[None, :], axis=1)
        if K2 > 0:
            x2 = tl.load(x_ptr + c2, mask=c2 < K, other=0.0).to(tl.float32)
            acc += tl.sum(w2.to(tl.float32) * x2[None, :], axis=1)
        tl.store(out_ptr + n, acc.to(out_ptr.dtype.element_ty), mask=n_ok)


class MLP(nn.Module):
    """Gated GELU-tanh MLP: down(gelu(gate(x)) * up(x))."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.register_buffer("fused", None, persistent=False)  # gate and up weights in one tensor: fuse_linears

    def forward(self, x):
        gate, up = linears_forward(x, [self.gate_proj, self.up_proj], self.fused)
        return linear(F.gelu(gate, approximate="tanh") * up, self.down_proj.weight)


class Router(nn.Module):
    """Gemma 4 router: reads the raw residual, not the normed one."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.proj = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(cfg.hidden_size))
        self.per_expert_scale = nn.Parameter(torch.ones(cfg.num_experts))
        self.top_k, self.eps = cfg.top_k_experts, cfg.rms_norm_eps

    def forward(self, x):
        """x [N, H] -> weights [N, k] (fp32), expert ids [N, k]."""
        z = rms_norm(x, None, self.eps) * self.scale * x.shape[-1] ** -0.5
        logits = self.proj(z)
        if routed_by_kernels(x):  # the rest by our kernel: one program per row (route_rows)
            return route_rows(logits, self.per_expert_scale, self.top_k)
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)  # over all experts
        # the top k by a sort of all E: compiled, one Triton kernel with the softmax (topk stays two aten kernels)
        weights, ids = probs.sort(dim=-1, descending=True)
        weights, ids = weights[:, :self.top_k], ids[:, :self.top_k]
        weights = weights / weights.sum(-1, keepdim=True)
        return weights * self.per_expert_scale[ids], ids


ROUTER_TILE, ROUTER_WARPS = 1, 4  # route_one_token: experts and warps per program of router_kernel (README.md)


@torch.library.custom_op("diffusiongemma::route_one_token", mutates_args=())
def route_one_token(x: torch.Tensor, scale: torch.Tensor, proj: torch.Tensor, per_expert_scale: torch.Tensor,
                    norm: torch.Tensor, top_k: int, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Router.forward and the experts' input norm for one token x [1, H], by two Triton kernels: -> weights [1, k]
    (fp32), expert ids [1, k] (int64), rms_norm(x, norm) [1, H]. router_kernel: each program norms the token itself
    and computes a few experts' logits, and a slice of the experts' norm; top_k_kernel, one program: the softmax,
    the top k (by rank, the lowest id first among equal probabilities) and the renormalised weights. They replace
    inductor's four kernels for an AR token (the router's norm, its product with the softmax and sort, the renorm,
    the experts' norm): on an H200 the token took 0.98x its time (README.md). On Hopper both launch with
    programmatic dependent launch: router_kernel reads its weights before it waits and lets top_k_kernel start;
    the experts' kernel after them launches as top_k_kernel retires (launched early, its thousands of waiting
    programs kept the dense MLP's stream off the SMs: 1.03x). A custom operator, so that compiled code launches
    the kernels as they are."""
    H, (E, _) = x.shape[-1], proj.shape
    assert x.shape == (1, H) and proj.is_contiguous()
    programs = triton.cdiv(E, ROUTER_TILE)
    logits = torch.empty(E, dtype=torch.float32, device=x.device)
    weights = torch.empty(1, top_k, dtype=torch.float32, device=x.device)
    ids = torch.empty(1, top_k, dtype=torch.int64, device=x.device)
    normed = torch.empty_like(x)
    (H1, H2), slice_ = pow2_split(H), triton.cdiv(H, programs)
    pdl = pdl_launch(x.device)
    router_kernel[(programs,)](
        x.contiguous(), scale, proj, norm, logits, normed, E, eps, H ** -0.5, slice_, H=H, H1=H1, H2=H2,
        BLOCK_E=ROUTER_TILE, BLOCK_X=triton.next_power_of_2(slice_), PDL=pdl, num_warps=ROUTER_WARPS,
        launch_pdl=pdl)
    top_k_kernel[(1,)](logits, per_expert_scale, weights, ids, E, top_k, BLOCK_E=triton.next_power_of_2(E), PDL=pdl,
                       launch_pdl=pdl)
    return weights, ids, normed


@route_one_token.register_fake
def _route_one_token_shape(x, scale, proj, per_expert_scale, norm, top_k, eps):
    return (x.new_empty(1, top_k, dtype=torch.float32), x.new_empty(1, top_k, dtype=torch.int64),
            torch.empty_like(x))


@torch.library.custom_op("diffusiongemma::route_rows", mutates_args=())
def route_rows(logits: torch.Tensor, per_expert_scale: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Router.forward after its product, for the rows of a compiled pass on a GPU: logits [N, E] -> weights [N, k]
    (fp32), expert ids [N, k] (int64), by top_k_kernel with one program per row (the softmax, the top k by rank
    with the lowest id first among equal probabilities, as a stable sort orders them, the renormalised weights).
    It replaces inductor's sort of all E probabilities per row (compiled with the softmax: 16 us per layer of a
    denoising step on an H200; README.md)."""
    N, E = logits.shape
    weights = torch.empty(N, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(N, top_k, dtype=torch.int64, device=logits.device)
    pdl = pdl_launch(logits.device)
    top_k_kernel[(N,)](logits.contiguous(), per_expert_scale, weights, ids, E, top_k,
                       BLOCK_E=triton.next_power_of_2(E), PDL=pdl, launch_pdl=pdl)
    return weights, ids


@route_rows.register_fake
def _route_rows_shape(logits, per_expert_scale, top_k):
    N = logits.shape[0]
    return logits.new_empty(N, top_k, dtype=torch.float32), logits.new_empty(N, top_k, dtype=torch.int64)


if triton is not None:
    @triton.jit
    def router_kernel(x_ptr, scale_ptr, w_ptr, norm_ptr, logits_ptr, normed_ptr, E, eps, h_scale, SLICE,
                      H: tl.constexpr, H1: tl.constexpr, H2: tl.constexpr, BLOCK_E: tl.constexpr,
                      BLOCK_X: tl.constexpr, PDL: tl.constexpr):
        """logits[e] = (rms_norm(x) * scale * h_scale) . w[e], rounded as Router.forward rounds them, for BLOCK_E
        experts e, and normed[j] = rms_norm(x, norm)[j] for SLICE columns j; x, scale, norm [H] (the columns below
        H1 as one slice, the H2 after them masked to H), w [E, H]."""
        p = tl.program_id(0)
        e = p * BLOCK_E + tl.arange(0, BLOCK_E)
        e_ok = e < E
        c1 = tl.arange(0, H1)
        w1 = tl.load(w_ptr + e[:, None] * H + c1[None, :], mask=e_ok[:, None], other=0.0).to(tl.float32)
        s1 = tl.load(scale_ptr + c1).to(tl.float32)
        if H2 > 0:
            c2 = H1 + tl.arange(0, H2)
            w2 = tl.load(w_ptr + e[:, None] * H + c2[None, :], mask=e_ok[:, None] & (c2 < H)[None, :],
                         other=0.0).to(tl.float32)
            s2 = tl.load(scale_ptr + c2, mask=c2 < H, other=0.0).to(tl.float32)
        j = p * SLICE + tl.arange(0, BLOCK_X)
        j_ok = (j < (p + 1) * SLICE) & (j < H)
        g = tl.load(norm_ptr + j, mask=j_ok, other=0.0).to(tl.float32)
        if PDL:  # x is the kernel ahead's
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        x1 = tl.load(x_ptr + c1).to(tl.float32)
        squares = tl.sum(x1 * x1, axis=0)
        if H2 > 0:
            x2 = tl.load(x_ptr + c2, mask=c2 < H, other=0.0).to(tl.float32)
            squares += tl.sum(x2 * x2, axis=0)
        inv_rms = 1.0 / tl.sqrt(squares / H + eps)
        # rms_norm(x) in x's dtype, as F.rms_norm returns it, then scale and h_scale in fp32 (as compiled)
        z1 = (x1 * inv_rms).to(x_ptr.dtype.element_ty).to(tl.float32) * s1 * h_scale
        logit = tl.sum(w1 * z1[None, :], axis=1)
        if H2 > 0:
            z2 = (x2 * inv_rms).to(x_ptr.dtype.element_ty).to(tl.float32) * s2 * h_scale
            logit += tl.sum(w2 * z2[None, :], axis=1)
        tl.store(logits_ptr + e, logit.to(x_ptr.dtype.element_ty).to(tl.float32), mask=e_ok)
        xj = tl.load(x_ptr + j, mask=j_ok, other=0.0).to(tl.float32)
        tl.store(normed_ptr + j, (xj * inv_rms * g).to(normed_ptr.dtype.element_ty), mask=j_ok)

    @triton.jit
    def top_k_kernel(logits_ptr, expert_scale_ptr, weights_ptr, ids_ptr, E, K, BLOCK_E: tl.constexpr,
                     PDL: tl.constexpr):
        """Program n: row n's E logits -> the top K experts' ids, most probable first, and their weights:
        softmax, the top K renormalised to sum to 1, times expert_scale. logits [N, E]; weights, ids [N, K]."""
        n = tl.program_id(0)
        if PDL:
            tl.extra.cuda.gdc_wait()
        a = tl.arange(0, BLOCK_E)
        logits = tl.load(logits_ptr + n * E + a, mask=a < E, other=float("-inf")).to(tl.float32)
        probs = tl.exp(logits - tl.max(logits, axis=0))
        probs = probs / tl.sum(probs, axis=0)                                    # [BLOCK_E], 0 past E
        # each expert's rank: how many come before it (a larger probability, or an equal one and a lower id)
        before = (probs[:, None] > probs[None, :]) | ((probs[:, None] == probs[None, :]) & (a[:, None] < a[None, :]))
        rank = tl.sum(before.to(tl.int32), axis=0)                               # [BLOCK_E]
        top = (rank < K) & (a < E)
        total = tl.sum(tl.where(top, probs, 0.0), axis=0)
        scale = tl.load(expert_scale_ptr + a, mask=top, other=0.0).to(tl.float32)
        tl.store(weights_ptr + n * K + rank, probs / total * scale, mask=top)
        tl.store(ids_ptr + n * K + rank, a.to(tl.int64), mask=top)
        if PDL:  # the kernel after this one may launch as it retires (it still waits for these writes)
            tl.extra.cuda.gdc_launch_dependents()


FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448


def quantize_fp8(x):
    """x [..., K] -> (float8 e4m3 values, fp32 decode scale per row [...]): x ~= values * scale[..., None]."""
    scale = x.abs().amax(-1).float().clamp(min=1e-12) / FP8_MAX
    return (x.float() / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


FEW_ROWS = 4096  # grouped_mm: up to this many rows (pairs: a 256-token canvas has 2,048) run grouped_mm_few_rows
# with its default tiles (float8 experts with FP8_TILES); more rows (a prefill chunk: 256 per expert on average at
# 4,096 tokens) with MANY_ROWS_TILES
FP8_TILES = dict(block_k=128, stages=4)  # float8 tiles are half the bytes: twice the reduction per step (README.md)
MANY_ROWS_TILES = dict(block_m=128, block_n=256, block_k=64, warps=8, stages=4)


def grouped_mm(x, w, offsets, scale=None, kernel=False, rows=None, out_rows=None):
    """Rows of x [P, in], grouped by expert (offsets [E]: each group's end row), times their expert's
    w [E, out, in] transposed -> [P, out]. A float8 w (Experts.to_fp8) comes with a decode scale per output row,
    scale [E, out]; then each row of x is quantised to float8 with a scale of its own too. rows [P] (optional):
    grouped row r is x[rows[r]] (x may then have any number of rows); out_rows [P] (optional, a permutation):
    grouped row r's product goes to output row out_rows[r]. kernel=True (FastPath on an Ampere or later GPU, for
    float8 an sm89 or later one: Experts.few_rows_kernel): in bf16, outside autograd, our Triton kernel
    (grouped_mm_few_rows) runs, which reads and writes rows where they are: up to FEW_ROWS rows with its default
    tiles (FP8_TILES for float8; they stream the weights faster), else with MANY_ROWS_TILES (a prefill chunk: on
    an H200 a 4k prefill took 0.95x its time with aten's grouped GEMM, README.md). Otherwise grouped_mm_sorted runs
    on the gathered rows and its products are gathered back by out_rows' inverse (compiled, that gather fuses into
    the kernel that reads the output)."""
    P = x.shape[0] if rows is None else rows.shape[0]
    if kernel and x.dtype == torch.bfloat16 and not torch.is_grad_enabled():
        tiles = MANY_ROWS_TILES if P > FEW_ROWS else FP8_TILES if scale is not None else {}
        return grouped_mm_few_rows(x, w, offsets, rows, out_rows, scale, **tiles)
    out = grouped_mm_sorted(x if rows is None else x[rows], w, offsets, scale)
    if out_rows is None:
        return out
    return out[invert_permutation(out_rows)]  # output row i is the grouped row j with out_rows[j] = i


def grouped_mm_sorted(x, w, offsets, scale=None):
    """grouped_mm's rows in order, by aten's grouped GEMM. With a float8 w and its scale [E, out], both operands
    are dequantised first (x quantised per row and back) and multiplied in x's dtype: a copy of the whole
    projection, so this is the reference that the kernel's tests compare with, not a fast path."""
    if scale is not None:
        xq, x_scale = quantize_fp8(x)
        x, w = (xq.float() * x_scale[:, None]).to(x.dtype), (w.float() * scale[..., None]).to(x.dtype)
    return torch._grouped_mm(x, w.transpose(1, 2), offs=offsets)


def grouped_mm_few_rows(x, w, offsets, rows=None, out_rows=None, scale=None, block_m=64, block_n=128, block_k=64,
                        warps=8, stages=None):
    """grouped_mm for a few rows per expert, as in a denoising step or a commit: each
    program reads one tile of block_n output rows of one expert's w, for all of that expert's rows of x
    (block_m at a time), so the pass streams the weights and little else. Consecutive programs read neighbouring
    tiles of one expert, and a short reduction (K <= 1,024: the down projection) keeps 4 tiles in flight instead
    of 3. At the 26B shape and 256 tokens a denoising step's 60 expert GEMMs took 11.5 ms, about 95% of the H200's
    copy bandwidth, against 16 ms for aten's (the tiles and the order: the fastest of sweeps there; README.md).
    Many rows per expert (a 2,048-token prefill chunk) re-read the tiles: with these tiles it was 1.8x slower than
    aten's there, with MANY_ROWS_TILES (128 x 256) 1.03-1.26x faster (gate/up and down, uniform and skewed
    routing; it multiplies the padding of an expert's last block too, and smaller blocks for that last one were
    slower). A float8 w (with its scale [E, N]): x is quantised per row, tl.dot multiplies the float8 tiles as
    they arrive, and each sum is multiplied by its row's and its column's scale at the end. At a canvas's shapes
    (H200) gate/up took 134 us and down 79 us, against 251 and 130 in bf16 (floors 118 and 59); widening the
    float8 weights to bf16 in the kernel instead took 208 and 121 (README.md). fp32 runs too (the CPU test runs it
    so in Triton's interpreter), but on the GPU tl.dot would round it to tf32: grouped_mm sends it bf16 only."""
    K = x.shape[1]
    P = x.shape[0] if rows is None else rows.shape[0]
    E, N, _ = w.shape
    out = torch.empty(P, N, dtype=x.dtype, device=x.device)
    x_scale = None
    if scale is not None:
        x, x_scale = quantize_fp8(x)
    x, w = x.contiguous(), w.contiguous()
    block_n = min(block_n, max(16, triton.next_power_of_2(N)))  # tiles no larger than a small model needs
    block_k = min(block_k, max(16, triton.next_power_of_2(K)))
    stages = stages or (4 if K <= 1024 else 3)
    grouped_mm_kernel[(triton.cdiv(N, block_n), E)](
        x, w, out, offsets, x if rows is None else rows, x if out_rows is None else out_rows,
        x if scale is None else x_scale, x if scale is None else scale.contiguous(), N, K,
        GATHER=rows is not None, SCATTER=out_rows is not None, FP8=scale is not None, BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages)
    return out


if triton is not None:
    @triton.jit
    def grouped_mm_kernel(x_ptr, w_ptr, out_ptr, ends_ptr, rows_ptr, out_rows_ptr, x_scale_ptr, w_scale_ptr, N, K,
                          GATHER: tl.constexpr, SCATTER: tl.constexpr, FP8: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """out[m', n] = sum_k x[m'', k] w[e, n, k] for the grouped rows m of expert e, where m'' = rows[m] if
        GATHER else m, and m' = out_rows[m] if SCATTER else m: x [*, K], w [E, N, K], out [P, N] (contiguous),
        ends [E] (the end row of each expert's group). FP8: x and w are float8, and the sums are multiplied by
        x_scale[m''] and w_scale[e, n]. Program (j, e): expert e, output columns j*BLOCK_N
        onwards (so consecutive programs read consecutive tiles of w); an expert without rows reads nothing."""
        e = tl.program_id(1)
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)                  # [BLOCK_N] output columns
        k = tl.arange(0, BLOCK_K)
        start = tl.load(ends_ptr + e - 1, mask=e > 0, other=0)
        end = tl.load(ends_ptr + e)
        w_tile = w_ptr + e.to(tl.int64) * N * K + n[:, None] * K + k[None, :]   # [BLOCK_N, BLOCK_K] pointers
        for m0 in range(start, end, BLOCK_M):
            m = m0 + tl.arange(0, BLOCK_M)                                      # [BLOCK_M] grouped rows
            m_ok = m[:, None] < end
            src, dst = m, m                                                     # their rows of x and of out
            if GATHER:
                src = tl.load(rows_ptr + m, mask=m < end, other=0)
            if SCATTER:
                dst = tl.load(out_rows_ptr + m, mask=m < end, other=0)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                k_ok = k[None, :] < K - k0
                a = tl.load(x_ptr + src[:, None] * K + (k0 + k)[None, :], mask=m_ok & k_ok, other=0.0)
                b = tl.load(w_tile + k0, mask=(n[:, None] < N) & k_ok, other=0.0)
                acc = tl.dot(a, tl.trans(b), acc)
            if FP8:
                acc *= tl.load(x_scale_ptr + src, mask=m < end, other=0.0)[:, None]
                acc *= tl.load(w_scale_ptr + e * N + n, mask=n < N, other=0.0)[None, :]
            tl.store(out_ptr + dst[:, None] * N + n[None, :], acc.to(out_ptr.dtype.element_ty),
                     mask=m_ok & (n[None, :] < N))


class Experts(nn.Module):
    """The routed experts, stored packed as in the checkpoint: gate_up_proj [E, 2I, H] (gate rows
    first), down_proj [E, H, I]. Two ways to run them, tested equal:
      * `loop`: one small matmul pair per expert that got tokens (plain, readable: the reference);
      * `grouped`: sort the (token, expert) pairs by expert and run one grouped GEMM per projection
        (grouped_mm: our Triton kernel where FastPath sets few_rows_kernel, else torch._grouped_mm), with no
        host synchronisation: the fast path on GPU, where a lone token (an AR step at batch 1) runs two Triton
        kernels of ours instead (one_token_experts), which read its k experts in place.
    to_fp8() stores them in float8 (a scale per row) for the grouped path, a lone token's too: faster, and an
    approximation."""

    def __init__(self, cfg: Config):
        super().__init__()
        E, H, I = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, H))
        self.down_proj = nn.Parameter(torch.empty(E, H, I))
        self.impl = "loop"  # or "grouped"
        self.few_rows_kernel = False  # grouped_mm_few_rows, and one_token_experts (FastPath sets it on a GPU)
        self.gate_up_scale = self.down_scale = None  # per-row decode scales once to_fp8() has run

    @torch.no_grad()
    def to_fp8(self):
        """Stores both projections as float8 e4m3 with one fp32 scale per output row of each expert: half
        the bytes a pass streams, at the cost of exactness (inference only; runs grouped; call it before
        FastPath, which picks the kernels). Quantised one expert at a time: the extra memory is one projection's
        float8 copy and one expert's fp32 temporaries."""
        for name in ("gate_up_proj", "down_proj"):
            w = getattr(self, name)
            q = torch.empty(w.shape, dtype=FP8, device=w.device)
            scale = torch.empty(w.shape[:2], dtype=torch.float32, device=w.device)
            for e in range(w.shape[0]):
                q[e], scale[e] = quantize_fp8(w[e])
            setattr(self, name, nn.Parameter(q, requires_grad=False))
            setattr(self, name.replace("_proj", "_scale"), scale)
        self.impl = "grouped"
        return self

    def forward(self, x, weights, ids):
        """x [N, H], weights/ids [N, k] -> [N, H]"""
        if self.impl == "loop":
            return self.forward_loop(x, weights, ids)
        # one token (an AR step at batch 1) where FastPath picked our kernels: its k experts read in place;
        # float8 experts run grouped (a lone token's float8 experts gathered in place were 1.18x slower: README.md)
        if x.shape[0] == 1 and self.few_rows_kernel and self.gate_up_scale is None and not torch.is_grad_enabled():
            return one_token_experts(x, self.gate_up_proj, self.down_proj, weights, ids)
        return self.forward_grouped(x, weights, ids)

    def forward_loop(self, x, weights, ids):
        out = torch.zeros_like(x)
        for e in ids.unique().tolist():
            token, slot = torch.where(ids == e)
            gate, up = F.linear(x[token], self.gate_up_proj[e]).chunk(2, dim=-1)
            y = F.linear(F.gelu(gate, approximate="tanh") * up, self.down_proj[e])
            out.index_add_(0, token, (y * weights[token, slot, None]).to(x.dtype))
        return out

    def forward_grouped(self, x, weights, ids):
        N, k = ids.shape
        E = self.gate_up_proj.shape[0]
        order, offsets = sort_pairs(ids.reshape(-1), E, kernel=routed_by_kernels(x))
        token = order // k                                           # the token of each sorted pair
        # under autocast (training) the GEMMs run in the autocast dtype, like nn.Linear does
        dt = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        fp8 = self.gate_up_scale is not None
        # sorted row r reads token[r]'s row of x (our kernel in place; else a gather)
        h = grouped_mm(x.to(dt), self.gate_up_proj if fp8 else self.gate_up_proj.to(dt), offsets, self.gate_up_scale,
                       self.few_rows_kernel, rows=token)             # [N*k, 2I], sorted by expert
        gate, up = h.chunk(2, dim=-1)                                # [N*k, I] each
        # the routing weight scales the expert's hidden state (down_proj is linear: the same as scaling its output)
        act = (F.gelu(gate, approximate="tanh") * up * weights.reshape(-1)[order, None]).to(dt)
        # each sorted row's product is written back to its pair's row, n * k + j (our kernel as it stores)
        y = grouped_mm(act, self.down_proj if fp8 else self.down_proj.to(dt), offsets, self.down_scale,
                       self.few_rows_kernel, out_rows=order)         # [N*k, H], in pair order
        # each token's sum over its k experts in fp32, as k slices added: compiled, elementwise, fused with the
        # branch's norm (8.2 us per layer in an H200's denoise pass; a sum over the middle dim took 14.9; README.md)
        slices = y.view(N, k, -1).unbind(1)                          # k x [N, H]
        total = slices[0].float()
        for s in slices[1:]:
            total = total + s.float()
        return total.to(x.dtype)


ONE_TOKEN_TILES = ((1, 1), (1, 1))  # one_token_experts: outputs per program and warps, gate/up then down (README.md)


@torch.library.custom_op("diffusiongemma::one_token_experts", mutates_args=())
def one_token_experts(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, weights: torch.Tensor,
                      ids: torch.Tensor) -> torch.Tensor:
    """Experts.forward_loop for one token by two Triton kernels that read its k experts in place: x [1, H],
    gate_up [E, 2I, H], down [E, H, I], weights, ids [1, k] -> [1, H]. expert_gate_up_kernel: for each pair and a
    few of its expert's I hidden units, the gate and up rows (all of H at once) times x in fp32, then
    gelu(gate) * up * the pair's routing weight, rounded to x's dtype (as forward_grouped rounds it);
    expert_down_kernel: for a few outputs, the k experts' down rows times those activations, summed in fp32. On
    Hopper both launch with programmatic dependent launch: the first waits before its first read (the rows to read
    depend on the router's ids), then lets the second start, which reads its weights while the first runs and
    waits for the activations (an AR token 0.994x, README.md). A custom operator, so that compiled code launches
    them as they are."""
    E, I2, H = gate_up.shape
    I, k = I2 // 2, ids.shape[1]
    assert x.shape == (1, H) and gate_up.is_contiguous() and down.is_contiguous()
    (up_n, up_warps), (down_n, down_warps) = ONE_TOKEN_TILES
    pdl = pdl_launch(x.device)
    ids = ids.contiguous()
    (H1, H2), (I1, I2) = pow2_split(H), pow2_split(I)
    act = x.new_empty(k, I)
    expert_gate_up_kernel[(k, triton.cdiv(I, up_n))](
        x.contiguous(), gate_up, ids, weights.contiguous(), act, I, H=H, H1=H1, H2=H2, BLOCK_N=up_n, PDL=pdl,
        num_warps=up_warps, launch_pdl=pdl)
    out = x.new_empty(1, H)
    expert_down_kernel[(triton.cdiv(H, down_n),)](
        act, down, ids, out, H, k, I=I, I1=I1, I2=I2, BLOCK_K=triton.next_power_of_2(k), BLOCK_N=down_n, PDL=pdl,
        num_warps=down_warps, launch_pdl=pdl)
    return out


@one_token_experts.register_fake
def _one_token_experts_shape(x, gate_up, down, weights, ids):
    return torch.empty_like(x)


if triton is not None:
    @triton.jit
    def gelu_tanh(g):
        """gelu(g, approximate="tanh") = g * (1 + tanh(z)) / 2 = g * sigmoid(2z), z = sqrt(2/pi) (g + 0.044715 g^3)"""
        return g * tl.sigmoid(1.5957691216057308 * (g + 0.044715 * g * g * g))

    @triton.jit
    def expert_gate_up_kernel(x_ptr, w_ptr, ids_ptr, weights_ptr, act_ptr, I, H: tl.constexpr, H1: tl.constexpr,
                              H2: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr):
        """act[j, i] = gelu(w[e, i] . x) * (w[e, I + i] . x) * weights[j], e = ids[j], for BLOCK_N units i of pair
        j; w [E, 2I, H]: the columns below H1 as one slice, the H2 after them masked to H."""
        j = tl.program_id(0)
        i = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        i_ok = i < I
        if PDL:  # the ids are the router's: wait, then let expert_down_kernel start reading its weights
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        rows = w_ptr + tl.load(ids_ptr + j).to(tl.int64) * (2 * I * H) + i[:, None] * H  # the gate rows
        c1 = tl.arange(0, H1)
        gate = tl.load(rows + c1[None, :], mask=i_ok[:, None], other=0.0).to(tl.float32)
        up = tl.load(rows + I * H + c1[None, :], mask=i_ok[:, None], other=0.0).to(tl.float32)
        x1 = tl.load(x_ptr + c1).to(tl.float32)[None, :]
        g, u = tl.sum(gate * x1, axis=1), tl.sum(up * x1, axis=1)
        if H2 > 0:
            c2 = H1 + tl.arange(0, H2)
            m2 = i_ok[:, None] & (c2 < H)[None, :]
            gate2 = tl.load(rows + c2[None, :], mask=m2, other=0.0).to(tl.float32)
            up2 = tl.load(rows + I * H + c2[None, :], mask=m2, other=0.0).to(tl.float32)
            x2 = tl.load(x_ptr + c2, mask=c2 < H, other=0.0).to(tl.float32)[None, :]
            g += tl.sum(gate2 * x2, axis=1)
            u += tl.sum(up2 * x2, axis=1)
        act = gelu_tanh(g) * u * tl.load(weights_ptr + j)
        tl.store(act_ptr + j * I + i, act.to(act_ptr.dtype.element_ty), mask=i_ok)

    @triton.jit
    def expert_down_kernel(act_ptr, w_ptr, ids_ptr, out_ptr, H, K, I: tl.constexpr, I1: tl.constexpr,
                           I2: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr):
        """out[h] = sum over the K pairs j and the units i of w[ids[j], h, i] act[j, i], for BLOCK_N outputs h;
        w [E, H, I], act [K, I]: the units below I1 as one slice, the I2 after them masked to I."""
        h = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        j = tl.arange(0, BLOCK_K)
        ok = (j < K)[:, None, None] & (h < H)[None, :, None]                                   # [BLOCK_K, BN, 1]
        # the ids were written before expert_gate_up_kernel waited, and that kernel lets this one start only after
        # its wait: this kernel reads them, and its weights, while that one runs, then waits for the activations
        e = tl.load(ids_ptr + j, mask=j < K, other=0).to(tl.int64)
        rows = w_ptr + e[:, None, None] * (H * I) + h[None, :, None] * I
        c1 = tl.arange(0, I1)[None, None, :]
        w1 = tl.load(rows + c1, mask=ok, other=0.0)
        if I2 > 0:
            c2 = I1 + tl.arange(0, I2)[None, None, :]
            w2 = tl.load(rows + c2, mask=ok & (c2 < I), other=0.0)
        if PDL:
            tl.extra.cuda.gdc_wait()
        a1 = tl.load(act_ptr + j[:, None, None] * I + c1, mask=(j < K)[:, None, None], other=0.0).to(tl.float32)
        acc = tl.sum(tl.sum(w1.to(tl.float32) * a1, axis=2), axis=0)
        if I2 > 0:
            a2 = tl.load(act_ptr + j[:, None, None] * I + c2, mask=(j < K)[:, None, None] & (c2 < I),
                         other=0.0).to(tl.float32)
            acc += tl.sum(tl.sum(w2.to(tl.float32) * a2, axis=2), axis=0)
        tl.store(out_ptr + h, acc.to(out_ptr.dtype.element_ty), mask=h < H)


def sort_pairs(expert, E: int, kernel=False):
    """A stable counting sort of the (token, slot) pairs by expert, on the device, with no host synchronisation.
    expert [P] (pair j = token j // k, slot j % k) -> order [P] (the pair at each sorted row) and offsets [E]
    int32 (the end row of each expert's group, for grouped_mm).
    Compiled, it is a few Triton kernels: 7.8 us at 256 tokens on an H100, where sorting the keys (aten's radix
    sort, then searchsorted and a scatter) took 23.2 us. Run eagerly (an uncompiled prefill chunk) it is the slower
    one at 2,048 tokens (236 against 149 us). kernel=True (routed_by_kernels): one kernel of ours instead,
    sort_pairs_by_kernel."""
    if kernel:
        return sort_pairs_by_kernel(expert, E)
    hot = expert[None, :] == torch.arange(E, device=expert.device)[:, None]   # [E, P]: pair j chose expert e
    counts = hot.sum(1)                                                       # [E]
    ends = counts.cumsum(0)                                                   # [E]
    earlier = (hot.cumsum(1) * hot).sum(0) - 1                                # [P]: earlier pairs of the same expert
    row = (ends - counts)[expert] + earlier                                   # [P]: each pair's sorted row
    return invert_permutation(row), ends.to(torch.int32)


SORT_BLOCK = 4096  # sort_pairs_by_kernel: pairs per step of a program's loops


@torch.library.custom_op("diffusiongemma::sort_pairs_by_kernel", mutates_args=())
def sort_pairs_by_kernel(expert: torch.Tensor, E: int) -> tuple[torch.Tensor, torch.Tensor]:
    """sort_pairs as one Triton kernel, sort_pairs_kernel, with a program per expert: each counts the pairs of
    the experts before its own (where its group starts), then writes its own pairs' indices, in order, at the
    rows that follow. expert [P] -> order [P] (int64), ends [E] (int32)."""
    P = expert.shape[0]
    order = torch.empty(P, dtype=torch.int64, device=expert.device)
    ends = torch.empty(E, dtype=torch.int32, device=expert.device)
    pdl = pdl_launch(expert.device)
    sort_pairs_kernel[(E,)](expert.contiguous(), order, ends, P, E, BLOCK=min(SORT_BLOCK, triton.next_power_of_2(P)),
                            PDL=pdl, launch_pdl=pdl)
    return order, ends


@sort_pairs_by_kernel.register_fake
def _sort_pairs_by_kernel_shape(expert, E):
    return torch.empty_like(expert, dtype=torch.int64), expert.new_empty(E, dtype=torch.int32)


if triton is not None:
    @triton.jit
    def sort_pairs_kernel(expert_ptr, order_ptr, ends_ptr, P, E, BLOCK: tl.constexpr, PDL: tl.constexpr):
        """Program e: start = how many of the P pairs chose an expert below e; then order[start + i] = the index of
        the i-th pair (in pair order) that chose e, and ends[e] = start + their count. expert [P]."""
        e = tl.program_id(0)
        j = tl.arange(0, BLOCK)
        if PDL:
            tl.extra.cuda.gdc_wait()
        row = tl.sum(tl.zeros((BLOCK,), dtype=tl.int32), axis=0)  # (an int32 scalar, as the loops' sums)
        for p0 in range(0, P, BLOCK):
            x = tl.load(expert_ptr + p0 + j, mask=p0 + j < P, other=E)
            row += tl.sum((x < e).to(tl.int32), axis=0)
        for p0 in range(0, P, BLOCK):
            x = tl.load(expert_ptr + p0 + j, mask=p0 + j < P, other=E)
            hot = (x == e).to(tl.int32)
            tl.store(order_ptr + row + tl.cumsum(hot, axis=0) - 1, (p0 + j).to(tl.int64), mask=hot > 0)
            row += tl.sum(hot, axis=0)
        tl.store(ends_ptr + e, row)
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()


@torch.library.custom_op("diffusiongemma::invert_permutation", mutates_args=())
def invert_permutation(perm: torch.Tensor) -> torch.Tensor:
    """perm [P], a permutation of 0..P-1 -> inverse [P], with inverse[perm[j]] = j: one scatter.
    A custom operator, so that compiled code calls it as an opaque (extern) kernel. Inductor's programmatic
    dependent launch (pdl_options) lets a kernel read, before its gdc_wait, what the kernel ahead of it wrote when
    that kernel scattered in place: torch 2.11 to 2.13 do not count the scatter's write as that kernel's (on an H200,
    the kernel after sort_pairs' scatter loaded the order before its wait: README.md). After an extern kernel the
    next compiled kernel always waits before its first read."""
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.shape[0], device=perm.device, dtype=perm.dtype)
    return inverse


@invert_permutation.register_fake
def _invert_permutation_shape(perm):
    return torch.empty_like(perm)


class Layer(nn.Module):
    """One transformer layer; the same weights serve encoder and decoder. Names match the checkpoint."""

    def __init__(self, cfg: Config, layer: int):
        super().__init__()
        H, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(H, cfg.intermediate_size)
        self.router = Router(cfg)
        self.experts = Experts(cfg)
        self.input_layernorm = RMSNorm(H, eps)
        self.post_attention_layernorm = RMSNorm(H, eps)
        self.pre_feedforward_layernorm = RMSNorm(H, eps)      # before the dense MLP
        self.post_feedforward_layernorm_1 = RMSNorm(H, eps)   # after the dense MLP
        self.pre_feedforward_layernorm_2 = RMSNorm(H, eps)    # before the experts
        self.post_feedforward_layernorm_2 = RMSNorm(H, eps)   # after the experts
        self.post_feedforward_layernorm = RMSNorm(H, eps)     # after their sum
        self.layer_scalar = nn.Parameter(torch.ones(1))          # decoder copy
        self.encoder_layer_scalar = nn.Parameter(torch.ones(1))  # encoder copy (model.encoder....layer_scalar)
        self.stream = None  # CUDA: a second stream for the dense MLP of one-token passes (FastPath sets it)

    def forward(self, x, cos, sin, keys_values, mask, enc_rows: int):
        """x [B, T, H] -> [B, T, H]. keys_values(k, v): this layer's cache (see KVCache.keys_values). The first
        enc_rows tokens are the encoder's, the rest the decoder's (see add_feed_forward)."""
        q, k, v = self.project(x, cos, sin)
        attn = self.self_attn(q, k, v, keys_values, mask)
        if self.stream is not None and x.shape[1] == 1:
            return self.feed_forward_overlapped(x, attn, enc_rows)
        return self.feed_forward(x, attn, enc_rows)

    def project(self, x, cos, sin):
        """The attention's input: x [B, T, H] -> normed, then q, k, v (see Attention.project)."""
        return self.self_attn.project(self.input_layernorm(x), cos, sin)

    def feed_forward(self, x, attn, enc_rows: int):
        """The rest of the layer: residual x [B, T, H] + attention output attn [B, T, H] -> [B, T, H]."""
        x = self.add_attention(x, attn)
        return self.add_feed_forward(x, self.dense(x), self.moe(x), enc_rows)

    def feed_forward_overlapped(self, x, attn, enc_rows: int):
        """feed_forward with the dense MLP on self.stream while the router and the experts run on the current
        stream. FastPath uses it for one-token passes (an AR step), where both branches are chains of small
        kernels that leave the GPU idle (on an H200 the AR token took 8% less time; README.md)."""
        x = self.add_attention(x, attn)
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            dense = self.dense(x)
        moe = self.moe(x)
        torch.cuda.current_stream().wait_stream(self.stream)
        return self.add_feed_forward(x, dense, moe, enc_rows)

    def add_attention(self, x, attn):
        """The residual x [B, T, H] plus the normed attention output attn [B, T, H]."""
        return x + self.post_attention_layernorm(attn)

    def dense(self, x):
        """The dense MLP's branch before its output norm: x [B, T, H] -> [B, T, H]."""
        return self.mlp(self.pre_feedforward_layernorm(x))

    def moe(self, x):
        """The experts' branch before its output norm, routed on the raw residual: x [B, T, H] -> [B, T, H].
        One compiled row on a GPU with Triton (an AR token) is routed and normed by our kernels, route_one_token."""
        flat = x.reshape(-1, x.shape[-1])
        if one_compiled_row(flat):
            r = self.router
            weights, ids, normed = route_one_token(flat, r.scale, r.proj.weight, r.per_expert_scale,
                                                   self.pre_feedforward_layernorm_2.weight, r.top_k, r.eps)
        else:
            weights, ids = self.router(flat)
            normed = self.pre_feedforward_layernorm_2(flat)
        return self.experts(normed, weights, ids).view_as(x)

    def add_feed_forward(self, x, dense, moe, enc_rows: int):
        """The residual x [B, T, H] plus the normed sum of both branches (each normed first), times the layer's
        scalar: the encoder's for the first enc_rows tokens, the decoder's for the rest (a pass is one or the
        other, except encode_and_denoise's). The branches' output norms are here, not in dense and moe, so that
        compiled they fuse with this sum where the branches run apart (an AR token's)."""
        ff = self.post_feedforward_layernorm_1(dense) + self.post_feedforward_layernorm_2(moe)
        x = x + self.post_feedforward_layernorm(ff)
        if enc_rows in (0, x.shape[1]):
            return x * (self.encoder_layer_scalar if enc_rows else self.layer_scalar)
        return torch.cat([x[:, :enc_rows] * self.encoder_layer_scalar, x[:, enc_rows:] * self.layer_scalar], 1)


class SelfConditioning(MLP):
    """The decoder's input: embedding + MLP(pre_norm(soft embedding of the previous step)), then a
    weightless RMSNorm. With no previous step the soft embedding is 0 and so is the MLP's output."""

    def __init__(self, cfg: Config):
        super().__init__(cfg.hidden_size, cfg.intermediate_size)
        self.pre_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eps = cfg.rms_norm_eps

    def forward(self, x, soft):
        """x, soft [B, C, H] -> [B, C, H]"""
        return rms_norm(x + super().forward(self.pre_norm(soft)), None, self.eps)


# -----------------------------------------------------------------------------
# KV cache

class KVCache:
    """Keys/values written by `encode` and read by `denoise` (which never writes). Per layer k, v
    [B, kv_heads, S, D]; sliding layers keep only the last window-1 tokens, all that a later query
    can see. `valid` [B, length] marks real tokens (False for left padding)."""

    def __init__(self, cfg: Config, batch_size: int):
        self.cfg = cfg
        self.k = [None] * cfg.num_hidden_layers
        self.v = [None] * cfg.num_hidden_layers
        self.length = 0                 # tokens encoded so far (= the position of the next token)
        self.valid = torch.zeros(batch_size, 0, dtype=torch.bool)

    def kept(self, kind):
        """Number of most recent tokens a layer of this kind keeps."""
        return min(self.length, self.cfg.sliding_window - 1) if kind == SLIDING else self.length

    def positions(self, T, device):
        """Positions [T] of the next T tokens."""
        return torch.arange(self.length, self.length + T, device=device)

    def keys_values(self, layer, k, v, positions=None):
        """What a pass with its own k, v [B, kv, T, D] attends to in this layer: the cached k, v, then its own.
        positions [m] (an encoder's tokens, the pass's first m: the next m positions) also adds those to the cache
        for later passes."""
        own = k.shape[2]
        if self.k[layer] is not None:
            k, v = torch.cat([self.k[layer], k], dim=2), torch.cat([self.v[layer], v], dim=2)
        if positions is not None:  # appending is enough: these are the next positions
            keep = k.shape[2] - own + positions.shape[0]  # the cached keys, then the pass's first m
            self.k[layer], self.v[layer] = k[:, :, :keep], v[:, :, :keep]
        return k, v

    def visible(self, kind, device, stored):
        """Positions [S] and validity [B, S] of the cached tokens that a pass storing `stored` tokens sees in a
        layer of this kind (here all of them; StaticKVCache drops unwritten slots for long passes)."""
        S = self.kept(kind)
        return torch.arange(self.length - S, self.length, device=device), self.valid[:, self.length - S:].to(device)

    def own_keys(self, positions, valid):
        """Positions [T] and validity [B, T] of the keys a pass adds after the cached ones (see keys_values)."""
        return positions, valid

    def advance(self, valid):
        """Called once after all layers stored T tokens; trims the sliding layers."""
        self.valid = torch.cat([self.valid.to(valid.device), valid], dim=1)
        self.length += valid.shape[1]
        for i, kind in enumerate(self.cfg.layer_types):
            S = self.kept(kind)
            if self.k[i] is not None and self.k[i].shape[2] > S:
                self.k[i], self.v[i] = self.k[i][:, :, -S:], self.v[i][:, :, -S:]


class StaticKVCache:
    """The fast path's KV cache, allocated once, so that a pass over T tokens always has the same shapes and
    addresses (one CUDA graph of it serves every block). It keeps what KVCache keeps, behind masks:
      * full layers: S = capacity slots; position p lives in slot p;
      * sliding layers: a ring of S >= window - 1 + canvas slots; position p lives in slot p % S;
      * after the S slots, a tail of 2 x canvas slots where a pass puts its own keys/values (keys_values): a
        canvas, a block to commit, or both (encode_and_denoise); a pass that stores more than a canvas (a prefill
        chunk) reads only the slots written so far and concatenates (read_slots).
    An encoder pass also stores its keys/values in their slots, in the same indexed write (store_kv).
    Per slot, `pos` holds the position written there (EMPTY before any) and `valid` whether it is a real
    token; visible() turns them into what KVCache.visible() returns, as a mask over all the slots. The length
    is a device tensor that passes read and only advance() moves, so a recorded pass can be replayed."""

    EMPTY = 2 ** 40  # the position of a slot never written: far from every query, so always masked

    def __init__(self, cfg: Config, batch_size: int, capacity: int, device, dtype):
        self.cfg, self.batch_size, self.capacity = cfg, batch_size, capacity
        ring = -(-(cfg.sliding_window - 1 + cfg.canvas_length) // 64) * 64  # rounded up for aligned rows
        self.slots = {SLIDING: ring, FULL: capacity}
        self.tail = 2 * cfg.canvas_length
        self.kv = []  # per layer, keys and values in one buffer [2, B, kv, S + tail, D], so that one write stores both
        for i, kind in enumerate(cfg.layer_types):
            D, kv = cfg.attn_shape(i)
            # zeros, not empty: a masked slot is multiplied by 0 and must not hold a NaN
            S = self.slots[kind] + self.tail
            self.kv.append(torch.zeros(2, batch_size, kv, S, D, dtype=dtype, device=device))
        self.pos = {kind: torch.full((S,), self.EMPTY, device=device) for kind, S in self.slots.items()}
        self.valid = {kind: torch.zeros(batch_size, S, dtype=torch.bool, device=device)
                      for kind, S in self.slots.items()}
        self.tail_rows = {kind: S + torch.arange(self.tail, device=device) for kind, S in self.slots.items()}
        self.length = torch.zeros((), dtype=torch.long, device=device)
        self.host_length = 0  # the same count on the host, to check the capacity without a sync
        self.store = store_kv  # FastPath with compiled layers swaps in a compiled one

    def reset(self):
        for kind in self.slots:
            self.pos[kind].fill_(self.EMPTY)
            self.valid[kind].zero_()
        self.length.zero_()
        self.host_length = 0

    def positions(self, T, device):
        return self.length + torch.arange(T, device=device)

    def padded(self, T):
        """How many tail slots a pass of T tokens attends to: T rounded up to a multiple of 8 where that is at
        most a canvas. The extra slots are masked (own_keys); they keep the key rows 16-byte aligned, without
        which cuBLAS runs an AR token's attention products (1 own key) in a slow fallback kernel."""
        return T + -T % 8 if T + -T % 8 <= self.cfg.canvas_length else T

    def own_keys(self, positions, valid):
        """Positions and validity of the tail slots a pass attends to: its own T tokens, then padding."""
        pad = self.padded(positions.shape[0]) - positions.shape[0]
        return (torch.cat([positions, positions.new_full((pad,), self.EMPTY)]),
                torch.cat([valid, valid.new_zeros(valid.shape[0], pad)], 1))

    def keys_values(self, layer, k, v, positions=None):
        """The pass's own k, v [B, kv, T, D] go to the tail, so attention reads one buffer and nothing is
        concatenated (a prefill chunk longer than a canvas concatenates: read_slots). positions [m] (an encoder's
        tokens, the pass's first m) also stores the last min(m, S) of them in their slots, for later passes; the masks
        see them only after advance(), and a slot overwritten here held a token that no query of this pass may see
        (a ring holds a canvas more than a window, so this needs m <= canvas). Returns the cache's S slots and
        padded(T) tail slots (see own_keys); a long pass, the first read_slots() slots and its own T."""
        kind, T = self.cfg.layer_types[layer], k.shape[2]
        S, KV = self.slots[kind], self.kv[layer]
        K, V = KV
        stored = 0 if positions is None else positions.shape[0]
        if stored > self.cfg.canvas_length:  # a copy (none when no slot is read): the ring may then be overwritten
            R = self.read_slots(kind, stored)
            joined = (k, v) if R == 0 else (torch.cat([K[:, :, :R], k], dim=2), torch.cat([V[:, :, :R], v], dim=2))
            self.store(KV, k, v, S, None, positions)
            return joined
        self.store(KV, k, v, S, self.tail_rows[kind][:T], positions)
        return K[:, :, :S + self.padded(T)], V[:, :, :S + self.padded(T)]

    def read_slots(self, kind, stored):
        """How many of a layer's cache slots a pass that stores `stored` tokens reads: all of them, so that the
        recorded passes keep their shapes, except in a pass that stores more than a canvas (a prefill chunk, never
        recorded): there a layer reads only the slots written so far (position p lives in slot p % S), for a
        sliding layer rounded up to whole blocks of FLEX_BLOCK keys (its flex attention's). So a 4k prompt in a 32k
        cache attends to at most 4k keys, not 32k, and a prompt's first chunk reads no slot at all (keys_values then
        copies nothing)."""
        S = self.slots[kind]
        if stored <= self.cfg.canvas_length:
            return S
        written = min(S, self.host_length)
        return written if kind == FULL else min(S, -(-written // FLEX_BLOCK) * FLEX_BLOCK)

    def visible(self, kind, device, stored):
        S = self.read_slots(kind, stored)
        pos, valid = self.pos[kind][:S], self.valid[kind][:, :S]
        if kind == SLIDING:  # the last window-1 tokens, as in KVCache (the ring holds a few more)
            valid = valid & (pos > self.length - self.cfg.sliding_window)
        return pos, valid

    def advance(self, valid):
        T = valid.shape[1]
        if self.host_length + T > self.capacity:
            raise DiffusionGemmaError(f"the static KV cache holds {self.capacity} tokens; {self.host_length} + {T} "
                                      f"do not fit: make the FastPath with a larger capacity")
        positions = self.positions(T, valid.device)
        for kind, S in self.slots.items():
            n = min(T, S)  # a ring keeps only the newest S
            self.pos[kind].index_copy_(0, positions[-n:] % S, positions[-n:])
            self.valid[kind].index_copy_(1, positions[-n:] % S, valid[:, -n:])
        self.length += T  # in place: the recorded passes read this very tensor
        self.host_length += T


def store_kv(KV, k, v, S: int, tail_rows, positions):
    """Writes a pass's k, v [B, kv, T, D] into one layer's StaticKVCache buffer KV [2, B, kv, S + tail, D]
    (keys, then values): all T tokens at tail_rows [T] (None: not there), and of the first m tokens (the encoder's)
    the last min(m, S) at their slots, position % S (positions [m]; None: none stored). One indexed copy of both
    (the rows never repeat: the tail lies after the S slots), so that compiled it is one kernel that writes the
    cache in place (a slice assignment beside an indexed copy made inductor copy the whole cache)."""
    rows, src = [], []
    if tail_rows is not None:
        rows.append(tail_rows)
        src.append(torch.stack([k, v]))
    if positions is not None:
        m = positions.shape[0]
        n = min(m, S)
        rows.append(positions[-n:] % S)
        src.append(torch.stack([k[:, :, m - n:m], v[:, :, m - n:m]]))
    KV.index_copy_(3, torch.cat(rows), torch.cat(src, 3))


def attention_mask(q_pos, k_pos, k_valid, causal: bool, window: int | None, band: bool):
    """Boolean mask [B, 1, Tq, Tk]: may query at q_pos [Tq] attend to key at k_pos [Tk]?
    causal: k <= q. window (sliding layers): q - k < window when causal, |q - k| < window when band."""
    d = q_pos[:, None] - k_pos[None, :]  # [Tq, Tk]
    ok = torch.ones_like(d, dtype=torch.bool)
    if causal:
        ok &= d >= 0
    if window is not None:
        ok &= (d.abs() if band else d) < window
    ok = ok[None, None] & k_valid[:, None, None, :]
    # every token may see itself, so a padding query has one finite key (its output is never used)
    return ok | (d == 0)[None, None]


def attention_bias(mask, dtype):
    """Boolean mask [B, 1, T, S] -> what attention adds to the scores: 0 where allowed, -inf elsewhere."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


FLEX_BLOCK = 128  # block_mask: queries and keys per block
# FastPath's compiled flex attention: its tiles (the fastest of a few for a 26B sliding layer's prefill chunk on an
# H200, 0.21 against 0.48 ms for SDPA with a dense mask; README.md)
FLEX_TILES = dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2)  # 3 stages need 272 KiB of shared memory


def block_mask(mask):
    """Boolean mask [B, 1, T, S] (T and S multiples of FLEX_BLOCK) -> the same as a flex attention BlockMask: per
    block of queries, the blocks of keys it sees whole (computed without a mask), those it sees in part (the dense
    mask decides per score), and no others (skipped). A prefill chunk's sliding layers see at most a window of
    its keys, so most blocks are skipped."""
    B, _, T, S = mask.shape
    n = FLEX_BLOCK
    tiles = mask.view(B, 1, T // n, n, S // n, n)
    seen, whole = tiles.any(5).any(3), tiles.all(5).all(3)  # [B, 1, T / n, S / n]

    def listed(blocks):  # -> how many per query block, and their key block indices first (in order)
        return blocks.sum(-1, dtype=torch.int32), blocks.int().argsort(dim=-1, descending=True, stable=True).int()
    return BlockMask.from_kv_blocks(*listed(seen & ~whole), *listed(whole), BLOCK_SIZE=n,
                                    mask_mod=lambda b, h, q, k: mask[b, 0, q, k])


# -----------------------------------------------------------------------------
# The model

def pdl_options():
    """torch.compile options for programmatic dependent launch, where this torch has it (inductor's
    triton.enable_pdl): on Hopper and later GPUs each compiled kernel may start while the one before it finishes,
    and waits (griddepcontrol) before it reads what that one wrote. On an H200 an AR token took 0.93x its time
    without it (README.md). Elsewhere inductor emits no such code."""
    return {"triton.enable_pdl": True} if hasattr(torch._inductor.config.triton, "enable_pdl") else {}


def pdl_launch(device):
    """Whether our Triton kernels launch with programmatic dependent launch on this device (CUDA, Hopper or
    later): such a kernel may start while the one before it finishes; it first waits for that one's writes
    (gdc_wait), then lets the next one start (gdc_launch_dependents), so that every kernel after it still sees
    everything before it written. In Triton's interpreter (the CPU tests) it stays off."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)


class DiffusionGemma(nn.Module):

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Layer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_conditioning = SelfConditioning(cfg)
        self._inv_freq = {}  # device -> {layer type: fp32 inverse frequencies}; kept out of .to(dtype)
        self.head_chunk = head_chunk  # one vocabulary chunk of the head (compile_layers swaps in a compiled one)
        self.step_inputs = self.pass_inputs  # pass_inputs for passes of at most a canvas (compiled: compile_layers)
        self.flex_rows = ()  # passes of these lengths give sliding layers a BlockMask (FastPath: its prefill chunks)
        # sqrt(H) rounded to each float dtype the weights may have (Python numbers: no tensor, no sync)
        self._embed_scale = {dt: torch.tensor(cfg.hidden_size ** 0.5, dtype=dt, device="cpu").item()
                             for dt in (torch.float32, torch.bfloat16, torch.float16)}

    # --- pieces shared by both modes

    def embed_scale(self):
        """sqrt(H) rounded to the weight dtype (53.0 in bf16, not 53.07), as a Python number."""
        return self._embed_scale[self.embed_tokens.weight.dtype]

    def embed(self, ids):
        """ids [B, T] -> [B, T, H] * sqrt(H) (in the weight dtype)."""
        return self.embed_tokens(ids) * self.embed_scale()

    def head(self, h, chunk=None):
        """final hidden states (normed) [..., H] -> fp32 softcapped logits [..., V] (tied embedding).
        With `chunk` (the fast path), `chunk` vocabulary rows at a time are written into one fp32 output,
        so the bf16 product and the softcap's fp32 temporaries stay [..., chunk]."""
        cap, E = self.cfg.final_logit_softcapping, self.embed_tokens.weight
        if chunk is None:
            return softcap(F.linear(h, E), cap)
        out = torch.empty(*h.shape[:-1], E.shape[0], dtype=torch.float32, device=h.device)
        for a in range(0, E.shape[0], chunk):
            self.head_chunk(out[..., a:a + chunk], h, E[a:a + chunk], cap)
        return out

    def inv_freq(self, device):
        """{layer type: fp32 inverse frequencies [head_dim/2]} on device (made once per device)."""
        if device not in self._inv_freq:
            cfg = self.cfg
            self._inv_freq[device] = {
                SLIDING: rope_inv_freq(cfg.head_dim, cfg.rope_theta).to(device),
                FULL: rope_inv_freq(cfg.global_head_dim, cfg.global_rope_theta,
                                    cfg.global_partial_rotary_factor).to(device)}
        return self._inv_freq[device]

    def pass_inputs(self, positions, cache: KVCache, valid, enc_rows: int, inv_freq, B: int, dtype):
        """What the layers of a pass at positions [T] (valid [B, T]) read besides x, per layer type: RoPE's
        (cos, sin) [B, T, head_dim] and the attention bias [B, 1, T, S] over the keys the cache shows (every
        layer of a type sees the same tokens). The first enc_rows tokens are the encoder's: they attend causally.
        The rest are the decoder's: they attend to the cache and to each other, and see the encoder's tokens of
        the same pass (encode_and_denoise's) as if those were already in the cache. inv_freq: self.inv_freq(device),
        made outside so that the compiled version creates no tensor. Some fifty small kernels eager; compile_layers
        compiles this for the fast path's passes through the tail of the cache (step_inputs): ~0.1 ms of an AR
        token on an H200 eager."""
        cfg, T = self.cfg, positions.shape[0]
        rope = {kind: rope_cos_sin(positions[None].expand(B, T), inv, dtype) for kind, inv in inv_freq.items()}
        own_pos, own_valid = cache.own_keys(positions, valid)
        masks = {}
        for kind in dict.fromkeys(cfg.layer_types):
            ctx_pos, ctx_valid = cache.visible(kind, positions.device, enc_rows)
            k_pos, k_valid = torch.cat([ctx_pos, own_pos]), torch.cat([ctx_valid, own_valid], 1)
            window = cfg.sliding_window if kind == SLIDING else None
            rows = []  # the masks of the encoder's query rows, then of the decoder's
            if enc_rows > 0:
                rows.append(attention_mask(positions[:enc_rows], k_pos, k_valid, causal=True, window=window,
                                           band=False))
            if enc_rows < T:
                if kind == SLIDING:  # what the cache keeps once the encoder's tokens are in: the last window-1
                    k_valid = k_valid & (k_pos > positions[enc_rows] - window)
                if cfg.sliding_window_mode == "anchored":
                    window = None  # every canvas query sees the whole cached tail and the canvas
                rows.append(attention_mask(positions[enc_rows:], k_pos, k_valid, causal=False, window=window,
                                           band=True))
            mask = torch.cat(rows, 2) if len(rows) > 1 else rows[0]
            flex = kind == SLIDING and T in self.flex_rows and mask.shape[-1] % FLEX_BLOCK == 0
            masks[kind] = block_mask(mask) if flex else attention_bias(mask, dtype)
        return rope, masks

    def run_layers(self, x, positions, cache: KVCache, valid, enc_rows: int):
        """Runs every layer over x [B, T, H] at positions [T] against the cache. The first enc_rows tokens are
        the encoder's: they attend causally and write their keys/values (the caller then advances the cache).
        The rest are the decoder's: they attend bidirectionally and discard theirs. A pass is one or the other
        (enc_rows T or 0), except encode_and_denoise's."""
        B, T, _ = x.shape
        cfg = self.cfg
        # compiled, step_inputs runs only where it compiles once per pass: on the static cache (its length a device
        # tensor; KVCache's is a number), not in a prefill chunk that stores more than a canvas (which reads the
        # length on the host, read_slots)
        short = isinstance(cache, StaticKVCache) and enc_rows <= cfg.canvas_length
        inputs = self.step_inputs if short else self.pass_inputs
        rope, masks = inputs(positions, cache, valid, enc_rows, self.inv_freq(x.device), B, x.dtype)
        store = positions[:enc_rows] if enc_rows else None  # the encoder stores its keys/values
        for i, layer in enumerate(self.layers):
            kind = cfg.layer_types[i]
            x = layer(x, *rope[kind], partial(cache.keys_values, i, positions=store), masks[kind], enc_rows)
        return self.norm(x)

    # --- the two modes

    def new_cache(self, batch_size: int) -> KVCache:
        return KVCache(self.cfg, batch_size)

    def encode(self, ids, cache: KVCache, valid=None, advance=True):
        """Causal pass over ids [B, T] at positions cache.length.. ; appends to the cache.
        valid [B, T] bool marks real tokens (False = left padding). Returns final normed hidden [B, T, H].
        advance=False writes the keys/values but leaves the cache's length to the caller (the fast path)."""
        if valid is None:
            valid = torch.ones_like(ids, dtype=torch.bool)
        h = self.run_layers(self.embed(ids), cache.positions(ids.shape[1], ids.device), cache, valid, ids.shape[1])
        if advance:
            cache.advance(valid)
        return h

    def soft_embedding(self, sc_logits, chunk=None):
        """Self-conditioning signal: softmax(previous step's scaled logits) @ E * sqrt(H).
        sc_logits [B, C, V] -> [B, C, H]; softmax in fp32, the product in the weight dtype. With `chunk`
        (the fast path), the sum runs over `chunk` vocabulary rows at a time: exp(l - logsumexp(l)), cast,
        times those rows of E, accumulated in fp32; no [B, C, V] fp32 tensor is made."""
        E = self.embed_tokens.weight
        if chunk is None:
            probs = F.softmax(sc_logits, dim=-1, dtype=torch.float32).to(E.dtype)
            return (probs @ E) * self.embed_scale()
        pieces = list(zip(sc_logits.split(chunk, -1), E.split(chunk)))
        lse = torch.stack([torch.logsumexp(s.float(), -1) for s, _ in pieces], -1).logsumexp(-1, keepdim=True)
        soft = sum((torch.exp(s.float() - lse).to(E.dtype) @ e).float() for s, e in pieces)
        return soft.to(E.dtype) * self.embed_scale()

    def denoise(self, canvas, cache: KVCache, sc_logits=None, sc_mask=None, chunk=None):
        """Bidirectional pass over canvas [B, C] at positions cache.length.. ; reads the cache only.
        sc_logits [B, C, V]: the previous step's temperature-scaled logits (None on the first step).
        sc_mask [B] bool: rows that get the self-conditioning signal (False: zeroed; training). Returns fp32
        logits [B, C, V].
        chunk: vocabulary chunk of the head and of the self-conditioning product (see head)."""
        x = self.decoder_input(canvas, sc_logits, sc_mask, chunk)
        positions = cache.positions(canvas.shape[1], canvas.device)
        valid = torch.ones_like(canvas, dtype=torch.bool)
        return self.head(self.run_layers(x, positions, cache, valid, 0), chunk)

    def decoder_input(self, canvas, sc_logits=None, sc_mask=None, chunk=None):
        """canvas [B, C] -> the decoder's input [B, C, H]: its embedding with the self-conditioning signal of
        sc_logits (see denoise)."""
        x = self.embed(canvas)
        soft = torch.zeros_like(x) if sc_logits is None else self.soft_embedding(sc_logits, chunk)
        if sc_mask is not None:
            soft = soft * sc_mask.to(soft.dtype)[:, None, None]
        return self.self_conditioning(x, soft)

    def encode_and_denoise(self, ids, canvas, cache: KVCache, valid=None, chunk=None):
        """encode(ids, cache, valid, advance=False), then denoise(canvas, cache) (the first step of a block: no
        self-conditioning), as one pass over the T + C tokens, so that the weights stream once for both. ids
        [B, T] is what goes into the cache just before the block: the previous block (its commit) or the prompt's
        last chunk. Its rows attend causally and store their keys/values; the canvas's rows see them as if they
        were already in the cache. The same sums as the two passes, added in another order (the new keys come after
        the cache's). canvas [B, C]; valid [B, T] (ids' real tokens). Returns the canvas's fp32 logits [B, C, V];
        the caller advances the cache by ids (the fast path's generate)."""
        T = ids.shape[1]
        if valid is None:
            valid = torch.ones_like(ids, dtype=torch.bool)
        x = torch.cat([self.embed(ids), self.decoder_input(canvas, chunk=chunk)], 1)
        positions = cache.positions(T + canvas.shape[1], canvas.device)
        h = self.run_layers(x, positions, cache, torch.cat([valid, torch.ones_like(canvas, dtype=torch.bool)], 1), T)
        return self.head(h[:, T:], chunk)

    def forward(self, input_ids, canvas, self_conditioning_logits=None):
        """Encodes input_ids [B, T] into a fresh cache, then denoises canvas [B, C] against it.
        Returns the decoder's logits [B, C, V] (transformers: model(input_ids, decoder_input_ids, ...))."""
        cache = self.new_cache(input_ids.shape[0])
        self.encode(input_ids, cache)
        return self.denoise(canvas, cache, self_conditioning_logits)

    # --- weights

    def init_weights(self, std=0.02, generator=None):
        """Random init (for training from scratch and tests): normal(std) matrices, unit norms/scales."""
        for p in self.parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=std, generator=generator)
            else:
                nn.init.ones_(p)
        return self

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def compile_layers(self, autotune=False):
        """torch.compile the elementwise-heavy parts of the model so that their many small kernels fuse:
        every layer's Layer.project (norms, RoPE), Attention.output (the heads' concatenation and o_proj: an AR
        token's by our GEMV kernel, see linear) and Layer.feed_forward (norms, gates, routing, the experts'
        gather and sum), the explicit attention's masked softmax, the head's softcap (one kernel per vocabulary
        chunk, written straight into the logits), the self-conditioning product's softmax and the fast path's
        RoPE tables and attention masks of a step (step_inputs). Used by
        train_sudoku.py on GPU (1.8x per step for the Sudoku model on an H100) and by
        FastPath(compile_layers=True); also the parts of Layer.feed_forward_overlapped (compiled when first
        called). Each distinct shape, grad mode and encoder flag compiles once; layers of the same shape share
        the compiled code (hence the raised recompile limit).
        autotune: compile them with inductor's max-autotune, which times Triton
        templates against aten for each GEMM shape inside them; the experts run our own kernel,
        grouped_mm_few_rows, which it does not tune. Each new shape takes seconds to minutes.
        Every compiled function gets programmatic dependent launch where this torch has it (pdl_options)."""
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        pdl = pdl_options()
        # max-autotune-no-cudagraphs as options (torch.compile takes a mode or options; the fast path records
        # its own graphs)
        options = {**pdl, **(torch._inductor.list_mode_options("max-autotune-no-cudagraphs") if autotune else {})}
        # multi_kernel: inductor may keep a whole row in registers (a persistent reduction: one read of it, not one
        # per reduction) for rows up to 16x its usual limit of 1,024 values, and picks the faster kernel by timing
        # both. On an H200 the softmax of a denoise pass took 0.54 ms instead of 1.06, and an AR token, whose norms
        # run over rows of 2,816, 0.99x its time with it in feed_forward_overlapped's parts (README.md; the denoise
        # pass's layers gained nothing). Not from inductor's on-disk graph cache: loading a multi-kernel from it
        # failed in torch 2.11 (TypeError in triton's cache_key), and these compile in seconds.
        multi = {"triton.multi_kernel": 1, "fx_graph_cache": False}
        softmax = torch.compile(masked_softmax, dynamic=False, options={**multi, **pdl})
        for layer in self.layers:
            layer.self_attn.softmax = softmax
            layer.project = torch.compile(layer.project, dynamic=False, options=options)
            # o_proj: an AR token's by our GEMV kernel (linear), and among the autotuned GEMMs
            layer.self_attn.output = torch.compile(layer.self_attn.output, dynamic=False, options=options)
            layer.feed_forward = torch.compile(layer.feed_forward, dynamic=False, options=options)
            for part in ("add_attention", "dense", "moe", "add_feed_forward"):  # feed_forward_overlapped's parts
                setattr(layer, part, torch.compile(getattr(layer, part), dynamic=False, options={**options, **multi}))
        self.head_chunk = torch.compile(head_chunk, dynamic=False, options=options)
        self.step_inputs = torch.compile(self.pass_inputs, dynamic=False, options=pdl)
        self.soft_embedding = torch.compile(self.soft_embedding, dynamic=False, options=options)
        return self

    def fuse_projections(self):
        """Every attention's q/k(/v) and every MLP's gate/up weights as one tensor each (fuse_linears): two
        GEMMs fewer per layer in the fast path (three where a layer has v_proj), the weights still stored once."""
        for layer in self.layers:
            layer.self_attn.fused = fuse_linears(layer.self_attn.projections())
        for mlp in [layer.mlp for layer in self.layers] + [self.self_conditioning]:
            mlp.fused = fuse_linears([mlp.gate_proj, mlp.up_proj])
        return self

    def experts_to_fp8(self):
        """Experts.to_fp8() in every layer: the routed experts, ~90% of the weights, in half the bytes."""
        for layer in self.layers:
            layer.experts.to_fp8()
        return self

    def set_experts_impl(self, impl: str):
        if impl not in ("loop", "grouped"):
            raise DiffusionGemmaError(f"unknown experts implementation {impl!r}; use 'loop' or 'grouped'")
        if impl == "loop" and self.layers[0].experts.gate_up_scale is not None:
            raise DiffusionGemmaError("float8 experts run grouped only (the loop is the bf16/fp32 reference)")
        for layer in self.layers:
            layer.experts.impl = impl
        return self

    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None, **config_overrides):
        """Loads a Hugging Face DiffusionGemma checkpoint folder (model.safetensors, or shards with
        model.safetensors.index.json). Builds on the meta device, then reads shard by shard straight
        to the target device and dtype, so the weights are never held twice."""
        return load_checkpoint(cls, path, device, dtype, **config_overrides)

    def save_pretrained(self, path, max_shard_bytes=5 * 10**9):
        """Writes config.json and safetensors shards (<= 5 GB each, plus an index when sharded) in the
        Hugging Face layout, atomically: everything goes to a temporary folder that is renamed at the end."""
        save_checkpoint(self, path, max_shard_bytes)


# -----------------------------------------------------------------------------
# Checkpoint I/O (Hugging Face layout)

DECODER, ENCODER = "model.decoder.", "model.encoder.language_model."
SKIPPED_PREFIXES = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")


def hf_name(ours: str) -> str:
    """Our parameter name -> the checkpoint's: the decoder prefix, except for the encoder's copy of
    layer_scalar, which lives under the encoder's prefix."""
    m = re.fullmatch(r"layers\.(\d+)\.encoder_layer_scalar", ours)
    if m:
        return f"{ENCODER}layers.{m.group(1)}.layer_scalar"
    return DECODER + ours


def checkpoint_files(path):
    """The safetensors files of a checkpoint folder, with one clear error if there are none."""
    if not os.path.isdir(path):
        raise DiffusionGemmaError(f"checkpoint folder {path!r} does not exist; "
                                  f"pass a Hugging Face DiffusionGemma folder")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise DiffusionGemmaError(f"{path!r} has no config.json; it is not a Hugging Face checkpoint folder")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            shards = sorted(set(read_json(index)["weight_map"].values()))
        except (ValueError, KeyError) as e:
            raise DiffusionGemmaError(f"{index} is malformed ({e}); re-download or re-save the checkpoint")
        files = [os.path.join(path, s) for s in shards]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise DiffusionGemmaError(f"shard {os.path.basename(missing[0])} listed in the index is missing "
                                      f"from {path!r}")
        return files
    single = os.path.join(path, "model.safetensors")
    if not os.path.isfile(single):
        raise DiffusionGemmaError(f"{path!r} has no model.safetensors or model.safetensors.index.json")
    return [single]


def load_checkpoint(cls, path, device=None, dtype=None, **config_overrides):
    from safetensors import safe_open
    files = checkpoint_files(path)
    try:
        hf_cfg = read_json(os.path.join(path, "config.json"))
        cfg = Config.from_hf(hf_cfg, **config_overrides)
    except (ValueError, KeyError, TypeError) as e:
        if isinstance(e, DiffusionGemmaError):
            raise
        raise DiffusionGemmaError(f"{path}/config.json is malformed or not a DiffusionGemma config "
                                  f"({type(e).__name__}: {e})")
    device = torch.device(resolve_device(device))
    with torch.device("meta"):
        model = cls(cfg)
    expected = {hf_name(n): n for n, _ in model.named_parameters()}
    if dtype is None:  # the checkpoint's own dtype
        dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(
            hf_cfg.get("dtype", hf_cfg.get("torch_dtype")), torch.float32)
    dtype = resolve_dtype(dtype)
    model.to(dtype).to_empty(device=device)  # one uninitialised copy, in the target dtype
    params = dict(model.named_parameters())
    seen, skipped = set(), 0
    for f in files:
        try:
            handle = safe_open(f, "pt", device="cpu")
        except Exception as e:
            raise DiffusionGemmaError(f"cannot read {f} as safetensors ({e}); the file is corrupt or truncated")
        with handle:
            for key in handle.keys():
                if key.startswith(SKIPPED_PREFIXES):
                    skipped += 1
                    continue
                if key not in expected:
                    raise DiffusionGemmaError(f"unexpected tensor {key!r} in {os.path.basename(f)}: the checkpoint "
                                              f"does not match this DiffusionGemma config")
                name = expected[key]
                shape = tuple(handle.get_slice(key).get_shape())
                if shape != tuple(params[name].shape):
                    raise DiffusionGemmaError(f"tensor {key!r} has shape {list(shape)} but config.json implies "
                                              f"{list(params[name].shape)}: config.json does not match the weights")
                with torch.no_grad():
                    params[name].copy_(handle.get_tensor(key))  # one tensor at a time, straight to the device
                seen.add(key)
    missing = sorted(set(expected) - seen)
    if missing:
        raise DiffusionGemmaError(f"{len(missing)} tensors missing from {path!r}, e.g. {missing[0]!r}: "
                                  f"the checkpoint is incomplete or for another config")
    if skipped:
        print(f"skipped {skipped} vision-tower tensors (this implementation is text-only)")
    return model.eval()


def atomic_write(path, write_fn, mode="w"):
    """Writes a file through a temporary file in the same folder and os.replace: all or nothing."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, mode) as f:
            write_fn(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_checkpoint(model, path, max_shard_bytes=5 * 10**9, extra_files=None):
    """config.json + model.safetensors (or shards + index), written into a temporary sibling folder
    that replaces `path` only when complete. extra_files: {name: text, or a function writing the
    open binary file} (tokenizer.json, generation_config.json, a training state...)."""
    if any(p.dtype == FP8 for p in model.parameters()):
        raise DiffusionGemmaError("this model's experts are float8 (experts_to_fp8), an inference-only form; "
                                  "save the model before converting it")
    from safetensors.torch import save_file
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-" + os.path.basename(path))
    try:
        # a weight that fuse_projections made a view of a larger tensor is copied out to be saved on its own
        tensors = {hf_name(n): p.detach().clone() if p.untyped_storage().nbytes() > p.numel() * p.element_size()
                   else p.detach().contiguous() for n, p in model.named_parameters()}
        dtype_name = str(next(iter(tensors.values())).dtype).replace("torch.", "")
        shards, current, size = [], {}, 0
        for name, t in tensors.items():
            nbytes = t.numel() * t.element_size()
            if current and size + nbytes > max_shard_bytes:
                shards.append(current)
                current, size = {}, 0
            current[name], size = t, size + nbytes
        shards.append(current)
        if len(shards) == 1:
            save_file({k: v.cpu() for k, v in shards[0].items()}, os.path.join(tmp, "model.safetensors"),
                      metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file({k: v.cpu() for k, v in shard.items()}, os.path.join(tmp, fname), metadata={"format": "pt"})
                weight_map.update({k: fname for k in shard})
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump({**model.cfg.to_hf(), "dtype": dtype_name}, f, indent=2)
        for name, content in (extra_files or {}).items():  # text, or a function that writes a binary file
            with open(os.path.join(tmp, name), "wb" if callable(content) else "w") as f:
                content(f) if callable(content) else f.write(content)
        if os.path.isdir(path):  # swap: old folder aside, new one in, old one removed
            old = tempfile.mkdtemp(dir=parent, prefix=".old-" + os.path.basename(path))
            os.replace(path, os.path.join(old, "x"))
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# -----------------------------------------------------------------------------
# Devices and dtypes

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_device(device=None) -> str:
    """None/"auto" -> cuda, then mps, then cpu. Unknown or unavailable devices get one clear error."""
    if isinstance(device, torch.device):
        device = str(device)
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    base = device.split(":")[0]
    if base not in ("cpu", "cuda", "mps"):
        raise DiffusionGemmaError(f"unknown device {device!r}; use auto, cpu, cuda or mps")
    if base == "cuda" and not torch.cuda.is_available():
        raise DiffusionGemmaError(f"device {device!r} asked for but CUDA is not available; use --device cpu")
    if base == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise DiffusionGemmaError(f"device {device!r} asked for but MPS is not available; use --device cpu")
    return device


def resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise DiffusionGemmaError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


# -----------------------------------------------------------------------------
# Generation: the entropy-bound sampler and the block-autoregressive loop

@dataclass
class GenerationConfig:
    max_new_tokens: int = 256          # tokens to generate: ceil(max_new_tokens / canvas_length) blocks at most
    max_denoising_steps: int = 48      # denoising steps per block at most
    entropy_bound: float = 0.1         # accept the lowest-entropy positions while the entropies before
                                       # them sum to at most this (nats)
    t_max: float = 0.8                 # temperature at the first step ...
    t_min: float = 0.4                 # ... annealed linearly towards this one
    stability_threshold: int = 1       # stop a block when the argmax equals the previous
                                       # `stability_threshold` argmaxes ...
    confidence_threshold: float = 0.005  # ... and the mean entropy is below this (0 turns adaptive stopping off)
    eos_token_id: list = field(default_factory=lambda: [1, 106, 50])  # <eos>, <turn|>, <|tool_response>
    pad_token_id: int = 0              # replaces every token after the first stop token

    def __post_init__(self):
        if isinstance(self.eos_token_id, int):
            self.eos_token_id = [self.eos_token_id]
        problems = []
        if self.max_denoising_steps < 1:
            problems.append(f"max_denoising_steps must be >= 1 (got {self.max_denoising_steps})")
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be >= 1 (got {self.max_new_tokens})")
        if not self.entropy_bound >= 0:
            problems.append(f"entropy_bound must be >= 0 (got {self.entropy_bound})")
        if not 0 < self.t_min <= self.t_max:
            problems.append(f"temperatures need 0 < t_min <= t_max (got t_min {self.t_min}, t_max {self.t_max})")
        if self.stability_threshold < 0 or self.confidence_threshold < 0:
            problems.append("stability_threshold and confidence_threshold must be >= 0")
        if problems:
            raise DiffusionGemmaError("bad generation settings: " + "; ".join(problems))

    @classmethod
    def from_pretrained(cls, path, **overrides):
        """The checkpoint's generation_config.json (if any) over our defaults, then overrides."""
        kw = {}
        f = os.path.join(path, "generation_config.json") if path else None
        if f and os.path.isfile(f):
            try:
                hf = read_json(f)
            except ValueError as e:
                raise DiffusionGemmaError(f"{f} is not valid JSON ({e}); fix or delete it") from None
            if not isinstance(hf, dict):
                raise DiffusionGemmaError(f"{f} must hold a JSON object of generation settings; fix or delete it")
            names = {fl.name for fl in fields(cls)}
            kw = {k: v for k, v in hf.items() if k in names and v is not None}
            if isinstance(hf.get("sampler_config"), dict) and "entropy_bound" in hf["sampler_config"]:
                kw["entropy_bound"] = hf["sampler_config"]["entropy_bound"]
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kw)


def temperature(step: int, steps: int, t_min: float, t_max: float) -> float:
    """Linear schedule over the remaining steps: t_max at step 0, t_min + (t_max - t_min)/steps at the last."""
    return t_min + (t_max - t_min) * (steps - step) / steps


def entropy(logits):
    """Entropy in nats of softmax(logits) [..., V] -> [...], in fp32."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def sampler_math(logits, t, q, sc_dtype, sc=None):
    """The sampler's work on rows of logits [N, V] at temperature t, given q [N, V] ~ Exp(1) -> sample, argmax,
    entropy [N], and the scaled logits in sc_dtype (the next step's self-conditioning input; written into sc
    [N, V] where given). The sample, argmax(softmax / q), is exactly torch.multinomial's draw from the same
    generator (the same random numbers and arithmetic) without its checks of the probabilities, which copy a flag
    to the host and so stall the GPU at every call."""
    scaled = logits / t
    sample = (F.softmax(scaled, dim=-1) / q).argmax(-1)
    return sample, scaled.argmax(-1), entropy(scaled), scaled.to(sc_dtype) if sc is None else sc.copy_(scaled)


SAMPLER_CHUNK = 8192  # sampler_kernels: vocabulary entries per program (a 262k vocabulary: 32 per row)


def sampler_kernels(logits, t, q, sc_dtype, sc=None, chunk=SAMPLER_CHUNK, warps=8):
    """sampler_math as two Triton kernels (the fast path's sampler on a GPU): two passes over the logits,
    each split into chunks of the vocabulary so that a few hundred rows fill the GPU. The first
    (sampler_stats_kernel) writes the scaled logits in sc_dtype and, per chunk, the max, the sum of exp and
    the chunk's argmax; the second (sampler_draw_kernel) combines a row's chunks into the softmax's max and
    sum, writes the entropy and the argmax, and takes each chunk's best softmax / q; the best chunk's is the
    sample. The logits are scaled as CUDA's torch scales them (logits / t runs as logits * (1 / t), in fp32);
    the draws are then sampler_math's on the GPU wherever the softmax rounds as F.softmax's does (its sum is added
    in another order). logits, q [N, V] fp32; t a float; sc [N, V] in sc_dtype (optional): where to write the
    scaled logits."""
    N, V = logits.shape
    inv_t = (torch.ones((), dtype=torch.float32) / t).item()  # fp32's 1 / t, exact as a Python float
    logits, q = logits.contiguous(), q.contiguous()
    S = triton.cdiv(V, chunk)
    sc = torch.empty(N, V, dtype=sc_dtype, device=logits.device) if sc is None else sc
    stats = torch.empty(3, N, S, dtype=torch.float32, device=logits.device)  # per chunk: see sampler_stats_kernel
    top = torch.empty(N, S, dtype=torch.int32, device=logits.device)         # each chunk's argmax
    sampler_stats_kernel[(N, S)](logits, sc, stats, top, inv_t, V, CHUNK=chunk, num_warps=warps)
    ent = torch.empty(N, dtype=torch.float32, device=logits.device)
    argmax = torch.empty(N, dtype=torch.int32, device=logits.device)
    best = torch.empty(N, S, dtype=torch.float32, device=logits.device)      # each chunk's max of softmax / q
    best_at = torch.empty(N, S, dtype=torch.int32, device=logits.device)
    sampler_draw_kernel[(N, S)](logits, q, stats, top, ent, argmax, best, best_at, inv_t, V, S, CHUNK=chunk,
                                BLOCK_S=triton.next_power_of_2(S), num_warps=warps)
    sample = best_at.gather(1, best.argmax(1, keepdim=True))[:, 0]  # the first chunk of the largest (as argmax)
    return sample.long(), argmax.long(), ent, sc


if triton is not None:
    @triton.jit
    def sampler_stats_kernel(logits_ptr, sc_ptr, stats_ptr, top_ptr, inv_t, V, CHUNK: tl.constexpr):
        """Program (row, c), for the chunk of x = logits[row] * inv_t from column c * CHUNK: writes x to sc (its
        dtype) and stats[:, row, c] = (m = max x, sum exp(x - m), sum exp(x - m) * (x - m)), top[row, c] = the
        column of the chunk's first max. logits, sc [N, V]; stats [3, N, S]; top [N, S]."""
        row, c = tl.program_id(0), tl.program_id(1)
        N, S = tl.num_programs(0), tl.num_programs(1)
        col = c * CHUNK + tl.arange(0, CHUNK)
        ok = col < V
        at = row.to(tl.int64) * V + col
        x = tl.load(logits_ptr + at, mask=ok, other=float("-inf")) * inv_t
        tl.store(sc_ptr + at, x.to(sc_ptr.dtype.element_ty), mask=ok)
        m = tl.max(x, axis=0)
        e = tl.exp(x - m)
        out = stats_ptr + row * S + c
        tl.store(out, m)
        tl.store(out + N * S, tl.sum(e, axis=0))
        tl.store(out + 2 * N * S, tl.sum(tl.where(ok, e * (x - m), 0.0), axis=0))
        tl.store(top_ptr + row * S + c, c * CHUNK + tl.argmax(x, axis=0))

    @triton.jit
    def sampler_draw_kernel(logits_ptr, q_ptr, stats_ptr, top_ptr, ent_ptr, argmax_ptr, best_ptr, best_at_ptr, inv_t,
                            V, S, CHUNK: tl.constexpr, BLOCK_S: tl.constexpr):
        """Program (row, c): the row's softmax max M and sum s from all S chunks' stats; program c = 0 writes the
        row's entropy (log s - sum exp(x - M) (x - M) / s) and argmax (the first chunk holding M); then, over
        this chunk, best[row, c] = max of p = exp(x - M) / s / q (the softmax over q, as sampler_math divides),
        best_at[row, c] its first column. q [N, V] ~ Exp(1); the other arguments as sampler_stats_kernel's."""
        row, c = tl.program_id(0), tl.program_id(1)
        N = tl.num_programs(0)
        j = tl.arange(0, BLOCK_S)
        j_ok = j < S
        m = tl.load(stats_ptr + row * S + j, mask=j_ok, other=float("-inf"))      # [BLOCK_S] chunk maxima
        M = tl.max(m, axis=0)
        share = tl.exp(m - M)                                                      # 0 for the padding
        sums = tl.load(stats_ptr + (N + row) * S + j, mask=j_ok, other=0.0)       # each chunk's sum exp(x - m)
        s = tl.sum(share * sums, axis=0)
        if c == 0:
            prods = tl.load(stats_ptr + (2 * N + row) * S + j, mask=j_ok, other=0.0)
            weighted = tl.where(j_ok, share * (prods + (m - M) * sums), 0.0)        # sum exp(x - M) (x - M)
            tl.store(ent_ptr + row, tl.log(s) - tl.sum(weighted, axis=0) / s)
            tl.store(argmax_ptr + row, tl.load(top_ptr + row * S + tl.argmax(m, axis=0)))
        col = c * CHUNK + tl.arange(0, CHUNK)
        ok = col < V
        at = row.to(tl.int64) * V + col
        x = tl.load(logits_ptr + at, mask=ok, other=0.0) * inv_t
        p = tl.exp(x - M) / s / tl.load(q_ptr + at, mask=ok, other=1.0)
        p = tl.where(ok, p, -1.0)
        tl.store(best_ptr + row * S + c, tl.max(p, axis=0))
        tl.store(best_at_ptr + row * S + c, c * CHUNK + tl.argmax(p, axis=0))


def sample_logits(logits, t, generator, sc_dtype, rows=None, fn=sampler_math, sc=None):
    """logits [B, C, V] -> (sample, argmax, entropy) [B, C] and the scaled logits [B, C, V] in sc_dtype,
    written into sc where given (the fast path's self-conditioning input buffer: no copy before the next step).
    The random draw is torch.multinomial's (one call over all B*C rows, in transformers' order); the rest
    runs `rows` positions at a time when given, so fp32 temporaries stay [rows, V]. fn: sampler_math, or the
    fast path's sampler_kernels."""
    B, C, V = logits.shape
    flat = logits.reshape(B * C, V)
    q = torch.empty_like(flat).exponential_(generator=generator)
    r = rows or B * C
    outs = sc.view(B * C, V).split(r) if sc is not None else [None] * -(-B * C // r)
    parts = [fn(x, t, e, sc_dtype, out) for x, e, out in zip(flat.split(r), q.split(r), outs)]
    join = lambda xs: xs[0] if len(xs) == 1 else torch.cat(xs)  # noqa: E731  (one part: no copy)
    sample, argmax, ent = (join(p).view(B, C) for p in list(zip(*parts))[:3])
    if sc is None:
        sc = join([p[3] for p in parts]).view(B, C, V)
    return sample, argmax, ent, sc


def entropy_bound_accept(ent, bound: float):
    """ent [B, C] -> bool [B, C]. Sort each row ascending and accept a position while the sum of the
    entropies *before* it is <= bound (Ben-Hamu et al., arXiv 2505.24857): at least one per row."""
    sorted_ent, order = torch.sort(ent, dim=-1)
    accept_sorted = torch.cumsum(sorted_ent, dim=-1) - sorted_ent <= bound
    return torch.zeros_like(accept_sorted).scatter(-1, order, accept_sorted)


def uniform_tokens(shape, vocab_size, generator, device):
    """Uniform random token ids over the whole vocabulary: the diffusion noise (there is no mask token)."""
    return torch.randint(0, vocab_size, shape, generator=generator, device=device)


def renoise(sample, accept, noise):
    """Keep the accepted samples, replace every other position by fresh noise."""
    return torch.where(accept, sample, noise)


def is_stable(argmax, history):
    """argmax [B, C]; history [S, B, C] of the previous S argmaxes (-1 where there was none yet, so
    the earliest stop is step S + 1) -> bool [B]."""
    return (history == argmax[None]).all(-1).all(0)


def push_history(history, argmax):
    """Drops the oldest argmax and appends the newest (a history of length 0 stays empty)."""
    if history.shape[0] == 0:
        return history
    return torch.cat([history[1:], argmax[None]], dim=0)


def truncate_after_stop(tokens, stop_ids, pad_id):
    """tokens [B, T] -> (tokens with everything after the first stop token set to pad, stopped [B])."""
    is_stop = torch.isin(tokens, torch.as_tensor(stop_ids, device=tokens.device))
    seen = torch.cumsum(is_stop.int(), dim=-1)
    after = (seen > 1) | ((seen == 1) & ~is_stop)
    return tokens.masked_fill(after, pad_id), is_stop.any(-1)


def left_pad(prompts, pad_id, device):
    """list of token-id lists -> ids [B, T] (left padded), valid [B, T]."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise DiffusionGemmaError("empty prompt: give at least one token")
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    valid = torch.zeros(len(prompts), T, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.tensor(p)
        valid[i, T - len(p):] = True
    return ids.to(device), valid.to(device)


def batch_prompts(prompts, cfg: Config, new_tokens: int, device):
    """A LongTensor [B, T] or a list of token-id lists (left padded) -> ids, valid [B, T]; checks that
    prompt + new_tokens fits the context."""
    if torch.is_tensor(prompts):
        ids, valid = prompts.to(device), torch.ones(prompts.shape, dtype=torch.bool, device=device)
    else:
        ids, valid = left_pad(prompts, cfg.pad_token_id, device)
    if ids.shape[1] + new_tokens > cfg.max_position_embeddings:
        raise DiffusionGemmaError(f"prompt of {ids.shape[1]} tokens + {new_tokens} new tokens exceeds the context "
                                  f"of {cfg.max_position_embeddings}; shorten the prompt or lower max_new_tokens")
    return ids, valid


def tokens_until_stop(is_stop):
    """is_stop [B, N] -> per row, the tokens up to and including the first stop token (all when none)."""
    return torch.where(is_stop.any(1), is_stop.int().argmax(1) + 1, is_stop.shape[1]).tolist()


@dataclass
class GenerationResult:
    tokens: torch.Tensor        # [B, new] generated ids, pad after the first stop token
    steps: list                 # per block, the denoising steps run (the loop's count)
    forwards: list              # per row, decoder forward passes that row needed
    new_tokens: list            # per row, tokens up to and including the first stop token
    seconds: float              # wall time of the whole call
    prefill_seconds: float = 0.0  # of which the prompt's encoder passes (and the first step: see below)
    first_step_in_prefill: bool = False  # the first block's first denoising step ran in the prompt's last pass
                                         # (FastPath.fuses_prefill), so prefill_seconds includes it

    @property
    def tokens_per_forward(self):
        return sum(self.new_tokens) / max(1, sum(self.forwards))

    @property
    def tokens_per_second(self):
        return sum(self.new_tokens) / self.seconds


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def generate(model: DiffusionGemma, prompts, gen: GenerationConfig = None, generator=None, on_step=None,
             fast=None):
    """Block-diffusion generation. prompts: a list of token-id lists (left padded into a batch) or a
    LongTensor [B, T]. One generator feeds every random draw (initial canvas, samples, re-noise),
    so a seeded generator reproduces the output exactly; draws follow transformers' order.
    on_step(block, step, canvas, argmax) is called after every denoising step.
    fast: a FastPath to run the passes on (static cache, CUDA graphs); None runs the plain path. The fast path
    runs each block's first step in one pass with the encoder pass before it (FastPath.fuse_commit, fuses_prefill)."""
    gen = gen or GenerationConfig()
    cfg, device = model.cfg, model.embed_tokens.weight.device
    C = cfg.canvas_length
    n_blocks = math.ceil(gen.max_new_tokens / C)
    ids, valid = batch_prompts(prompts, cfg, n_blocks * C, device)
    B = ids.shape[0]
    sync(device)
    t0 = time.perf_counter()
    prefilled = None  # the first block's canvas and its first step's logits, where the prefill ran that step
    if fast is None:
        cache = model.new_cache(B)
        model.encode(ids, cache, valid)  # prefill
        denoise = lambda canvas, sc: model.denoise(canvas, cache, sc)  # noqa: E731
        commit = lambda tokens: model.encode(tokens, cache)  # noqa: E731
    else:
        fast.start(B, fast.prompt_length(ids.shape[1]) + n_blocks * C)
        if fast.fuses_prefill(ids.shape[1]):  # the canvas is the first random draw, as in denoise_block
            canvas = uniform_tokens((B, C), cfg.vocab_size, generator, device)
            prefilled = canvas, fast.prefill(ids, valid, canvas)
        else:
            fast.prefill(ids, valid)
        denoise, commit = fast.denoise, fast.commit
    sync(device)
    prefill = time.perf_counter() - t0
    stop_ids = torch.tensor(gen.eos_token_id, device=device)
    out, steps = [], []
    forwards = torch.zeros(B, dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)  # rows that emitted a stop token
    for block in range(n_blocks):
        canvas, first = None, None  # the block's first canvas (where drawn already) and first step (where not denoise)
        if block == 0 and prefilled is not None:  # that step ran in the prompt's last chunk
            canvas, logits = prefilled
            first = lambda _: logits  # noqa: E731
        elif block > 0 and fast is not None and fast.fuse_commit:  # the commit rides along with that step
            first = partial(fast.commit_and_denoise, out[-1])
        elif block > 0:
            commit(out[-1])  # the encoder over the previous block, at its own positions, into the cache
        argmax, n = denoise_block(model, denoise, gen, generator, finished, forwards, on_step, block, fast, first,
                                  canvas)
        steps.append(n)
        tokens, stopped = truncate_after_stop(argmax, stop_ids, gen.pad_token_id)
        tokens = tokens.masked_fill(finished[:, None], gen.pad_token_id)  # rows that finished in an earlier block
        out.append(tokens)
        finished |= stopped
        if finished.all():
            break
    sync(device)
    tokens = torch.cat(out, dim=1)
    return GenerationResult(tokens=tokens, steps=steps, forwards=forwards.tolist(),
                            new_tokens=tokens_until_stop(torch.isin(tokens, stop_ids)),
                            seconds=time.perf_counter() - t0, prefill_seconds=prefill,
                            first_step_in_prefill=prefilled is not None)


def denoise_block(model, denoise, gen, generator, finished, forwards, on_step=None, block=0, fast=None, first=None,
                  canvas=None):
    """Denoises one canvas; denoise(canvas, sc_logits) -> logits is the model's pass against the cache, and
    first(canvas) -> logits, where given, the first step's (FastPath.commit_and_denoise, or the logits that
    FastPath.prefill computed: no self-conditioning yet). canvas [B, C]: the starting canvas, where the caller drew
    it (that prefill's), else drawn here.
    Rows that stop are frozen and never change the others; rows that finished in an earlier block are still
    denoised (generate pads their output) but not counted in `forwards`. Returns (argmax, steps run)."""
    cfg, device, dtype = model.cfg, finished.device, model.embed_tokens.weight.dtype
    B, C, V = finished.shape[0], cfg.canvas_length, cfg.vocab_size
    N = gen.max_denoising_steps
    sample_fn = fast.sample if fast is not None else sample_logits
    # entropies are >= 0, so with a confidence threshold of 0 no row ever stops: then the checks below,
    # each a copy to the host that stalls the GPU, are skipped
    stopping = gen.confidence_threshold > 0
    if canvas is None:
        canvas = uniform_tokens((B, C), V, generator, device)
    argmax, sc = canvas, None
    history = torch.full((gen.stability_threshold, B, C), -1, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    n = 0
    for step in range(N):
        forwards += ~(done | finished)
        logits = first(canvas) if step == 0 and first is not None else denoise(canvas, sc)
        # on logits / temperature: a sample (torch.multinomial's draw), the argmax, the entropy, and the
        # scaled logits in the weight dtype (the next step's self-conditioning input)
        sample, new_argmax, ent, new_sc = sample_fn(logits, temperature(step, N, gen.t_min, gen.t_max), generator,
                                                    dtype)
        accept = entropy_bound_accept(ent, gen.entropy_bound)
        new_canvas = renoise(sample, accept, uniform_tokens((B, C), V, generator, device))
        if stopping:
            if done.any():  # frozen rows keep their argmax, canvas and self-conditioning logits
                new_argmax = torch.where(done[:, None], argmax, new_argmax)
                new_canvas = torch.where(done[:, None], canvas, new_canvas)
                new_sc = torch.where(done[:, None, None], sc, new_sc)
            confident = ent.mean(-1) < gen.confidence_threshold  # (a frozen row is done whatever this says)
            done = done | (is_stable(new_argmax, history) & confident)
        history = push_history(history, new_argmax)
        canvas, argmax, sc = new_canvas, new_argmax, new_sc
        n = step + 1
        if on_step is not None:
            on_step(block, step, canvas, argmax)
        if stopping and done.all():
            break
    return argmax, n


@torch.no_grad()
def generate_ar(model: DiffusionGemma, prompts, max_new_tokens=256, eos_token_id=(1, 106, 50), pad_token_id=0,
                fast=None):
    """Autoregressive baseline on the same weights: the encoder's next-token logits (final norm,
    tied head, softcap) and the KV cache, one token per forward, greedy.
    fast: a FastPath to run the passes on; None runs the plain path."""
    cfg, device = model.cfg, model.embed_tokens.weight.device
    ids, valid = batch_prompts(prompts, cfg, max_new_tokens, device)
    B = ids.shape[0]
    sync(device)
    t0 = time.perf_counter()
    if fast is None:
        cache = model.new_cache(B)
        logits = model.head(model.encode(ids, cache, valid)[:, -1])
        next_logits = lambda nxt: model.head(model.encode(nxt[:, None], cache)[:, -1])  # noqa: E731
        check_every = 1
    else:
        fast.start(B, fast.prompt_length(ids.shape[1]) + max_new_tokens)
        logits = model.head(fast.prefill(ids, valid)[:, -1])
        next_logits = fast.ar_step
        check_every = 16  # "has every row stopped?" copies to the host and stalls the GPU: ask now and then
    sync(device)
    prefill = time.perf_counter() - t0
    stop_ids = torch.tensor(eos_token_id, device=device)
    out = []
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    for i in range(max_new_tokens):
        nxt = logits.argmax(-1).masked_fill(finished, pad_token_id)
        out.append(nxt)
        finished |= torch.isin(nxt, stop_ids)
        if (i + 1) % check_every == 0 and finished.all():
            break
        if i + 1 < max_new_tokens:
            logits = next_logits(nxt)
    sync(device)
    tokens = torch.stack(out, 1)
    is_stop = torch.isin(tokens, stop_ids)
    # end where every row had stopped (checking now and then may have gone a few tokens further)
    ended = (is_stop.cumsum(1) > 0).all(0)
    if ended.any():
        tokens, is_stop = tokens[:, :ended.int().argmax() + 1], is_stop[:, :ended.int().argmax() + 1]
    return GenerationResult(tokens=tokens, steps=[], forwards=[tokens.shape[1]] * B,
                            new_tokens=tokens_until_stop(is_stop),
                            seconds=time.perf_counter() - t0, prefill_seconds=prefill)


# -----------------------------------------------------------------------------
# The fast path (GPU): a static KV cache, CUDA graphs, no host synchronisation

def prefill_chunks(T, n):
    """A prompt of T tokens as FastPath.prefill's chunks [(start, end)]: as many chunks of n tokens as fit, one
    of n // 2 if what is left has that many, and what is then left (the remainder) first. Only two chunk lengths
    recur, so compiled layers compile only those two (FastPath.prompt_length pads a prompt so that it has no
    remainder). Longer chunks launch fewer kernels and give each expert more rows: on an H200 a 4k prefill
    in one chunk of 4,096 took 0.77x the time of two chunks of 2,048, whose launches the host could not keep ahead
    of (README.md). Beyond 2^27 / n keys at batch 1 (32k at n = 4,096) one query head's scores in a full-width
    layer pass attend's max_scores, and it multiplies each head's rows in parts."""
    half = n // 2
    full, rest = divmod(T, n)
    halves = int(0 < half <= rest)
    r = rest - halves * half
    lengths = ([r] if r else []) + [half] * halves + [n] * full
    ends = list(accumulate(lengths))
    return list(zip([0] + ends[:-1], ends))


class FastPath:
    """Runs the passes of generate / generate_ar the fast way, for one batch size, up to `capacity` tokens:
      * the experts as grouped GEMMs (Experts.forward_grouped); masks and positions are device tensors,
        so a denoising step never waits for the host;
      * each layer's q/k/v and gate/up projections as one GEMM each (model.fuse_projections);
      * on CUDA, a one-token pass's dense MLP on a second stream, beside its router and experts; compiled, its
        router by our kernel (route_one_token) and its other linears by our GEMV kernel (linear, gemv);
      * on an Ampere or later GPU, Triton kernels of ours: the experts' grouped GEMMs (grouped_mm_few_rows), an
        AR token's experts (one_token_experts) and attention (attend_decode), a prefill chunk's full-layer softmax
        (masked_softmax_rows), compiled, a canvas's routing (routed_by_kernels); and a prefill chunk's sliding layers
        by compiled flex attention (block_mask);
      * on a Hopper or later GPU, programmatic dependent launch for the compiled kernels (pdl_options) and the AR
        token's attention kernels (pdl_launch): each may start while the kernel before it finishes (the counting
        sort's scatter is a custom operator so that the kernel after it waits: invert_permutation);
      * a StaticKVCache, so a pass over a fixed number of tokens (denoise a canvas, commit a block, one
        autoregressive token) has fixed shapes and addresses: on CUDA each is recorded once as a CUDA
        graph and replayed, with no Python and no launch overhead (a pass is ~2,000 kernels, which take
        longer to launch one by one than to run). The prompt's prefill runs in chunks of at most prefill_chunk
        tokens (prefill_chunks), not recorded; with compiled layers (pad_prompt) the prompt is first padded on the
        left to whole chunks (prompt_length), so that each chunk runs compiled;
      * fuse_commit: a finished block's commit in the same pass as the next block's first denoising step
        (commit_and_denoise), so that the weights stream once for both; fuse_prefill: likewise the prompt's last
        prefill chunk with the first block's first step (fuses_prefill);
      * the 262k-vocabulary head and self-conditioning product vocab_chunk rows at a time, the sampler
        sampler_rows positions at a time: fp32 temporaries stay a few [chunk or rows, V].
    The modules and the math are the plain path's; tests check that both give the same tokens. Build it
    once the model has its final device and dtype: the recorded graphs hold the weights' addresses.
    sampler_kernel (CUDA with Triton): the sampler as sampler_kernels, two passes over the logits (the same
    random draws; roundings may differ in the last bit). compile_layers (bf16 weights):
    model.compile_layers(autotune), so that the recorded passes replay fused kernels, and the prefill's chunks
    run them too (README.md has the figures at the 26B shape). pad_prompt (default: compile_layers): pad the
    prompt to whole chunks (prompt_length); without it, compiled layers compile each remainder's length anew.
    capacity: the tokens of a prompt and its generation; with pad_prompt the cache also holds up to
    prefill_chunk // 2 - 1 tokens of padding. timing: time every pass with CUDA events."""

    def __init__(self, model, batch_size=1, capacity=8192, graphs=True, prefill_chunk=4096, vocab_chunk=32768,
                 sampler_rows=None, sampler_kernel=False, compile_layers=False, autotune=False, timing=False,
                 fuse_commit=True, fuse_prefill=True, pad_prompt=None):
        cfg, w = model.cfg, model.embed_tokens.weight
        if prefill_chunk < 1:
            raise DiffusionGemmaError(f"prefill_chunk must be a positive number of tokens, not {prefill_chunk}")
        self.model, self.device, self.dtype = model, w.device, w.dtype
        model.set_experts_impl("grouped")
        model.fuse_projections()
        cuda = self.device.type == "cuda"
        if cuda:  # an AR step runs its dense MLP beside the router and the experts (Layer.feed_forward_overlapped)
            stream = torch.cuda.Stream(self.device)
            for layer in model.layers:
                layer.stream = stream
        # the passes are recorded on a stream of high priority, the dense MLP's stream keeps the default (the lowest):
        # where both have blocks waiting, the GPU schedules the router's and the experts' chain first (on an H200
        # the AR token took 0.996x its time, README.md)
        self.graph_stream = torch.cuda.Stream(self.device, priority=-1) if cuda else None
        # our Triton kernels for the experts (few_rows_kernel) and the attention (decode_kernel: an AR token's, a
        # prefill chunk's full-layer softmax); their bf16 products need an Ampere or later GPU, Triton's float8
        # (experts_to_fp8, before FastPath) an sm89 or later one
        capability = torch.cuda.get_device_capability(self.device) if cuda else (0, 0)
        kernel = cuda and triton is not None and capability >= (8, 0)
        for layer in model.layers:
            fp8 = layer.experts.gate_up_scale is not None
            layer.experts.few_rows_kernel = kernel and (capability >= (8, 9) or not fp8)
            layer.self_attn.decode_kernel = kernel
        # a prefill chunk's sliding layers by compiled flex attention: only the blocks of keys their window shows
        # (the prompt's last chunk with the first block's canvas too: fuse_prefill); only lengths longer than a
        # canvas, so that a denoising step (a canvas long) keeps its explicit attention whatever prefill_chunk is
        n, C = prefill_chunk, cfg.canvas_length
        lengths = (n, n // 2) + ((n + C, n // 2 + C) if fuse_prefill else ())
        model.flex_rows = tuple(t for t in lengths if kernel and t > C and t % FLEX_BLOCK == 0)
        if model.flex_rows:
            flex = partial(torch.compile(flex_attention, dynamic=False), kernel_options=FLEX_TILES)
            for layer in model.layers:
                layer.self_attn.flex = flex
        self.pad_prompt = compile_layers if pad_prompt is None else pad_prompt
        room = capacity + (prefill_chunk // 2 - 1 if self.pad_prompt else 0)  # and the padding (prompt_length)
        self.cache = StaticKVCache(cfg, batch_size, -(-room // 64) * 64, self.device, self.dtype)
        self.graphs, self.recorded = graphs and cuda, {}
        self.prefill_chunk, self.vocab_chunk, self.sampler_rows = prefill_chunk, vocab_chunk, sampler_rows
        self.fuse_commit, self.fuse_prefill = fuse_commit, fuse_prefill
        self.sampler = sampler_kernels if sampler_kernel and cuda and triton is not None else sampler_math
        self.compiled_layers = compile_layers
        if compile_layers:
            if self.dtype != torch.bfloat16:
                raise DiffusionGemmaError(f"compiled layers need bf16 weights (torch.compile's grouped expert GEMM "
                                          f"is bf16 only), not {str(self.dtype).replace('torch.', '')}; "
                                          f"use dtype bfloat16 or leave the layers eager")
            model.compile_layers(autotune)
            self.cache.store = torch.compile(store_kv, dynamic=False, options=pdl_options())  # in place (store_kv)
        self.timing, self.events = timing and cuda, defaultdict(list)
        # the inputs of the recorded passes: copied in before each replay
        B, C, dev = batch_size, cfg.canvas_length, self.device
        self.canvas = torch.zeros(B, C, dtype=torch.long, device=dev)
        self.sc = torch.zeros(B, C, cfg.vocab_size, dtype=self.dtype, device=dev)  # finite even before use
        self.sc_on = torch.zeros(B, dtype=torch.bool, device=dev)
        self.block = torch.zeros(B, C, dtype=torch.long, device=dev)
        self.token = torch.zeros(B, 1, dtype=torch.long, device=dev)
        self.real = torch.ones(B, C, dtype=torch.bool, device=dev)  # generated tokens are never padding

    def start(self, batch_size, length):
        """Before a generation of `length` tokens (prompt and new ones): checks the sizes, empties the cache."""
        self.model.set_experts_impl("grouped")
        if batch_size != self.cache.batch_size:
            raise DiffusionGemmaError(f"this FastPath was built for batch size {self.cache.batch_size}, "
                                      f"not {batch_size}")
        if length > self.cache.capacity:
            raise DiffusionGemmaError(f"{length} tokens do not fit this FastPath's cache of {self.cache.capacity}; "
                                      f"build it with a larger capacity")
        self.cache.reset()

    def prompt_length(self, T):
        """How many tokens a T-token prompt fills in the cache: with pad_prompt, T rounded up to a multiple of
        prefill_chunk // 2, as prefill pads it (on the left, with invalid tokens, as batch_prompts pads a batch's
        shorter prompts), so that its chunks are whole ones (prefill_chunks), which compile once each. A remainder
        would run eagerly, host-bound: on an H200 a 100-token prompt's prefill and first step took 0.50x the time
        padded, a 4,097-token prompt's 0.79x (README.md). The padding shifts the prompt's positions, which changes
        the attention only by roundings (RoPE's scores depend on the distance between positions). Else T."""
        half = self.prefill_chunk // 2
        return -(-T // half) * half if self.pad_prompt and half > 0 else T

    def prefill(self, ids, valid, canvas=None):
        """The encoder over the prompt ids [B, T], padded to prompt_length(T) tokens, in the chunks of
        prefill_chunks (with pad_prompt: chunks of prefill_chunk or prefill_chunk // 2 tokens; with compiled layers
        each length compiles once, with the canvas's rows too). canvas [B, C] (generate passes one where
        fuses_prefill(T)): the last chunk runs in one pass with the canvas's first denoising step
        (model.encode_and_denoise), and prefill returns that step's logits [B, C, V]; else the last chunk's final
        hidden states."""
        pad = self.prompt_length(ids.shape[1]) - ids.shape[1]
        if pad:
            ids = torch.cat([ids.new_full((ids.shape[0], pad), self.model.cfg.pad_token_id), ids], 1)
            valid = torch.cat([valid.new_zeros(valid.shape[0], pad), valid], 1)
        chunks = prefill_chunks(ids.shape[1], self.prefill_chunk)
        with self._timed("prefill" if canvas is None else "prefill+denoise"):
            for i, (a, b) in enumerate(chunks):
                if canvas is not None and i == len(chunks) - 1:
                    out = self.model.encode_and_denoise(ids[:, a:b], canvas, self.cache, valid[:, a:b],
                                                        self.vocab_chunk)
                    self.cache.advance(valid[:, a:b])
                else:
                    out = self.model.encode(ids[:, a:b], self.cache, valid[:, a:b])
        return out

    def fuses_prefill(self, T):
        """Whether generate runs the first block's first step in a T-token prompt's last prefill chunk: with
        fuse_prefill, where that chunk is a whole one (always with pad_prompt: prompt_length). On an H200 the 26B
        model's 4k prompt and first step took 0.89x the time of the two passes apart (README.md). A remainder keeps
        its first step apart."""
        a, b = prefill_chunks(self.prompt_length(T), self.prefill_chunk)[-1]
        return self.fuse_prefill and b - a in (self.prefill_chunk, self.prefill_chunk // 2)

    def denoise(self, canvas, sc_logits):
        """model.denoise(canvas, cache, sc_logits) as a recorded pass. Its output is overwritten by the next call."""
        self.canvas.copy_(canvas)
        self.sc_on.fill_(sc_logits is not None)  # on the first step the buffer's signal is multiplied by 0
        if sc_logits is not None and sc_logits is not self.sc:  # (sample() writes into self.sc)
            self.sc.copy_(sc_logits)
        return self._run("denoise", lambda: self.model.denoise(self.canvas, self.cache, self.sc, self.sc_on,
                                                               self.vocab_chunk))

    def commit(self, tokens):
        """model.encode(tokens, cache) of a finished block [B, C]."""
        self.block.copy_(tokens)
        self._run("commit", lambda: self.model.encode(self.block, self.cache, self.real, advance=False))
        self.cache.advance(self.real)

    def commit_and_denoise(self, tokens, canvas):
        """commit(tokens), then denoise(canvas, None), as one recorded pass (model.encode_and_denoise): the
        weights stream once for both. Returns the canvas's logits, overwritten by the next call."""
        self.block.copy_(tokens)
        self.canvas.copy_(canvas)
        logits = self._run("commit+denoise", lambda: self.model.encode_and_denoise(
            self.block, self.canvas, self.cache, self.real, self.vocab_chunk))
        self.cache.advance(self.real)
        return logits

    def ar_step(self, token):
        """One autoregressive token [B] -> the next token's logits [B, V] (overwritten by the next call)."""
        self.token.copy_(token[:, None])
        logits = self._run("ar", lambda: self.model.head(
            self.model.encode(self.token, self.cache, self.real[:, :1], advance=False)[:, -1]))
        self.cache.advance(self.real[:, :1])
        return logits

    def sample(self, logits, t, generator, sc_dtype):
        """sample_logits with this path's row chunk and sampler; the scaled logits go straight into the input
        buffer of the next denoising step (denoise then copies nothing)."""
        return sample_logits(logits, t, generator, sc_dtype, self.sampler_rows, self.sampler, self.sc)

    def _run(self, name, fn):
        """fn(), which reads only the input buffers and the cache: on CUDA, recorded as a graph at its first
        call and replayed from then on."""
        with self._timed(name):
            if not self.graphs:
                return fn()
            if name not in self.recorded:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    fn()  # a warm-up run first: lazy initialisation (cuBLAS workspaces...) must not be recorded
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                try:
                    with torch.cuda.graph(graph, stream=self.graph_stream):
                        out = fn()
                except RuntimeError as e:  # something in the pass cannot be recorded: run it eagerly
                    print(f"warning: CUDA graph of the {name} pass failed ({str(e).splitlines()[0]}); running eagerly")
                    self.graphs = False
                    return fn()
                self.recorded[name] = graph, out
            graph, out = self.recorded[name]
            graph.replay()
            return out

    @contextlib.contextmanager
    def _timed(self, name):
        if not self.timing:
            yield
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        self.events[name].append((start, end))

    def timings(self):
        """{pass: [milliseconds of each call since the last timings()]} (waits for the GPU)."""
        torch.cuda.synchronize()
        out = {name: [s.elapsed_time(e) for s, e in pairs] for name, pairs in self.events.items()}
        self.events.clear()
        return out


# -----------------------------------------------------------------------------
# Tokenizer and the Gemma 4 chat format

THOUGHT_BLOCK = re.compile(r"<\|channel>thought.*?(<channel\|>|$)", re.S)


class Tokenizer:
    """A `tokenizers` tokenizer.json plus the Gemma 4 chat prompt:
    <bos><|turn>user\\n{message}<turn|>\\n<|turn>model\\n  and, with thinking off, the closed empty
    thought block <|channel>thought\\n<channel|>."""

    def __init__(self, path):
        from tokenizers import Tokenizer as HFTokenizer
        try:
            self.tok = HFTokenizer.from_file(path)
        except Exception as e:  # noqa: BLE001 - the library raises a bare Exception on bad files
            raise DiffusionGemmaError(f"cannot read tokenizer {path!r} ({e}); it must be a tokenizers tokenizer.json")
        self.special = {t.content for t in self.tok.get_added_tokens_decoder().values() if t.special}
        self.bos_id = self.tok.token_to_id("<bos>")

    @classmethod
    def from_json(cls, text: str):
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            f.write(text)
        try:
            return cls(f.name)
        finally:
            os.remove(f.name)

    @classmethod
    def from_pretrained(cls, folder):
        path = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(path):
            raise DiffusionGemmaError(f"{folder!r} has no tokenizer.json; pass a checkpoint folder with one "
                                      f"or use --random-weights")
        return cls(path)

    def encode(self, text: str) -> list:
        return self.tok.encode(text, add_special_tokens=False).ids

    @staticmethod
    def chat_prompt(message: str, thinking: bool = False) -> str:
        prompt = f"<bos><|turn>user\n{message}<turn|>\n<|turn>model\n"
        return prompt if thinking else prompt + "<|channel>thought\n<channel|>"

    def encode_prompt(self, text: str, chat: bool = True) -> list:
        """The prompt's ids: the chat format, or <bos> + the plain text."""
        if not text:
            raise DiffusionGemmaError("empty prompt: give some text with --prompt or --prompt-file")
        if chat:
            return self.encode(self.chat_prompt(text))
        return ([self.bos_id] if self.bos_id is not None else []) + self.encode(text)

    @staticmethod
    def char_level_json(chars: str, special_tokens: dict, vocab_size: int) -> str:
        """A character-level tokenizer.json built with `tokenizers`: special_tokens {id: token} at fixed
        ids, then one token per character of `chars` in the free ids. For small models (Sudoku, tests)."""
        from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers
        vocab = {tok: i for i, tok in special_tokens.items()}
        free = (i for i in range(vocab_size) if i not in special_tokens)
        for ch in dict.fromkeys(chars):
            vocab[ch] = next(free)
        unk = next((t for t in special_tokens.values() if t == "<unk>"), None)
        tok = HFTokenizer(models.WordLevel(vocab, unk_token=unk))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        tok.decoder = decoders.Fuse()
        tok.add_special_tokens(list(special_tokens.values()))
        return tok.to_str()

    def decode(self, ids, strip_thoughts: bool = True) -> str:
        """ids -> text without special tokens; thought blocks are removed."""
        text = self.tok.decode(list(ids), skip_special_tokens=False)
        if strip_thoughts:
            text = THOUGHT_BLOCK.sub("", text)
        for s in self.special:
            text = text.replace(s, "")
        return text
