"""Memory per rank of a parallel run, derived from the single-process memory planner
(vidmoe/planner.py) and the parallel layout.

What each mode changes on one rank: Ulysses over U ranks splits the sequence (the per-token
activations / U, the weights whole); CFG parallel halves the batch (cond on one rank, uncond on
the other); expert groups leave each rank the experts of its group only; sharded experts
(FSDP2 over the P ranks that run the same experts) keep 1/P of the weights plus the gathered
root (embeddings, head) and two blocks (the running one and the prefetched next one).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

from vidmoe.config import ModelConfig
from vidmoe.parallel.world import Layout
from vidmoe.planner import (
    CPU_BASELINE,
    CUDA_DEVICE_CONTEXT,
    CUDA_HOST_CONTEXT,
    DTYPE_BYTES,
    RUNTIME_OVERHEAD,
    MemoryPlan,
    MemoryRequest,
    decode_activation_bytes,
    expert_bytes,
    forward_activation_bytes,
    gb,
    predict,
    text_encoder_bytes,
    vae_bytes,
)
from vidmoe.planner_measure import measure_env

ULYSSES_BUFFER_FACTOR = 2
"""The all-to-all's send and receive buffers of one q/k/v-sized tensor, in units of the
rank's B*L/U*D float32 values (an estimate: one all-to-all in flight at a time)."""
FSDP_GATHER_BUFFERS = 1
"""Blocks' worth of FSDP2 all-gather output alive beside the gathered weights: a block's
gathered shards are copied out of that buffer into its parameters."""
DISTRIBUTED_OVERHEAD = 64 * 2**20
"""Host RAM of joining a process group (gloo/NCCL threads and buffers), per rank (CPU measured:
docs/distributed.md)."""


@dataclass(frozen=True, kw_only=True)
class RankMemory:
    """Predicted peaks of one rank (the fullest) of a parallel run, and their parts (bytes)."""

    host_peak_bytes: int
    device_peak_bytes: int
    """On the CPU the device is the host: equal to `host_peak_bytes`."""
    breakdown: dict[str, int]
    layout: Layout
    shard_experts: bool
    shard_text_encoder: bool
    shard_ranks: int
    """The ranks each expert is sharded over (1: whole on every rank)."""
    single: MemoryPlan
    """The single-process prediction this one is derived from."""

    def to_dict(self) -> dict:
        return {
            "host_peak_bytes": self.host_peak_bytes,
            "device_peak_bytes": self.device_peak_bytes,
            "world_size": self.layout.size,
            "ulysses": self.layout.ulysses,
            "cfg": self.layout.cfg,
            "expert_groups": self.layout.expert_groups,
            "shard_experts": self.shard_experts,
            "shard_text_encoder": self.shard_text_encoder,
            "shard_ranks": self.shard_ranks,
            "breakdown": dict(self.breakdown),
        }

    def summary(self) -> str:
        L = self.layout
        modes = [f"ulysses {L.ulysses}", f"cfg {L.cfg}", f"expert groups {L.expert_groups}"]
        if self.shard_experts:
            text = " + text encoder" if self.shard_text_encoder else ""
            modes.append(f"experts{text} sharded over {self.shard_ranks}")
        return (
            f"per rank ({L.size} processes: {', '.join(modes)}): host peak "
            f"{gb(self.host_peak_bytes)}, device peak {gb(self.device_peak_bytes)} (predicted)"
        )


def per_rank_memory(
    config: ModelConfig,
    request: MemoryRequest,
    layout: Layout,
    *,
    shard_experts: bool = False,
    shard_text_encoder: bool = False,
    shard_ranks: int | None = None,
) -> RankMemory:
    """The peak host RAM and device memory of the fullest rank of a parallel run.

    Args:
        request: the single-process request (batch 2: cond + uncond).
        layout: expert groups x cfg x ulysses ranks; sharding is over the cfg x ulysses ranks
            of one expert group (the ranks that run the same experts).
        shard_experts / shard_text_encoder: FSDP2-sharded weights (resident only).
        shard_ranks: the ranks the weights are sharded over; default the cfg x ulysses ranks
            of one expert group (a run whose ranks all compute the same clip gives its size).
    """
    if shard_text_encoder and not shard_experts:
        raise ValueError(
            "shard_text_encoder (--shard-text-encoder) shards beside the experts: set "
            "shard_experts (--shard-experts) too"
        )
    if shard_experts and request.residency != "resident":
        raise ValueError(
            f"sharded experts replace residency; got residency {request.residency!r}: use "
            "'resident' with sharded experts"
        )
    single = predict(config, request)
    held = _group_experts(config, layout.expert_groups)
    sizes = expert_bytes(config, request.dtype, request.quantize)
    share = (shard_ranks or layout.cfg * layout.ulysses) if shard_experts else 1
    if shard_experts and share < 2:
        raise ValueError(
            "sharded experts are split over the ranks that run them, and this layout has one "
            "rank per expert group: add --ulysses N or --cfg-parallel (the ranks to shard over)"
        )
    total = sum(sizes[n]["total"] for n in held)
    largest = max(sizes[n]["total"] for n in held)
    res = request.residency
    if shard_experts:
        experts_device, experts_host = math.ceil(total / share), 0
        extra = FSDP_GATHER_BUFFERS  # the root, two blocks, and the all-gather buffer
        gathered = max(_root_and_two_blocks(config, n, sizes, extra) for n in held)
    else:
        experts_device = {"resident": total, "swap": largest, "disk": largest}.get(res)
        if experts_device is None:  # blocks: the active expert's non-block weights + two blocks
            experts_device = max(_root_and_two_blocks(config, n, sizes) for n in held)
        experts_host = {"resident": 0, "swap": total, "blocks": total, "disk": largest}[res]
        gathered = 0
    text_w, text_act = text_encoder_bytes(config.text_encoder)
    text_held = math.ceil(text_w / share) if shard_text_encoder else text_w
    text_gathered = _text_gathered(config.text_encoder, text_w) if shard_text_encoder else 0
    rank_request = dataclasses.replace(request, batch=max(request.batch // layout.cfg, 1))
    fwd = _forward_per_rank(config, rank_request, layout.ulysses)
    dec = decode_activation_bytes(config, request)
    vae_w = vae_bytes(config)
    dist = DISTRIBUTED_OVERHEAD if max(layout.size, share) > 1 else 0
    breakdown = {
        "experts_device": experts_device,
        "experts_host": experts_host,
        "experts_gathered": gathered,
        "vae": vae_w,
        "text_encoder": text_held,
        "text_gathered": text_gathered,
        "text_activations": text_act,
        "forward_activations": fwd,
        "decode_activations": dec,
        "distributed": dist,
    }
    work = max(text_act + text_gathered, fwd + gathered, dec)
    if request.device == "cpu":
        # one memory: every policy but disk holds all the rank's experts in it
        experts_ram = experts_device if shard_experts else largest if res == "disk" else total
        weights = experts_ram + vae_w + text_held
        load = experts_ram + vae_w + text_w  # the text encoder is read whole, then sharded
        peak = CPU_BASELINE + RUNTIME_OVERHEAD + dist + max(weights + work, load)
        breakdown.update(baseline=CPU_BASELINE, overhead=RUNTIME_OVERHEAD)
        return RankMemory(
            host_peak_bytes=peak,
            device_peak_bytes=peak,
            breakdown=breakdown,
            layout=layout,
            shard_experts=shard_experts,
            shard_text_encoder=shard_text_encoder,
            shard_ranks=share,
            single=single,
        )
    text_on_device = res == "resident"
    text_dev = text_held if text_on_device else 0
    device = CUDA_DEVICE_CONTEXT + experts_device + vae_w + text_dev + work
    if shard_text_encoder:  # the encoder is loaded whole on each rank, then sharded
        device = max(device, CUDA_DEVICE_CONTEXT + experts_device + vae_w + text_w)
    one_tensor = _largest_tensor(config, request.dtype) if shard_experts else largest
    load_transient = max(text_w, one_tensor)
    resident_host = experts_host + (0 if text_on_device else text_w + text_act)
    host = CPU_BASELINE + CUDA_HOST_CONTEXT + dist + max(resident_host, load_transient)
    breakdown.update(
        baseline=CPU_BASELINE,
        cuda_context_host=CUDA_HOST_CONTEXT,
        cuda_context_device=CUDA_DEVICE_CONTEXT,
        load_transient=load_transient,
    )
    return RankMemory(
        host_peak_bytes=host,
        device_peak_bytes=device,
        breakdown=breakdown,
        layout=layout,
        shard_experts=shard_experts,
        shard_text_encoder=shard_text_encoder,
        shard_ranks=share,
        single=single,
    )


def _group_experts(config: ModelConfig, groups: int) -> tuple[str, ...]:
    """The experts of the fullest expert group (consecutive experts per group)."""
    names = config.moe.expert_names
    if groups > len(names):
        raise ValueError(
            f"expert groups hold one expert or more each: at most {len(names)} groups for "
            f"{config.name}; got {groups}"
        )
    per = math.ceil(len(names) / groups)
    return names[:per]


def _root_and_two_blocks(config: ModelConfig, name: str, sizes: dict, extra: int = 0) -> int:
    """An expert's weights outside its blocks, plus two blocks (running and next) and `extra`."""
    e = sizes[name]
    root = e["total"] - e["block"] * config.transformer_for(name).num_layers
    return root + (2 + extra) * e["block"]


def _forward_per_rank(config: ModelConfig, request: MemoryRequest, ulysses: int) -> int:
    """The planner's forward activations with the per-token part split over `ulysses` ranks;
    the latents and the text context stay whole on every rank."""
    whole = forward_activation_bytes(config, request)
    if ulysses == 1:
        return whole
    vae, t = config.vae, config.transformer
    lat = (
        vae.z_dim
        * ((request.num_frames - 1) // vae.temporal_stride + 1)
        * (request.height // vae.spatial_stride)
        * (request.width // vae.spatial_stride)
        * 4
    )
    fixed = 6 * lat + request.batch * t.text_len * (t.text_dim + t.dim) * 4
    p, q, r = t.patch_size
    lat_f = (request.num_frames - 1) // vae.temporal_stride + 1
    lat_h, lat_w = request.height // vae.spatial_stride, request.width // vae.spatial_stride
    tokens = max(lat_f // p, 1) * max(lat_h // q, 1) * max(lat_w // r, 1)
    buffers = ULYSSES_BUFFER_FACTOR * request.batch * tokens * t.dim * 4
    return math.ceil((whole - fixed + buffers) / ulysses) + fixed


def _text_gathered(kind: str, text_w: int) -> int:
    """A sharded text encoder's bytes gathered at once: the root (token embedding, final norm)
    and two layers; the whole encoder for the small ones."""
    if kind != "umt5-xxl":
        return text_w
    from vidmoe.models.umt5 import UMT5_XXL_HPARAMS as h

    layer = 4 * h["dim"] * h["dim_attn"] + 3 * h["dim"] * h["dim_ffn"] + 2 * h["dim"]
    layer += h["num_buckets"] * h["num_heads"]
    return (h["vocab"] * h["dim"] + h["dim"] + 2 * layer) * 2  # bf16


@functools.lru_cache(maxsize=8)
def _largest_tensor(config: ModelConfig, dtype: str) -> int:
    """Bytes of the largest single weight of any expert (what a shard-by-shard load reads at
    once); built on meta."""
    import torch

    from vidmoe.models.transformer import WanTransformer

    largest = 0
    for name in config.moe.expert_names:
        with torch.device("meta"):
            expert = WanTransformer(config.transformer_for(name))
        largest = max(largest, max(p.numel() for p in expert.parameters()))
    return largest * DTYPE_BYTES[dtype]


_MEASURE = """
import json, os, sys
import torch
import torch.distributed as dist
from vidmoe.loading import load_pipeline
from vidmoe.parallel.fsdp import Sharding
from vidmoe.parallel.launch import joined
torch.set_num_threads(1)
model, width, height, frames, dtype, shard, shard_text = json.loads(sys.argv[1])
with joined(os.environ, "cpu") as (world, device):
    sharding = Sharding(text_encoder=shard_text) if shard else None
    pipe = load_pipeline(model, device="cpu", dtype=dtype, shard=sharding)
    pipe.generate("a red circle moving left", width=width, height=height, num_frames=frames,
                  num_steps=2)
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    peak = int(status["VmHWM"].split()[0]) * 1024
    peaks = [None] * world.size
    dist.all_gather_object(peaks, peak)
    if world.is_main:
        print(json.dumps(peaks))
"""


def measure_rank_peak_rss(
    model: str,
    request: MemoryRequest,
    *,
    nproc: int = 2,
    shard_experts: bool = True,
    shard_text_encoder: bool = False,
    timeout: float = 600,
) -> list[int]:
    """Peak RSS (VmHWM, bytes) of each rank of a fresh `torchrun --nproc-per-node nproc` CPU run
    that loads `model` (sharded with FSDP2 when `shard_experts`) and generates one clip of the
    request's size (2 steps). Linux only."""
    import json
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    if request.device != "cpu":
        raise ValueError(f"measure_rank_peak_rss measures CPU runs; got {request.device!r}")
    dtype = {2: "bfloat16", 4: "float32"}[DTYPE_BYTES[request.dtype]]
    args = [str(model), request.width, request.height, request.num_frames, dtype]
    args += [shard_experts, shard_text_encoder]
    env = measure_env()
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "measure.py"
        script.write_text(_MEASURE)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd += [f"--nproc-per-node={nproc}", str(script), json.dumps(args)]
        out = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False
        )
    if out.returncode:
        # the ranks' own messages come before torchrun's summary of them (about 40 lines)
        raise RuntimeError(
            "the measured run failed:\n" + "\n".join(out.stderr.strip().splitlines()[-200:])
        )
    return json.loads(out.stdout.strip().splitlines()[-1])
