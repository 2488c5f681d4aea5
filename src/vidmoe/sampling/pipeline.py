"""The generation pipeline: prompt -> text embeddings -> phase plan -> denoising loop over the
experts -> VAE decode -> frames, with a per-step trace.

One pipeline serves t2v, i2v and ti2v; they differ by config and the small conditioning
functions in `conditioning.py`. Shape legend: C latent channels, F/H/W latent grid.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import nn

from vidmoe.config import ModelConfig
from vidmoe.models.moe import Experts, Placement
from vidmoe.models.step_cache import StepCache
from vidmoe.parallel.cfg import split_guided_velocity
from vidmoe.parallel.world import Groups, sum_over
from vidmoe.sampling.adapters import AdapterRecord, AdapterSet
from vidmoe.sampling.conditioning import (
    Conditioning,
    i2v_condition,
    load_image,
    load_image_cropped,
    ti2v_condition,
)
from vidmoe.sampling.guidance import guided_velocity
from vidmoe.sampling.plan import (
    Plan,
    StepPlan,
    model_sigma,
    plan_for,
    solver_for,
    trace_row,
    with_adapter_scales,
)
from vidmoe.sampling.rewrite import Lexicon
from vidmoe.sampling.settings import GenerateSettings, Limits, ResolvedSettings, resolve_settings
from vidmoe.sampling.solvers import Solver

OUTPUTS = ("frames", "latents")


@dataclass
class GenerationResult:
    """What `Pipeline.generate` returns."""

    frames: np.ndarray | None
    """(T, H, W, 3) uint8 frames, or None when only latents were asked for."""
    latents: torch.Tensor
    """(1, C, F, H, W) final latents."""
    plan: Plan
    settings: ResolvedSettings
    trace: list[dict] = field(default_factory=list)
    """Per step: index, sigma, experts, weights, guidance, seconds."""
    timings: dict[str, float] = field(default_factory=dict)


class Pipeline:
    """A Mixture-of-Experts video diffusion model ready to sample."""

    def __init__(
        self,
        config: ModelConfig,
        experts: Experts | Mapping[str, nn.Module],
        vae,
        text_encoder,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        residency: str | None = None,
    ):
        """Args:
        experts: an `Experts` (its placement rules), or modules by name, placed on
            `device` (default CPU) under `residency` (default 'resident'), run in `dtype`
            (default float32). Only a mapping takes device, dtype and residency.
        """
        if not isinstance(experts, Experts):
            missing = [n for n in config.moe.expert_names if n not in experts]
            if missing:
                raise ValueError(
                    f"model {config.name} needs experts {list(config.moe.expert_names)}; "
                    f"missing {missing}"
                )
            placement = Placement(
                device=device or "cpu",
                dtype=dtype or torch.float32,
                residency=residency or "resident",
            )
            experts = Experts(
                {n: experts[n] for n in config.moe.expert_names}, config.moe, placement=placement
            )
        elif (device, dtype, residency) != (None, None, None):
            raise ValueError("device, dtype and residency come from the Experts' placement")
        self.config, self.experts = config, experts
        self.vae, self.text_encoder = vae, text_encoder
        self.source: dict = {}
        self.limits: Limits | None = None
        """Bounds on one request; None: `Limits.for_model(config)`."""
        self.adapters = AdapterSet(self.experts)
        self.parallel: Groups | None = None
        """The process groups this pipeline runs under (`set_parallel`); None: one process."""
        self.lexicon: Lexicon | None = None
        """Rewrites prompts into the captions' words before encoding (`sampling.rewrite`); the
        loaders set the one a model folder ships."""
        for expert in self.experts.values():
            expert.eval().requires_grad_(False)
        if vae is not None:
            vae.eval().requires_grad_(False).to(self.experts.rest_device)

    @property
    def device(self) -> torch.device:
        return self.experts.device

    @property
    def dtype(self) -> torch.dtype:
        return self.experts.dtype

    @property
    def residency(self) -> str:
        return self.experts.placement.residency

    # -- pieces ------------------------------------------------------------------------------
    def encode_prompt(self, prompts: list[str]) -> list[torch.Tensor]:
        """Embed prompts: a list of (S_i, text_dim) tensors (cut to each prompt's length)."""
        if self.text_encoder is None:
            raise ValueError("this pipeline has no text encoder: pass prompt_embeds")
        network = getattr(self.text_encoder, "model", None)  # residency: on the device to encode
        with (
            torch.no_grad(),
            self.experts.lend(network, self.experts.placement.text_encoder_device),
        ):
            return [e.to(self.device, self.dtype) for e in self.text_encoder.encode(prompts)]

    def plan(self, settings: GenerateSettings | ResolvedSettings) -> Plan:
        """The per-step plan (expert or experts, weights, guidance) for these settings."""
        s = settings if isinstance(settings, ResolvedSettings) else self.resolve(settings)
        return self._with_adapters(plan_for(s, self.config))

    def resolve(self, settings: GenerateSettings) -> ResolvedSettings:
        """Validate settings against this model and the pipeline's limits; the prompt the text
        encoder will read is `encoded_prompt` (rewritten by the lexicon, if any)."""
        return self.rewritten(resolve_settings(settings, self.config, self.limits))

    def rewritten(self, rs: ResolvedSettings) -> ResolvedSettings:
        """`rs` with `encoded_prompt` filled in: the prompt rewritten by this pipeline's lexicon
        (when `rs.rewrite_prompt` and there is one), else None (the prompt as given)."""
        if rs.rewrite_prompt and self.lexicon is not None and rs.prompt:
            text = self.lexicon.rewrite(rs.prompt)
            return replace(rs, encoded_prompt=None if text == rs.prompt else text)
        return replace(rs, encoded_prompt=None)

    def _with_adapters(self, plan: Plan) -> Plan:
        if not self.adapters.records:
            return plan
        return with_adapter_scales(plan, self.adapters.strengths())

    # -- adapters (LoRA) ---------------------------------------------------------------------
    def load_lora(
        self,
        path,
        expert: str | None = None,
        strength: float | dict[str, float] = 1.0,
        name: str | None = None,
        strict: bool = True,
    ) -> AdapterRecord:
        """Load a LoRA file (diffusers/peft, ComfyUI/Lightning release names, musubi/Kohya or
        vidmoe) into one expert, the experts the file names, or (expert=None) every expert.

        The adapter runs unfused beside the frozen weights; `strength` (one number or expert ->
        number) can be changed with `set_lora_strength`. Recorded in `source['adapters']`.
        """
        rec = self.adapters.load(path, expert=expert, strength=strength, name=name, strict=strict)
        self.source["adapters"] = self.adapters.to_list()
        return rec

    def unload_lora(self, name: str | None = None) -> None:
        """Remove one adapter (None: all); the original weights are restored bit-exactly."""
        self.adapters.unload(name)
        self.source["adapters"] = self.adapters.to_list()

    def set_lora_strength(self, name: str, strength: float, expert: str | None = None) -> None:
        self.adapters.set_strength(name, strength, expert)
        self.source["adapters"] = self.adapters.to_list()

    def fuse_lora(self, names: list[str] | None = None) -> None:
        """Merge adapters into the weights (faster steps; strengths then fixed until unfused)."""
        self.adapters.fuse(names)

    def unfuse_lora(self) -> None:
        """Restore the exact original weights; adapters stay loaded and run unfused."""
        self.adapters.unfuse()

    # -- parallel inference (torchrun; docs/distributed.md) -------------------------------------
    def set_parallel(self, groups: Groups | None) -> None:
        """Run under a parallel layout (its `Groups`, made on every rank, docs/distributed.md):
        each expert's sequence split over `groups.ulysses`, cond and uncond over `groups.cfg`.
        Every rank of the layout must then make the same `generate` calls. None: one process.
        A ValueError if an expert's heads do not divide by the Ulysses size."""
        for expert in self.experts.values():
            expert.set_sequence_parallel(None if groups is None else groups.ulysses)
        self.parallel = groups

    def _step_caches(self, thresholds: Mapping[str, float]) -> dict[str, StepCache]:
        """A step cache per expert with a threshold > 0; under a parallel layout each sums its
        measure over the ranks that run the expert, so that all skip the same steps."""
        reduce, groups = None, self.parallel
        if groups is not None and groups.layout.cfg * groups.layout.ulysses > 1:
            reduce = sum_over(groups.expert_group)
        return {n: StepCache(threshold=t, reduce=reduce) for n, t in thresholds.items() if t > 0}

    def _velocity(
        self, name, x, sigma, cond, uncond, scale, c: Conditioning, cache: StepCache | None = None
    ) -> torch.Tensor:
        """Guided velocity of one expert; cond and uncond run as one batch (CFG parallel: on
        the two ranks of the pair)."""
        expert = self.experts.activate(name)
        sig = c.sigma_for(sigma, tuple(x.shape[2:]), expert.config.patch_size).to(self.device)
        y = c.y.to(self.device) if c.y is not None else None
        extra = {} if cache is None else {"cache": cache}
        if self.parallel is not None and self.parallel.layout.cfg > 1:
            pair = dict(cfg_rank=self.parallel.place.cfg_rank, group=self.parallel.cfg)
            return split_guided_velocity(expert, x, sig, cond, uncond, scale, y=y, **pair, **extra)
        return guided_velocity(expert, x, sig, cond, uncond, scale, y=y, **extra)

    # -- generation --------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        prompt: str | GenerateSettings = "",
        *,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output: str = "frames",
        progress: bool = False,
        callback=None,
        decode_callback=None,
        **settings,
    ) -> GenerationResult:
        """Generate one video.

        Args:
            prompt: the prompt, or a complete `GenerateSettings`.
            latents: (1, C, F, H, W) initial noise instead of the seeded one.
            prompt_embeds / negative_prompt_embeds: (S, text_dim) precomputed embeddings.
            output: 'frames' (decode with the VAE) or 'latents'.
            progress: show progress bars.
            callback: called as callback(step_index, num_steps, expert_names) after each step;
                raising from it stops the generation.
            decode_callback: called as decode_callback(chunk_index, num_chunks) after each
                latent frame the VAE decodes; raising from it stops the decode.
            **settings: fields of `GenerateSettings` (width, height, num_frames, num_steps, ...).
        Returns:
            A `GenerationResult` with frames, latents, plan and per-step trace.
        """
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {', '.join(OUTPUTS)}; got {output!r}")
        s = (
            prompt
            if isinstance(prompt, GenerateSettings)
            else GenerateSettings(prompt=prompt, **settings)
        )
        rs = self.resolve(s)
        timings: dict[str, float] = {}
        with _timed(timings, "text"):
            cond, uncond = self._embeddings(rs, prompt_embeds, negative_prompt_embeds)
        x = self._initial_latents(rs, latents)
        c = self._conditioning(rs)
        x = c.impose(x)
        plan = self._with_adapters(plan_for(rs, self.config))
        with _timed(timings, "denoise"):
            caches = self._step_caches(rs.step_cache)
            x, trace = self._denoise(
                x, plan, rs.sampler, cond, uncond, c, progress, callback, caches
            )
        self.experts.idle()  # residency: non-resident policies free the experts for the decode
        frames = None
        if output == "frames":
            with _timed(timings, "decode"):
                frames = self.decode(x, progress=progress, callback=decode_callback)
        return GenerationResult(
            frames=frames, latents=x.cpu(), plan=plan, settings=rs, trace=trace, timings=timings
        )

    def _denoise(
        self,
        x,
        plan: Plan,
        sampler: str,
        cond,
        uncond,
        c: Conditioning,
        progress: bool,
        callback,
        caches: dict[str, StepCache],
        *,
        steps: range | None = None,
        solver: Solver | None = None,
    ) -> tuple[torch.Tensor, list[dict]]:
        """The sampling loop: per step, each planned expert's guided velocity, blended, then one
        solver step. x: (1, C, F, H, W) float32. An expert's step cache starts afresh whenever
        the expert starts a phase, so nothing is reused across an expert switch.

        `steps` runs only that slice of the plan (default: all of it) from x, with `solver`
        carrying the trajectory's history so far (default: a fresh `solver_for(plan, sampler)`):
        an expert group runs its own phase this way (`vidmoe.parallel.pipelined`)."""
        steps = range(len(plan.steps)) if steps is None else steps
        solver = solver_for(plan, sampler) if solver is None else solver
        trace, bar = [], _progress(len(steps), "denoise", progress)
        previous = plan.steps[steps.start - 1].experts if steps.start > 0 else ()
        for st in plan.steps[steps.start : steps.stop]:
            t0 = time.perf_counter()
            # residency: copy the next step's new expert during this one
            self._prefetch_next(plan, st, steps.stop)
            v = torch.zeros_like(x)  # (1, C, F, H, W)
            sigma_in = model_sigma(st.sigma, sampler)
            cached, changes = [], {}
            for name, weight, scale in zip(st.experts, st.weights, st.guidance):
                self.adapters.apply(name, st.adapter_scales)
                cache = caches.get(name)
                if cache is not None and name not in previous:
                    cache.reset()
                skipped = cache.skipped if cache is not None else 0
                vel = self._velocity(
                    name, x.to(self.dtype), sigma_in, cond, uncond, scale, c, cache
                )
                v = v + weight * vel.float()
                if cache is not None:
                    if cache.changes[-1] == cache.changes[-1]:  # NaN: a phase's first step
                        changes[name] = round(cache.changes[-1], 6)
                    if cache.skipped > skipped:
                        cached.append(name)
            x = c.impose(solver.step(v, x, st.index))
            previous = st.experts
            trace.append(trace_row(st, time.perf_counter() - t0, cached, changes))
            bar.set_postfix_str("+".join(st.experts))
            bar.update()
            if callback is not None:
                callback(st.index, len(plan.steps), st.experts)
        bar.close()
        return x, trace

    def _prefetch_next(self, plan: Plan, st: StepPlan, stop: int) -> None:
        """Let the residency policy bring the next step's new experts ahead of their first step
        (only steps before `stop`: those this pipeline runs)."""
        if st.index + 1 < stop:
            for name in plan.steps[st.index + 1].experts:
                if name not in st.experts:
                    self.experts.prefetch(name)

    def _embeddings(self, rs: ResolvedSettings, prompt_embeds, negative_prompt_embeds):
        """([cond (S, D)], [uncond (S', D)]) on the device: given ones, else encoded."""
        if prompt_embeds is None:
            text = self.rewritten(rs).encoded_prompt or rs.prompt
            prompt_embeds, negative = self.encode_prompt([text, rs.negative_prompt])
            negative_prompt_embeds = (
                negative if negative_prompt_embeds is None else negative_prompt_embeds
            )
        if negative_prompt_embeds is None:
            negative_prompt_embeds = self.encode_prompt([rs.negative_prompt])[0]
        return (
            [prompt_embeds.to(self.device, self.dtype)],
            [negative_prompt_embeds.to(self.device, self.dtype)],
        )

    def _initial_latents(self, rs: ResolvedSettings, latents: torch.Tensor | None) -> torch.Tensor:
        """(1, C, F, H, W) float32 noise on the device: seeded on the CPU, or the given one."""
        shape = self.latent_shape(rs)
        if latents is None:
            gen = torch.Generator("cpu").manual_seed(rs.seed)  # CPU noise: the same on every device
            latents = torch.randn(shape, generator=gen, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(
                f"latents must have shape {shape} for these settings; got {tuple(latents.shape)}"
            )
        return latents.to(self.device, torch.float32)

    def decode(self, x: torch.Tensor, *, progress: bool = False, callback=None) -> np.ndarray:
        """(1, C, F, H, W) latents -> (T, H, W, 3) uint8 frames; `callback` as `WanVAE.decode`'s."""
        from vidmoe.io.video import to_uint8_frames

        dtype = next(self.vae.parameters()).dtype
        with self.experts.lend(self.vae):  # residency: the VAE leaves the device after
            video = self.vae.decode(x.to(dtype), progress=progress, callback=callback)
        return to_uint8_frames(video)

    def latent_shape(self, rs: ResolvedSettings) -> tuple[int, int, int, int, int]:
        vae = self.config.vae
        frames = (rs.num_frames - 1) // vae.temporal_stride + 1
        return (
            1,
            vae.z_dim,
            frames,
            rs.height // vae.spatial_stride,
            rs.width // vae.spatial_stride,
        )

    def _conditioning(self, rs: ResolvedSettings) -> Conditioning:
        model_type = self.config.transformer.model_type
        if rs.image is None or model_type == "t2v":
            return Conditioning()
        # i2v stretches the image to the frame, ti2v covers it and crops (each as its release)
        load = load_image if model_type == "i2v" else load_image_cropped
        image = load(rs.image, rs.width, rs.height).to(self.device)
        with self.experts.lend(self.vae):  # residency: the VAE leaves the device after
            if model_type == "i2v":
                return i2v_condition(self.vae, image, rs.num_frames)
            return ti2v_condition(self.vae, image)

    def num_params(self) -> dict[str, int]:
        """Parameters in total, active per step (the largest expert) and per expert."""
        counts = self.experts.param_counts()
        return {"total": counts.total, "active": counts.active, **counts.per_expert}


@contextmanager
def _timed(timings: dict[str, float], key: str):
    t0 = time.perf_counter()
    yield
    timings[key] = time.perf_counter() - t0


class _NoBar:
    def set_postfix_str(self, s): ...
    def update(self, n=1): ...
    def close(self): ...


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step")
