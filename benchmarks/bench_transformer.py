"""Per-step time of one vidmoe expert against diffusers' WanTransformer3DModel with the same
weights, in the same process (the ratio is the number to read; absolute seconds are the machine's).

    python benchmarks/bench_transformer.py --dim 512 --layers 8 --frames 5 --size 32 --write docs/performance.md

On a CUDA GPU (Wan2.1-1.3B shape, 81 frames at 480x832 = latent 21x60x104, 32760 tokens) it also
reports achieved TFLOP/s, the fraction of a same-process GEMM rate, and peak memory:

    python benchmarks/bench_transformer.py --device cuda --dtype bfloat16 --dim 1536 --layers 30 \
        --ffn-dim 8960 --heads 12 --frames 21 --size 60 --width 104 --repeats 5

`--compile` also times the same expert with its blocks compiled (regional torch.compile, as
`vidmoe generate --compile`), after the eager runs, in the same process; `--demo` takes the shipped
demo's expert and latent shape (no diffusers comparison: diffusers has no pooled-text input):

    python benchmarks/bench_transformer.py --demo --compile --dtype bfloat16 --repeats 20
"""

from __future__ import annotations

import argparse
import copy
import math
import platform
import statistics
import sys
import time

import torch

from vidmoe.config import TransformerConfig
from vidmoe.io.keymaps import transformer_config_to_diffusers, transformer_to_diffusers
from vidmoe.models.transformer import WanTransformer

GEMM_N = 8192  # the machine reference: an N x N x N matmul in the benchmark's dtype


def _time(fn, repeats: int, warmup: int, sync) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return out


def forward_flops(cfg: TransformerConfig, batch: int, tokens: int, text_len: int) -> int:
    """Forward FLOPs of one call, counted analytically (a multiply-add is 2 FLOPs).

    B batch, L video tokens, S text tokens, D width, Fd FFN width, N heads, Dh head width,
    P patch volume, C_in / C_out latent channels, T text-encoder width:
      per block:
        self-attn q, k, v, o      4 * 2*B*L*D*D
        cross-attn q, o           2 * 2*B*L*D*D
        cross-attn k, v (text)    2 * 2*B*S*D*D
        FFN (two linears)         2 * 2*B*L*D*Fd
        self-attn QK^T and AV     4*B*N*L*L*Dh      (global attention: S_q = S_k = L)
        cross-attn QK^T and AV    4*B*N*L*S*Dh      (S_k = S)
      once:
        patch embedding           2*B*L*(C_in*P)*D
        head                      2*B*L*D*(P*C_out)
        text embedding            2*B*S*(T*D + D*D)
    Left out (well under 1%): norms, RoPE, modulation, softmax, GELU, the timestep MLPs.
    """
    B, L, S, D, Fd = batch, tokens, text_len, cfg.dim, cfg.ffn_dim
    N, Dh, P = cfg.num_heads, cfg.head_dim, math.prod(cfg.patch_size)
    block = (
        4 * 2 * B * L * D * D
        + 2 * 2 * B * L * D * D
        + 2 * 2 * B * S * D * D
        + 2 * 2 * B * L * D * Fd
        + 4 * B * N * L * L * Dh
        + 4 * B * N * L * S * Dh
    )
    once = (
        2 * B * L * cfg.in_dim * P * D
        + 2 * B * L * D * P * cfg.out_dim
        + 2 * B * S * (cfg.text_dim * D + D * D)
    )
    return cfg.num_layers * block + once


def gemm_tflops(dtype: torch.dtype, device: str, n: int = GEMM_N) -> float:
    """Mean rate of an n x n x n matmul over 10 calls after 3 warm-ups, TFLOP/s."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    times = _time(lambda: a @ b, 10, 3, torch.cuda.synchronize)
    a = b = None  # free them before the models run
    torch.cuda.empty_cache()
    return 2 * n**3 / statistics.mean(times) / 1e12


def cast_like_from_pretrained(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast as `from_pretrained(torch_dtype=dtype)` does: parameters of `_keep_in_fp32_modules`
    stay float32, the other parameters go to `dtype`, buffers (RoPE tables) stay as built."""
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    for name, p in model.named_parameters():
        if p.is_floating_point():
            p.data = p.data.to(torch.float32 if any(k in name.split(".") for k in keep) else dtype)
    return model


def demo_shape(args) -> TransformerConfig:
    """The shipped demo's expert config; sets args' latent shape to the demo's default clip."""
    from vidmoe.loading import model_config_for

    config = model_config_for(None)
    cfg = config.transformer_for(config.moe.expert_names[0])
    (w, h), vae = config.default_size, config.vae
    args.frames = (config.default_num_frames - 1) // vae.temporal_stride + 1
    args.size, args.width = h // vae.spatial_stride, w // vae.spatial_stride
    args.dim, args.layers, args.ffn_dim, args.heads = (
        cfg.dim,
        cfg.num_layers,
        cfg.ffn_dim,
        cfg.num_heads,
    )
    args.text_len = cfg.text_len
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--frames", type=int, default=5, help="latent frames")
    ap.add_argument("--size", type=int, default=32, help="latent height (and width unless --width)")
    ap.add_argument("--width", type=int, default=None, help="latent width (default: --size)")
    ap.add_argument("--ffn-dim", type=int, default=None, help="FFN width (default: 4 * dim)")
    ap.add_argument("--heads", type=int, default=None, help="attention heads (default: dim // 64)")
    ap.add_argument("--text-len", type=int, default=512, help="text tokens")
    ap.add_argument("--batch", type=int, default=2, help="batch (2: cond + uncond)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write", default=None, help="append the table to this markdown file")
    ap.add_argument("--compile", action="store_true", help="also time the blocks compiled")
    ap.add_argument("--attention", default="auto", help="vidmoe's attention backend")
    ap.add_argument("--demo", action="store_true", help="the demo's expert and latent shape")
    args = ap.parse_args()
    defaults = {
        "width": args.size,
        "ffn_dim": 4 * args.dim,
        "heads": args.dim // 64,
        "text_len": 512,
        "batch": 2,
        "device": "cpu",
    }
    for k in ("width", "ffn_dim", "heads"):
        if getattr(args, k) is None:
            setattr(args, k, defaults[k])
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        ap.error("--device cuda: torch.cuda.is_available() is False")
    torch.set_num_threads(args.threads)
    try:
        from diffusers import WanTransformer3DModel

        if args.demo:
            WanTransformer3DModel = None
    except ImportError as e:
        if not cuda and not args.compile:
            sys.exit(f"diffusers is needed for the CPU comparison ({e}); pip install diffusers")
        print(
            f"NOTE: diffusers failed to import ({e}); timing vidmoe alone against the GEMM "
            "reference.",
            file=sys.stderr,
        )
        WanTransformer3DModel = None
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    warmup = 2 if cuda else 1

    dtype = getattr(torch, args.dtype)
    cfg = TransformerConfig(
        dim=args.dim,
        ffn_dim=args.ffn_dim,
        num_heads=args.heads,
        num_layers=args.layers,
        text_len=args.text_len,
        text_dim=4096,
    )
    if args.demo:
        cfg = demo_shape(args)
    t_build = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(args.device):  # random init on the GPU: seconds, not minutes, at 1.3B
        ours = WanTransformer(cfg)
        torch.nn.init.normal_(ours.head.head.weight, std=0.02)  # the release init zeroes it
        ours = ours.to(dtype).eval()
        backend = ours.set_attention(args.attention, device=args.device)
        theirs = None
        if WanTransformer3DModel is not None:
            theirs = WanTransformer3DModel(**transformer_config_to_diffusers(cfg))
            theirs = cast_like_from_pretrained(theirs, dtype).eval()
            theirs.load_state_dict(
                {transformer_to_diffusers(k): v for k, v in ours.state_dict().items()}
            )
        x = torch.randn(args.batch, cfg.in_dim, args.frames, args.size, args.width, dtype=dtype)
        ctx = torch.randn(args.batch, args.text_len, cfg.text_dim, dtype=dtype)
        sigma = torch.full((args.batch,), 0.7)
    sync()
    t_build = time.perf_counter() - t_build
    p_t, p_h, p_w = cfg.patch_size
    tokens = (args.frames // p_t) * (args.size // p_h) * (args.width // p_w)
    flops = forward_flops(cfg, args.batch, tokens, args.text_len)
    gemm = gemm_tflops(dtype, args.device) if cuda else None

    def run_ours():
        return ours(x, sigma, ctx)

    def run_theirs():
        return theirs(x, timestep=sigma * 1000, encoder_hidden_states=ctx, return_dict=False)

    def measure(fn, model):
        """Times of fn; on CUDA also the peak GiB it alone needs: its own weights plus the
        forward's peak allocation above what was resident before (the other model not counted)."""
        if not cuda:
            return _time(fn, args.repeats, warmup, sync), None
        sync()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        times = _time(fn, args.repeats, warmup, sync)
        weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
        return times, (torch.cuda.max_memory_allocated() - base + weights) / 2**30

    with torch.no_grad():
        err = None
        if theirs is not None:
            ref = run_theirs()[0]
            got = run_ours()
            err = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
            del ref, got
        ratio_t = None
        if not cuda and theirs is not None and not args.compile:
            # on a shared CPU the two alternate call by call, so both see the same load; vs
            # diffusers is then the median of the pairs' ratios
            _time(run_ours, 0, warmup, sync), _time(run_theirs, 0, warmup, sync)
            pairs = [
                (_time(run_ours, 1, 0, sync)[0], _time(run_theirs, 1, 0, sync)[0])
                for _ in range(args.repeats)
            ]
            t_ours, t_theirs = [o for o, _ in pairs], [t for _, t in pairs]
            ratio_t = statistics.median(o / t for o, t in pairs)
            mem_ours = mem_theirs = None
        else:
            t_ours, mem_ours = measure(run_ours, ours) if cuda or not args.compile else (None, None)
            t_theirs, mem_theirs = (
                measure(run_theirs, theirs) if theirs is not None else (None, None)
            )
        if args.compile:
            compiled = copy.deepcopy(ours)
            compiled.compile_blocks()
            eager = run_ours()
            sync()
            t0 = time.perf_counter()
            compiled_out = compiled(x, sigma, ctx)  # the compilation
            sync()
            t_compile = time.perf_counter() - t0
            err_c = ((compiled_out.float() - eager.float()).norm() / eager.float().norm()).item()
            del eager, compiled_out
            # eager and compiled calls alternate, so both see the same load on a shared machine
            pairs = [
                (
                    _time(run_ours, 1, 0, sync)[0],
                    _time(lambda: compiled(x, sigma, ctx), 1, 0, sync)[0],
                )
                for _ in range(args.repeats)
            ]
            t_ours = [e for e, _ in pairs]
            t_comp, ratio_c = [c for _, c in pairs], statistics.median(c / e for e, c in pairs)
    m_ours = statistics.median(t_ours)
    m_theirs = statistics.median(t_theirs) if t_theirs else None
    n = sum(p.numel() for p in ours.parameters())

    impls = [("vidmoe `WanTransformer`", m_ours, mem_ours)]
    if args.compile:
        impls.append(("vidmoe, blocks compiled", statistics.median(t_comp), None))
    if m_theirs is not None:
        impls.append(("diffusers `WanTransformer3DModel`", m_theirs, mem_theirs))
    rows = []
    for name, m, mem in impls:
        vs = f"{m / m_theirs:.2f}x" if m_theirs is not None else "n/a"
        if ratio_t is not None and m is m_ours:
            vs = f"{ratio_t:.2f}x"
        row = f"| {name} | {m:.4f} | {vs} |"
        if args.compile:
            row += (
                f" {1.0 if m is m_ours else ratio_c if 'compiled' in name else m / m_ours:.2f}x |"
            )
        if cuda:
            rate = flops / m / 1e12
            row += f" {rate:.4g} | {rate / gemm:.1%} | {'n/a' if mem is None else f'{mem:.2f}'} |"
        rows.append(row)
    cols = ["implementation", "s / step", "vs diffusers"] + (["vs eager"] if args.compile else [])
    if cuda:
        cols += ["TFLOP/s", "MFU vs GEMM", "peak GiB"]
    table = "\n".join(["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols), *rows])

    batch = "Cond+uncond batch of 2" if args.batch == 2 else f"Batch of {args.batch}"
    shape = (
        f"{args.frames}x{args.size}x{args.width} latent, "
        if cuda or args.width != args.size
        else ""
    )
    model = (
        f"expert dim {args.dim}, {args.layers} layers"
        + (
            f", FFN {args.ffn_dim}, {args.heads} heads"
            if cuda or args.ffn_dim != 4 * args.dim or args.heads != args.dim // 64
            else ""
        )
        + f", {n / 1e6:.1f}M parameters"
    )
    agree = (
        f"Outputs agree to {err:.1e} relative."
        if err is not None
        else "Not compared with diffusers."
    )
    if args.compile:
        agree += (
            f" Compiled blocks agree with eager to {err_c:.1e} relative; the first compiled "
            f"call (the compilation) took {t_compile:.1f} s. Eager and compiled calls alternate "
            f"({args.repeats} pairs); vs eager is the median of the pairs' ratios."
        )
    if backend != "sdpa":
        agree += f" Attention backend: {backend}."
    rates = f"{flops / m_ours / 1e12:.3g} TFLOP/s vidmoe" + (
        f", {flops / m_theirs / 1e12:.3g} diffusers" if m_theirs is not None else ""
    )
    pairs_note = (
        " calls, vidmoe and diffusers alternating; vs diffusers is the median of the pairs' ratios"
        if ratio_t is not None
        else ""
    )
    if cuda:
        where = (
            f"{args.dtype} on {torch.cuda.get_device_name()}, torch {torch.__version__} "
            f"(CUDA {torch.version.cuda})"
        )
        head = (
            f"{batch}, {shape}{tokens} video tokens, {args.text_len} text tokens; {model}; {where}. "
            f"Median of {args.repeats} after {warmup} warm-ups. {agree} "
            f"A forward is {flops / 1e12:.4g} TFLOP (counted analytically: linears, attention, "
            f"patch embedding, head; see `forward_flops`). MFU vs GEMM = achieved TFLOP/s / "
            f"{GEMM_N}x{GEMM_N}x{GEMM_N} {args.dtype} matmul rate in the same process, "
            f"{gemm:.1f} TFLOP/s (mean of 10 after 3 warm-ups). Peak GiB = the implementation's "
            f"weights + its forward's peak allocation. Models built in {t_build:.1f} s."
        )
        title = (
            "Expert transformer vs diffusers (GPU)"
            if theirs is not None
            else "Expert transformer (GPU)"
        )
    else:
        head = (
            f"{batch}, {shape}{tokens} video tokens, {args.text_len} text tokens; {model}; {args.dtype} on "
            f"CPU, {args.threads} threads, {platform.machine()}, torch {torch.__version__}. Median of "
            f"{args.repeats}{pairs_note}. {agree} Forward {flops / 1e12:.3g} TFLOP (analytic): {rates}."
        )
        title = "Expert transformer vs diffusers"
    if args.compile:
        title = (
            ("Demo expert" if args.demo else "Expert transformer")
            + f": blocks compiled vs eager, {args.dtype}"
            + (" (GPU)" if cuda else "")
        )
    flags = {"compile": False, "demo": False, "attention": "auto"}
    cmd = "python benchmarks/bench_transformer.py " + " ".join(
        (f"--{k}" if v is True else f"--{k.replace('_', '-')} {v}")
        for k, v in vars(args).items()
        if k != "write"
        and v is not None
        and not (k in defaults and v == defaults[k])
        and not (k in flags and v == flags[k])
        and not (
            args.demo
            and k in ("dim", "layers", "frames", "size", "width", "ffn_dim", "heads", "text_len")
        )
    )
    text = f"\n## {title}\n\n{head}\n\n{table}\n\n```\n{cmd}\n```\n"
    print(text)
    if args.write:
        with open(args.write, "a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
