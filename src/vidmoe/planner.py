"""The memory planner: peak host RAM and peak device memory of one generation, predicted from
the model's config before any weight is read, and the fastest residency policy that fits a budget.

Weights are counted exactly (the experts and the VAE built on the meta device; umT5-XXL and
MiniLM from their hyper-parameters); activations come from a per-token model whose constants
were fitted by measurement on the CPU (benchmarks/bench_planner.py, docs/planner.md).
Shape legend: B batch (cond + uncond = 2), L video tokens, D width, F ffn width.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from dataclasses import dataclass

from vidmoe.config import ModelConfig

MiB = 2**20
POLICIES = ("resident", "swap", "blocks", "disk")
"""Residency policies, fastest first: the order `choose_policy` tries them in."""
DTYPE_BYTES = {"bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "fp32": 4, "float32": 4}
QUANTIZE = (None, "fp8")
# Process baseline on the CPU: python + torch + transformers + vidmoe imported (VmRSS measured on
# Linux, torch 2.x, 2 cores); a CUDA context adds host RAM and device memory of its own.
# Re-measured 2026-12-07 under planner_measure.MEASURE_ENV (the 64x64 cases imply 306-334 MiB).
CPU_BASELINE = 320 * MiB
# The part of CPU_BASELINE that is the imports alone (`planner_measure.measure_baseline_rss` on the machine that
# measured CPU_BASELINE): another installation maps its shared libraries' pages differently (a
# fresh venv under /tmp measured 294 MiB), so a check of the planner shifts the prediction by
# the difference it measures.
CPU_IMPORTS = 240 * MiB
CUDA_HOST_CONTEXT = 1024 * MiB
CUDA_DEVICE_CONTEXT = 512 * MiB
RUNTIME_OVERHEAD = 48 * MiB
"""First kernels, thread pools and allocator slack of a generation (measured, CPU)."""
# Activations of one expert forward, in units of B*L*D float32 values: the fp32 residual stream
# and a block's output live throughout (2), plus the larger of the attention phase (norm,
# modulation, q/k/v and their rotated fp32 copies: 6) and the FFN phase (its two B*L*F hidden
# tensors in the compute dtype, plus 2). See docs/planner.md for how they were checked.
RESIDUAL_FACTOR = 2
ATTENTION_FACTOR = 6
# VAE decode: the decoder walked stage by stage (vidmoe/vae_memory.py), plus the code pages its
# convolution kernels touch on first use (measured: 20-26 MiB on the CPU, torch 2.13).
VAE_KERNELS_FIRST_USE = 24 * MiB
MINILM_PARAMS = 22_713_216  # all-MiniLM-L6-v2
UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


@dataclass(frozen=True, kw_only=True)
class MemoryRequest:
    """What a run asks of the machine's memory (the parts that change the prediction)."""

    width: int
    height: int
    num_frames: int
    dtype: str = "fp32"
    """The experts' weight dtype: bf16, fp16 or fp32 (`float32` etc. accepted)."""
    quantize: str | None = None
    """'fp8': block linear weights in e4m3 (one byte each) with a float32 scale per row."""
    residency: str = "resident"
    """resident, swap, blocks or disk (see `POLICIES`)."""
    device: str = "cpu"
    """'cpu' (host and device are one memory) or 'cuda'."""
    batch: int = 2
    """Samples per expert forward: cond + uncond."""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype must be bf16, fp16 or fp32; got {self.dtype!r}")
        if self.quantize not in QUANTIZE:
            raise ValueError(f"quantize must be None or 'fp8'; got {self.quantize!r}")
        if self.residency not in POLICIES:
            raise ValueError(
                f"residency must be one of {', '.join(POLICIES)}; got {self.residency!r}"
            )
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda'; got {self.device!r}")
        for name in ("width", "height", "num_frames", "batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1; got {value!r}")


@dataclass(frozen=True, kw_only=True)
class MemoryPlan:
    """Predicted peaks of one run, and what they are made of (bytes)."""

    host_peak_bytes: int
    device_peak_bytes: int
    """On the CPU the device is the host: equal to `host_peak_bytes`."""
    breakdown: dict[str, int]
    request: MemoryRequest

    def to_dict(self) -> dict:
        return {
            "host_peak_bytes": self.host_peak_bytes,
            "device_peak_bytes": self.device_peak_bytes,
            "residency": self.request.residency,
            "dtype": self.request.dtype,
            "quantize": self.request.quantize,
            "device": self.request.device,
            "breakdown": dict(self.breakdown),
        }

    def summary(self) -> str:
        r = self.request
        q = f" + {r.quantize}" if r.quantize else ""
        return (
            f"memory ({r.residency}, {r.dtype}{q}, {r.device}): host peak "
            f"{gb(self.host_peak_bytes)}, device peak {gb(self.device_peak_bytes)} (predicted)"
        )


@dataclass(frozen=True, kw_only=True)
class MemoryBudget:
    """Bytes a run may use; None leaves that memory unbounded."""

    host_bytes: int | None = None
    device_bytes: int | None = None

    def fits(self, plan: MemoryPlan) -> bool:
        host_ok = self.host_bytes is None or plan.host_peak_bytes <= self.host_bytes
        device_ok = self.device_bytes is None or plan.device_peak_bytes <= self.device_bytes
        return host_ok and device_ok

    def describe(self) -> str:
        parts = [
            f"{k}={gb(v)}"
            for k, v in (("host", self.host_bytes), ("device", self.device_bytes))
            if v is not None
        ]
        return ",".join(parts) or "unbounded"


def gb(n: int | None) -> str:
    return "unbounded" if n is None else f"{n / 1e9:.2f}GB"


def parse_budget(text: str) -> MemoryBudget:
    """`host=24GB,device=24GB` (either part may be left out; B, KB, MB, GB, TB decimal, KiB..TiB
    binary) -> a MemoryBudget."""
    values: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, amount = part.partition("=")
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", amount)
        unit = (m.group(2).lower() or "b") if m else ""
        if (
            key.strip() not in ("host", "device")
            or not m
            or unit not in UNITS
            or key.strip() in values
        ):
            raise ValueError(
                f"--memory-budget takes host=SIZE,device=SIZE (SIZE like 24GB or "
                f"512MiB); got {text!r}"
            )
        values[key.strip()] = int(float(m.group(1)) * UNITS[unit])
    if not values:
        raise ValueError(
            f"--memory-budget names no memory; got {text!r}: use e.g. host=24GB,device=24GB"
        )
    return MemoryBudget(host_bytes=values.get("host"), device_bytes=values.get("device"))


@functools.lru_cache(maxsize=8)
def expert_bytes(
    config: ModelConfig, dtype: str, quantize: str | None
) -> dict[str, dict[str, int]]:
    """Per expert: bytes of all its weights ('total') and of its largest block ('block'), as
    stored (fp8 weights one byte each, their float32 scales included); built on meta."""
    import torch

    from vidmoe.models.fp8 import fp8_bytes, quantize_fp8_
    from vidmoe.models.transformer import WanTransformer

    torch_dtype = {2: torch.bfloat16, 4: torch.float32}[DTYPE_BYTES[dtype]]
    out = {}
    for name in config.moe.expert_names:
        with torch.device("meta"):
            expert = WanTransformer(config.transformer_for(name)).to(torch_dtype)
        if quantize == "fp8":
            quantize_fp8_(expert)
        block = max((fp8_bytes(b) for b in expert.blocks), default=0)
        out[name] = {"total": fp8_bytes(expert), "block": block}
    return out


@functools.lru_cache(maxsize=8)
def _meta_vae(config: ModelConfig):
    import torch

    from vidmoe.models.vae import WanVAE

    with torch.device("meta"):
        return WanVAE(config.vae)


@functools.lru_cache(maxsize=8)
def vae_bytes(config: ModelConfig) -> int:
    """The VAE's float32 weights (it always runs in float32)."""
    return sum(p.numel() for p in _meta_vae(config).parameters()) * 4


def text_encoder_bytes(kind: str) -> tuple[int, int]:
    """(weight bytes, activation bytes of encoding 2 prompts) of a text encoder by name."""
    if kind == "umt5-xxl":
        from vidmoe.models.umt5 import UMT5_XXL_HPARAMS as h

        per_layer = 4 * h["dim"] * h["dim_attn"] + 3 * h["dim"] * h["dim_ffn"] + 2 * h["dim"]
        params = h["vocab"] * h["dim"] + h["num_layers"] * (
            per_layer + h["num_buckets"] * h["num_heads"]
        )
        tokens = 2 * 512
        return params * 2, tokens * (h["dim"] * 16 + h["dim_ffn"] * 4) + 2 * h[
            "num_heads"
        ] * 512 * 512 * 4
    if kind == "minilm":
        return MINILM_PARAMS * 4, 16 * MiB
    return 1 * MiB, 8 * MiB  # umt5-tiny (tests)


def forward_activation_bytes(config: ModelConfig, request: MemoryRequest) -> int:
    """Peak activations of the largest expert forward (B samples) plus the latents it reads."""
    vae = config.vae
    lat_f = (request.num_frames - 1) // vae.temporal_stride + 1
    lat_h, lat_w = request.height // vae.spatial_stride, request.width // vae.spatial_stride
    elt = 2 if request.quantize == "fp8" else DTYPE_BYTES[request.dtype]
    peak = 0
    for name in config.moe.expert_names:
        t = config.transformer_for(name)
        p, q, r = t.patch_size
        tokens = max(lat_f // p, 1) * max(lat_h // q, 1) * max(lat_w // r, 1)
        b_l = request.batch * tokens
        phase = max(ATTENTION_FACTOR * t.dim * 4, 2 * t.ffn_dim * elt + 2 * t.dim * 4)
        act = b_l * (RESIDUAL_FACTOR * t.dim * 4 + phase)
        act += tokens * t.head_dim * 12  # RoPE angles (float64) and rotations (complex64)
        act += request.batch * t.text_len * (t.text_dim + t.dim) * 4  # padded + embedded context
        if t.window_size != (-1, -1):  # chunked windowed attention: one chunk's scores and mask
            chunk = min(2048, tokens)
            reach = chunk + max(t.window_size[0], 0) + max(t.window_size[1], 0)
            act += request.batch * t.num_heads * chunk * min(reach, tokens) * 5
        peak = max(peak, act)
    latents = vae.z_dim * lat_f * lat_h * lat_w * 4
    return peak + 6 * latents  # x, v, the solver's history, the guided pair


def text_kv_cache_bytes(config: ModelConfig, request: MemoryRequest) -> int:
    """The cross-attention keys and values every expert keeps for its prompt on the CPU
    (`CrossAttention.text_kv`): per block 2 x B x S x D in the compute dtype."""
    elt = 2 if request.quantize == "fp8" else DTYPE_BYTES[request.dtype]
    total = 0
    for name in config.moe.expert_names:
        t = config.transformer_for(name)
        total += t.num_layers * 2 * request.batch * t.text_len * t.dim * elt
    return total


def decode_activation_bytes(config: ModelConfig, request: MemoryRequest) -> int:
    """Peak of the VAE decode (float32, chunk by chunk): each decoder stage's tensors and
    convolution buffers, the causal cache, the decoded pieces and the clamped clip
    (`vae_memory.decode_peak_bytes`), plus the first use of its kernels."""
    from vidmoe.vae_memory import decode_peak_bytes

    parts = decode_peak_bytes(
        _meta_vae(config),
        frames=request.num_frames,
        height=request.height,
        width=request.width,
        device=request.device,
    )
    return VAE_KERNELS_FIRST_USE + parts["peak"]


def predict(config: ModelConfig, request: MemoryRequest) -> MemoryPlan:
    """Predict the peak host RAM and device memory of one generation (nothing heavy is read).

    Semantics of the policies (issue 21): `resident` keeps every expert, the VAE and the text
    encoder on the device; `swap` keeps one expert on the device (the idle one leaves before the
    next arrives) and the idle ones in host RAM; `disk` holds about one expert in host RAM (the
    idle one stays in its file); `blocks` keeps the experts in host RAM and two blocks of the
    active one (current and prefetched) plus its non-block weights on the device. The text
    encoder runs on the host except under `resident`; the VAE lives on the device.
    """
    experts = expert_bytes(config, request.dtype, request.quantize)
    totals = [e["total"] for e in experts.values()]
    text_w, text_act = text_encoder_bytes(config.text_encoder)
    vae_w = vae_bytes(config)
    fwd, dec = forward_activation_bytes(config, request), decode_activation_bytes(config, request)
    res = request.residency
    largest = max(totals)
    if res == "blocks":  # the active expert's non-block weights + two blocks (current, next)
        on_device = max(_non_block(config, n, e) + 2 * e["block"] for n, e in experts.items())
    else:
        on_device = sum(totals) if res == "resident" else largest
    held_host = {"resident": 0, "swap": sum(totals), "blocks": sum(totals), "disk": largest}[res]
    text_on_device = res == "resident"
    breakdown = {
        "experts_device": on_device,
        "experts_host": held_host,
        "vae": vae_w,
        "text_encoder": text_w,
        "text_activations": text_act,
        "forward_activations": fwd,
        "decode_activations": dec,
    }
    if request.device == "cpu":
        weights = (sum(totals) if res != "disk" else largest) + vae_w + text_w
        kv = text_kv_cache_bytes(config, request)
        peak = CPU_BASELINE + RUNTIME_OVERHEAD + weights + kv + max(text_act, fwd, dec)
        breakdown.update(baseline=CPU_BASELINE, overhead=RUNTIME_OVERHEAD, text_kv_cache=kv)
        return MemoryPlan(
            host_peak_bytes=peak, device_peak_bytes=peak, breakdown=breakdown, request=request
        )
    text_dev = text_w if text_on_device else 0
    device = CUDA_DEVICE_CONTEXT + on_device + vae_w + text_dev + max(text_act, fwd, dec)
    # host: what stays there, and the transient of loading (umT5's file is read whole; an
    # expert's mapped pages while it is copied)
    load_transient = max(text_w, largest)
    resident_host = held_host + (0 if text_on_device else text_w + text_act)
    host = CPU_BASELINE + CUDA_HOST_CONTEXT + max(resident_host, load_transient)
    breakdown.update(
        baseline=CPU_BASELINE,
        cuda_context_host=CUDA_HOST_CONTEXT,
        cuda_context_device=CUDA_DEVICE_CONTEXT,
        load_transient=load_transient,
    )
    return MemoryPlan(
        host_peak_bytes=host, device_peak_bytes=device, breakdown=breakdown, request=request
    )


def _non_block(config: ModelConfig, name: str, e: dict[str, int]) -> int:
    return e["total"] - e["block"] * config.transformer_for(name).num_layers


def choose_policy(
    config: ModelConfig,
    request: MemoryRequest,
    budget: MemoryBudget,
    *,
    allow_fp8: bool = False,
    policies: tuple[str, ...] = POLICIES,
    fp8_hint: str = "--quantize auto",
) -> MemoryPlan:
    """The fastest policy (in `policies` order; per policy the request's format first, then
    fp8 when allowed) whose prediction fits `budget`; ValueError naming what would fit
    (`fp8_hint`: how the user allows fp8, named in that error; empty: not offered)."""
    tried = []
    for residency in (p for p in POLICIES if p in policies):
        formats = [request.quantize] + (["fp8"] if allow_fp8 and request.quantize is None else [])
        for quantize in formats:
            candidate = dataclasses.replace(request, residency=residency, quantize=quantize)
            plan = predict(config, candidate)
            if budget.fits(plan):
                return plan
            tried.append(plan)
    best = min(
        tried,
        key=lambda p: (
            max(p.host_peak_bytes - (budget.host_bytes or math.inf), 0),
            p.device_peak_bytes,
        ),
    )
    r = best.request
    hint = (
        "" if allow_fp8 or request.quantize or not fp8_hint else f", or allow fp8 with {fp8_hint}"
    )
    raise ValueError(
        f"no policy fits the memory budget {budget.describe()} for {config.name} at "
        f"{request.width}x{request.height}x{request.num_frames}: the smallest, {r.residency}"
        f"{' + ' + r.quantize if r.quantize else ''}, needs host {gb(best.host_peak_bytes)}, device "
        f"{gb(best.device_peak_bytes)}; raise the budget, or use a smaller size or fewer frames{hint}"
    )


def machine_budget(device: str = "cpu") -> MemoryBudget:
    """This machine's available memory now: MemAvailable of /proc/meminfo and, for 'cuda', the
    free memory `torch.cuda.mem_get_info` reports (None where it cannot be read)."""
    host = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    host = int(line.split()[1]) * 1024
    except OSError:
        pass
    device_bytes = host
    if device.startswith("cuda"):
        import torch

        device_bytes = (
            torch.cuda.mem_get_info(torch.device(device))[0] if torch.cuda.is_available() else None
        )
    return MemoryBudget(host_bytes=host, device_bytes=device_bytes)
