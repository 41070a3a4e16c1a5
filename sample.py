"""Generate text (or solve a Sudoku) with DiffusionGemma.

  python sample.py                                   # the bundled Sudoku solver on a built-in puzzle
  python sample.py --checkpoint DIR --prompt "Why is the sky blue?" --show
  python sample.py --random-weights --config 26b-a4b --prompt-len 4096 --steps 16 --confidence-threshold 0
"""

import argparse
import os
import sys
import time

import torch

import diffusiongemma as dg

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CHECKPOINT = os.path.join(HERE, "checkpoints", "sudoku")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT,
                   help="Hugging Face-format DiffusionGemma folder (default: the bundled Sudoku solver)")
    p.add_argument("--prompt", help="the prompt text (for a Sudoku checkpoint: an 81-character puzzle)")
    p.add_argument("--prompt-file", help="read the prompt from this file instead")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                   help="wrap the prompt in the Gemma 4 chat format with thinking off (default: on)")
    p.add_argument("--max-new-tokens", type=int, help="tokens to generate (default: the checkpoint's, 256 = one block)")
    p.add_argument("--steps", type=int, help="maximum denoising steps per block (default: the checkpoint's "
                                                 "generation_config.json, else 48)")
    p.add_argument("--entropy-bound", type=float,
                   help="entropy budget of accepted positions per step, nats (default 0.1)")
    p.add_argument("--t-max", type=float, help="temperature at the first denoising step (default 0.8)")
    p.add_argument("--t-min", type=float, help="temperature the schedule anneals towards (default 0.4)")
    p.add_argument("--confidence-threshold", type=float,
                   help="stop a block when its argmax is stable and mean entropy is below this; 0 turns "
                        "adaptive stopping off (default 0.005)")
    p.add_argument("--seed", type=int, default=0, help="seed of the one generator behind every random draw")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    p.add_argument("--dtype", default=None,
                   help="float32, bfloat16 or float16 (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--batch", type=int, default=1, help="generate for N copies of the prompt at once")
    p.add_argument("--mode", choices=["diffusion", "ar"], default="diffusion",
                   help="diffusion (block denoising) or ar (the autoregressive baseline on the same weights)")
    p.add_argument("--show", action="store_true",
                   help="redraw the canvas in the terminal at every denoising step (of the first row: with "
                        "--attempts, chain 0 only)")
    p.add_argument("--attempts", type=int,
                   help="Sudoku checkpoints: run K denoising chains as one batch and show one that a check of the "
                        "Sudoku rules finds valid (not a solver; K times the compute). Default: \"attempts\" in "
                        "the checkpoint's sudoku.json, else 1")
    p.add_argument("--random-weights", action="store_true",
                   help="build a random model of --config directly on the device (no checkpoint, no tokenizer)")
    p.add_argument("--config", default="26b-a4b", help=f"preset for --random-weights: {', '.join(dg.PRESETS)}")
    p.add_argument("--prompt-len", type=int, default=128, help="random prompt length for --random-weights")
    p.add_argument("--fast", action=argparse.BooleanOptionalAction, default=None,
                   help="the fast path: static KV cache, grouped experts, CUDA graphs (default: on with CUDA)")
    p.add_argument("--sampler-kernel", action=argparse.BooleanOptionalAction, default=None,
                   help="fast path: run the sampler as two Triton kernels, two passes over the logits "
                        "(default: on with CUDA)")
    p.add_argument("--compile-layers", action="store_true",
                   help="fast path: torch.compile the layers' norms, RoPE, gates and routing (fewer, fused kernels; "
                        "bf16 weights; the first pass pays for compiling)")
    p.add_argument("--autotune", action="store_true",
                   help="with --compile-layers: let inductor time Triton templates against aten for every "
                        "compiled GEMM (max-autotune; faster expert GEMMs, minutes more compiling once)")
    p.add_argument("--fuse-commit", action=argparse.BooleanOptionalAction, default=True,
                   help="fast path: commit each finished block in the same pass as the next block's first denoising "
                        "step, so that the weights stream once for both (default: on)")
    p.add_argument("--fuse-prefill", action=argparse.BooleanOptionalAction, default=True,
                   help="fast path: run the prompt's last prefill chunk in the same pass as the first block's first "
                        "denoising step, where that chunk is a whole one (a prompt of at least 2,048 tokens; "
                        "default: on)")
    p.add_argument("--fp8", action="store_true",
                   help="store the routed experts in float8 e4m3 with one scale per output row: half the bytes a "
                        "pass streams, faster on an H100; an approximation of the bf16 model, not exact (inference)")
    p.add_argument("--benchmark", action="store_true",
                   help="time --repeat runs after a warm-up: median ms per pass (the prefill, with the first step "
                        "or alone; denoise; the commit with the next block's first step or alone; or one AR token), "
                        "tok/s, peak memory, and the weights streamed per pass against the card's copy bandwidth")
    p.add_argument("--repeat", type=int, default=3, help="timed runs of --benchmark")
    return p.parse_args(argv)


def random_model(preset, device, dtype, seed):
    """A random model of a preset, allocated once, directly on the device."""
    cfg = dg.Config.preset(preset)
    with torch.device("meta"):
        model = dg.DiffusionGemma(cfg)
    model = model.to(dtype).to_empty(device=device)
    torch.manual_seed(seed)
    with torch.no_grad():
        model.init_weights(std=0.02)
    return model.eval()


def weight_bytes_per_pass(model, tokens, head=True):
    """Bytes of weights one forward over `tokens` tokens must read: everything but the experts, plus
    the experts that are expected to be hit under uniform routing, E * (1 - (1 - k/E)^tokens) per layer.
    The embedding rows looked up are few, but the tied head (head=True: denoise, AR) reads the whole matrix;
    an encoder pass with no head (prefill, commit) does not."""
    cfg = model.cfg
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    expert_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." in n)
    E, k = cfg.num_experts, cfg.top_k_experts
    hit = E * (1 - (1 - k / E) ** tokens)
    embedding = 0 if head else model.embed_tokens.weight.numel() * model.embed_tokens.weight.element_size()
    return total - expert_bytes + expert_bytes * hit / E - embedding


def copy_bandwidth(device, nbytes=2 ** 30, repeat=20):
    """The card's device-to-device copy bandwidth in bytes/s, counting bytes read and written (median of
    `repeat` copies of a random 1 GiB buffer): the rate at which a pass can stream its weights at best."""
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * nbytes / sorted(times)[len(times) // 2]


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else float("nan")


def benchmark(args, model, run, fast, device, T):
    """Times `run` (one generate / generate_ar call) --repeat times after a warm-up that records the CUDA
    graphs, and prints a table: median ms per pass, its weight bytes and the floor (those bytes at the
    card's copy bandwidth), then tok/s and peak memory. T: the prompt's length."""
    cfg, B = model.cfg, args.batch
    run()  # warm-up: records the graphs
    fast.timings()
    torch.cuda.reset_peak_memory_stats()
    results = [run() for _ in range(args.repeat)]
    times = fast.timings()
    peak, reserved = torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30
    bw = copy_bandwidth(device)
    C = cfg.canvas_length
    passes = {"prefill": (B * T, False), "prefill+denoise": (B * (T + C), True), "denoise": (B * C, True),
              "commit": (B * C, False), "commit+denoise": (2 * B * C, True), "ar": (B, True)}
    print(f"benchmark: {torch.cuda.get_device_name()} | copy bandwidth {bw / 1e12:.2f} TB/s | "
          f"weights {weight_bytes_per_pass(model, 10**9) / 1e9:.1f} GB | batch {B} | prompt {T} | "
          f"fast path {'with' if fast.graphs else 'without'} CUDA graphs, "
          f"{'Triton' if fast.sampler is dg.sampler_kernels else 'eager'} sampler, "
          f"{'compiled' if fast.compiled_layers else 'eager'} layers{' (autotuned)' if args.autotune else ''}, "
          f"{'fp8 experts' if args.fp8 else 'bf16 experts'}"
          f"{' (our Triton kernel)' if model.layers[0].experts.few_rows_kernel else ''}")
    print(f"{'pass':14} {'calls':>6} {'median ms':>10} {'weights GB':>11} {'floor ms':>9} {'of copy bw':>11}")
    for name, ms in times.items():
        tokens, head = passes[name]
        gb = weight_bytes_per_pass(model, tokens, head) / 1e9
        floor = gb * 1e9 / bw * 1e3
        print(f"{name:14} {len(ms):6d} {median(ms):10.2f} {gb:11.2f} {floor:9.2f} {floor / median(ms):10.0%}")
    res = results[len(results) // 2]
    tps = median([r.tokens_per_second for r in results])
    decode = median([sum(r.new_tokens) / (r.seconds - r.prefill_seconds) for r in results])
    line = [f"{sum(res.new_tokens)} new tokens", f"{tps:.1f} tok/s end to end (median of {args.repeat})",
            f"{decode:.1f} tok/s after the prefill{' (and the first step in it)' if res.first_step_in_prefill else ''}"]
    if args.mode == "diffusion":
        # every block boundary runs a commit, or (fused) a commit+denoise in place of the next block's first step;
        # a first step inside the prefill (prefill+denoise) counts in the prefill's time, not after it
        fused, denoise_ms = "commit+denoise" in times, median(times["denoise"])
        join_ms = sum(median(times[name]) for name in ("commit", "commit+denoise") if name in times)

        def rest_ms(r):  # per step: a run's time after the prefill less its passes (at their median times)
            n_steps, joins = sum(r.steps), len(r.steps) - 1
            passes_ms = denoise_ms * (n_steps - joins * fused - r.first_step_in_prefill) + join_ms * joins
            return ((r.seconds - r.prefill_seconds) * 1e3 - passes_ms) / n_steps
        rest = median([rest_ms(r) for r in results])
        line += [f"steps/block {res.steps}", f"sampler and the rest {rest:.2f} ms/step"]
        if fused:
            line.append(f"commit inside commit+denoise {median(times['commit+denoise']) - denoise_ms:.2f} ms")
    print(" | ".join(line))
    print(f"peak memory {peak:.1f} GiB allocated, {reserved:.1f} GiB reserved")


class CanvasView:
    """Redraws the denoising canvas in place: each step, the canvas as text (noise turning into words)."""

    def __init__(self, render):
        self.render, self.lines = render, 0

    def __call__(self, block, step, canvas, argmax):
        text = self.render(canvas[0].tolist())
        out = f"block {block + 1} step {step + 1}\n{text}"
        if self.lines:
            sys.stdout.write(f"\x1b[{self.lines}F\x1b[J")  # up to the first line of the last frame, clear below
        sys.stdout.write(out + "\n")
        sys.stdout.flush()
        self.lines = out.count("\n") + 1
        time.sleep(0.03)


def load(args):
    device = dg.resolve_device(args.device)
    dtype = dg.resolve_dtype(args.dtype or ("bfloat16" if device.startswith("cuda") else "float32"))
    if args.random_weights:
        return random_model(args.config, device, dtype, args.seed), None, device
    model = dg.DiffusionGemma.from_pretrained(args.checkpoint, device=device, dtype=dtype)
    return model, args.checkpoint, device


def main(argv=None):
    args = parse_args(argv)
    if args.batch < 1:
        raise dg.DiffusionGemmaError(f"--batch must be >= 1 (got {args.batch}); "
                                     f"it is the number of prompts run together")
    if args.repeat < 1:
        raise dg.DiffusionGemmaError(f"--repeat must be >= 1 (got {args.repeat}); it is the number of timed runs")
    if args.prompt_file and not os.path.isfile(args.prompt_file):
        raise dg.DiffusionGemmaError(f"prompt file {args.prompt_file!r} does not exist; give the path of a text file")
    model, ckpt, device = load(args)
    cfg = model.cfg
    gen = dg.GenerationConfig.from_pretrained(
        ckpt, max_new_tokens=args.max_new_tokens, max_denoising_steps=args.steps, entropy_bound=args.entropy_bound,
        t_max=args.t_max, t_min=args.t_min, confidence_threshold=args.confidence_threshold)
    g = torch.Generator(device=device).manual_seed(args.seed)
    sudoku = None
    if ckpt is not None and os.path.isfile(os.path.join(ckpt, "sudoku.json")):
        import train_sudoku as sudoku
    if args.attempts is not None and sudoku is None:
        raise dg.DiffusionGemmaError("--attempts is for Sudoku checkpoints (a rule check picks among the chains)")
    prompt_text = args.prompt
    if args.prompt_file:
        with open(args.prompt_file, encoding="utf-8-sig") as f:
            prompt_text = f.read()
    attempts = 1

    # the prompt's token ids, and how to show tokens as text
    if args.random_weights:
        ids = torch.randint(3, cfg.vocab_size, (1, args.prompt_len), generator=g, device=device).tolist()[0]
        render = lambda t: " ".join(map(str, t[:48])) + " ..."  # noqa: E731
    elif sudoku is not None:
        tok = dg.Tokenizer.from_pretrained(ckpt)
        fmt = sudoku.read_meta(ckpt)["format"]
        try:
            puzzle = sudoku.parse_puzzle(sudoku.EXAMPLE_PUZZLE if prompt_text is None else prompt_text)
            sudoku.grade(puzzle)  # a puzzle whose clues admit no solution fails here
        except ValueError as e:
            raise dg.DiffusionGemmaError(f"the prompt is not a Sudoku puzzle for this checkpoint: {e}") from None
        ids = sudoku.prompt_ids(tok, puzzle, fmt)
        attempts = sudoku.read_attempts(args.attempts, ckpt)
        render = lambda t: sudoku.format_grid(sudoku.board(tok, t, fmt), puzzle)  # noqa: E731
    else:
        tok = dg.Tokenizer.from_pretrained(ckpt)
        ids = tok.encode_prompt(prompt_text or "", chat=args.chat)
        render = lambda t: tok.decode(t).replace("\n", " ")[:2000]  # noqa: E731
    if len(ids) + min(gen.max_new_tokens, cfg.canvas_length) > cfg.max_position_embeddings:
        raise dg.DiffusionGemmaError(f"prompt of {len(ids)} tokens does not fit the context of "
                                     f"{cfg.max_position_embeddings}; shorten it")
    if attempts > 1:
        if args.batch != 1:
            raise dg.DiffusionGemmaError(f"--batch and the {attempts} chains (--attempts, or the checkpoint's "
                                         "sudoku.json) both set the batch; give one")
        args.batch = attempts  # the chains are the batch's rows
    prompts = [ids] * args.batch

    use_fast = args.fast if args.fast is not None else device.startswith("cuda")
    if args.autotune and not args.compile_layers:
        raise dg.DiffusionGemmaError("--autotune tunes the compiled layers; add --compile-layers")
    fix = "drop --no-fast" if args.fast is False else "add --fast (or use a CUDA device)"
    if args.compile_layers and not use_fast:
        raise dg.DiffusionGemmaError(f"--compile-layers works on the fast path; {fix}")
    if args.benchmark and not (use_fast and device.startswith("cuda")):
        raise dg.DiffusionGemmaError("--benchmark times the fast path on a CUDA device; "
                                     + ("drop --no-fast" if args.fast is False else "use --device cuda"))
    if args.fp8:
        model.experts_to_fp8()
    fast = None
    if use_fast:
        blocks = -(-gen.max_new_tokens // cfg.canvas_length)
        new = gen.max_new_tokens if args.mode == "ar" else blocks * cfg.canvas_length
        fast = dg.FastPath(model, batch_size=args.batch, capacity=len(ids) + new, timing=args.benchmark,
                           sampler_kernel=args.sampler_kernel is not False, compile_layers=args.compile_layers,
                           autotune=args.autotune, fuse_commit=args.fuse_commit, fuse_prefill=args.fuse_prefill)

    def run():
        if args.mode == "ar":
            return dg.generate_ar(model, prompts, max_new_tokens=gen.max_new_tokens, eos_token_id=gen.eos_token_id,
                                  pad_token_id=gen.pad_token_id, fast=fast)
        on_step = CanvasView(render) if args.show else None
        return dg.generate(model, prompts, gen, generator=g, on_step=on_step, fast=fast)

    if args.benchmark:
        return benchmark(args, model, run, fast, device, len(ids))
    res = run()

    # the result (of a Sudoku: the chain the rule check picks), then one stats line
    pick = 0
    if sudoku is not None:
        grids = [sudoku.read_answer(tok.decode(res.tokens[r, :res.new_tokens[r]].tolist())) for r in range(attempts)]
        pick = sudoku.pick_attempt(grids, puzzle)
    row = res.tokens[pick, :res.new_tokens[pick]].tolist()
    if sudoku is not None:
        print(sudoku.format_grid(sudoku.board(tok, row, fmt), puzzle))
        print("solved" if sudoku.is_valid_solution(grids[pick], puzzle) else "not solved: the grid breaks a rule")
        if attempts > 1:
            valid = sum(sudoku.is_valid_solution(grid, puzzle) for grid in grids)
            print(f"solved by chain {pick} of {attempts} (numbered from 0); {valid} of the {attempts} chains solved it"
                  if valid else f"none of the {attempts} chains solved it; chain 0 shown")
    elif args.random_weights:
        print(f"generated {len(row)} random-model tokens: {row[:16]} ...")
    else:
        print(tok.decode(row))
    stats = [f"new tokens {sum(res.new_tokens)}"]
    if args.mode == "diffusion":
        stats += [f"steps/block {res.steps}", f"tokens/forward {res.tokens_per_forward:.2f}"]
    decode_s = res.seconds - res.prefill_seconds
    prefill = "prefill and first step" if res.first_step_in_prefill else "prefill"
    stats += [f"{res.tokens_per_second:.1f} tok/s", f"{prefill} {res.prefill_seconds * 1e3:.0f} ms"]
    if device.startswith("cuda"):
        B, C = args.batch, cfg.canvas_length
        if args.mode == "diffusion":
            joins = len(res.steps) - 1  # block boundaries: a commit each, alone or with the next block's first step
            steps = sum(res.steps) - res.first_step_in_prefill  # after the prefill (decode_s)
            if fast is not None and fast.fuse_commit:
                moved = (weight_bytes_per_pass(model, B * C) * (steps - joins)
                         + weight_bytes_per_pass(model, 2 * B * C) * joins)
            else:
                moved = (weight_bytes_per_pass(model, B * C) * steps
                         + weight_bytes_per_pass(model, B * C, head=False) * joins)
        else:
            moved = weight_bytes_per_pass(model, B) * res.forwards[0]
        stats.append(f"weight bandwidth {moved / decode_s / 1e9:.3g} GB/s")
    print(" | ".join(stats))


if __name__ == "__main__":
    try:
        main()
    except dg.DiffusionGemmaError as e:
        sys.exit(f"error: {e}")
