"""The generation pipeline: prompt -> text embeddings -> phase plan -> denoising loop over the
experts -> VAE decode -> frames, with a per-step trace.

One pipeline serves t2v, i2v and ti2v; they differ by config and the small conditioning
functions in `conditioning.py`. Shape legend: C latent channels, F/H/W latent grid.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from vidmoe.config import ModelConfig
from vidmoe.sampling.adapters import AdapterRecord, AdapterSet
from vidmoe.sampling.conditioning import Conditioning, i2v_condition, load_image, ti2v_condition
from vidmoe.sampling.guidance import apply_guidance
from vidmoe.sampling.plan import Plan, make_plan, with_adapter_scales
from vidmoe.sampling.schedules import make_sigmas, sigmas_from_list, timesteps_from_sigmas
from vidmoe.sampling.settings import GenerateSettings, ResolvedSettings, resolve_settings
from vidmoe.sampling.solvers import make_solver

RESIDENCY = ("resident", "swap")


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

    def __init__(self, config: ModelConfig, experts: dict[str, nn.Module], vae, text_encoder,
                 *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 residency: str = "resident"):  # fmt: skip
        missing = [n for n in config.moe.expert_names if n not in experts]
        if missing:
            raise ValueError(
                f"model {config.name} needs experts {list(config.moe.expert_names)}; missing {missing}"
            )
        if residency not in RESIDENCY:
            raise ValueError(f"residency must be one of {', '.join(RESIDENCY)}; got {residency!r}")
        self.config, self.experts = config, dict(experts)
        self.vae, self.text_encoder = vae, text_encoder
        self.device, self.dtype, self.residency = torch.device(device), dtype, residency
        self.source: dict = {}
        self.adapters = AdapterSet(self.experts)
        for expert in self.experts.values():
            expert.eval().requires_grad_(False)
            if residency == "resident":
                expert.to(self.device)
        if vae is not None:
            vae.eval().requires_grad_(False).to(self.device)

    # -- pieces ------------------------------------------------------------------------------
    def encode_prompt(self, prompts: list[str]) -> list[torch.Tensor]:
        """Embed prompts: a list of (S_i, text_dim) tensors (cut to each prompt's length)."""
        if self.text_encoder is None:
            raise ValueError("this pipeline has no text encoder: pass prompt_embeds")
        with torch.no_grad():
            return [e.to(self.device, self.dtype) for e in self.text_encoder.encode(prompts)]

    def plan(self, settings: GenerateSettings | ResolvedSettings) -> Plan:
        """The per-step plan (expert or experts, weights, guidance) for these settings."""
        s = (
            settings
            if isinstance(settings, ResolvedSettings)
            else resolve_settings(settings, self.config)
        )
        return self._with_adapters(build_plan_for(s, self.config))

    def _with_adapters(self, plan: Plan) -> Plan:
        if not self.adapters.records:
            return plan
        return with_adapter_scales(plan, self.adapters.strengths())

    # -- adapters (LoRA) ---------------------------------------------------------------------
    def load_lora(self, path, expert: str | None = None, strength: float | dict[str, float] = 1.0,
                  name: str | None = None, strict: bool = True) -> AdapterRecord:  # fmt: skip
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

    def _expert(self, name: str) -> nn.Module:
        expert = self.experts[name]
        if self.residency == "swap":
            for other, module in self.experts.items():
                if other != name:
                    module.to("cpu")
            expert.to(self.device)
        return expert

    def _velocity(self, name, x, sigma, cond, uncond, scale, c: Conditioning) -> torch.Tensor:
        """Guided velocity of one expert; cond and uncond run as one batch."""
        expert = self._expert(name)
        sig = c.sigma_for(sigma, tuple(x.shape[2:]), expert.config.patch_size).to(self.device)
        y = c.y.to(self.device) if c.y is not None else None
        if scale == 1.0:  # guidance 1 is the conditional prediction: skip the unconditional pass
            return expert(x, sig, cond, y=y)
        both = expert(
            torch.cat([x, x]),
            torch.cat([sig, sig]),
            cond + uncond,
            y=None if y is None else torch.cat([y, y]),
        )  # (2, C, F, H, W)
        v_cond, v_uncond = both.chunk(2)
        return apply_guidance(v_cond, v_uncond, scale)

    # -- generation --------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompt: str | GenerateSettings = "", *, latents: torch.Tensor | None = None,
                 prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
                 output: str = "frames", progress: bool = False, callback=None,
                 decode_callback=None, **settings) -> GenerationResult:  # fmt: skip
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
        s = (
            prompt
            if isinstance(prompt, GenerateSettings)
            else GenerateSettings(prompt=prompt, **settings)
        )
        rs = resolve_settings(s, self.config)
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        if prompt_embeds is None:
            prompt_embeds, negative = self.encode_prompt([rs.prompt, rs.negative_prompt])
            negative_prompt_embeds = (
                negative if negative_prompt_embeds is None else negative_prompt_embeds
            )
        if negative_prompt_embeds is None:
            negative_prompt_embeds = self.encode_prompt([rs.negative_prompt])[0]
        cond = [prompt_embeds.to(self.device, self.dtype)]
        uncond = [negative_prompt_embeds.to(self.device, self.dtype)]
        timings["text"] = time.perf_counter() - t0

        shape = self.latent_shape(rs)
        if latents is None:
            gen = torch.Generator("cpu").manual_seed(rs.seed)  # CPU noise: the same on every device
            latents = torch.randn(shape, generator=gen, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(
                f"latents must have shape {shape} for these settings; got {tuple(latents.shape)}"
            )
        x = latents.to(self.device, torch.float32)

        c = self._conditioning(rs)
        x = c.impose(x)
        plan = self._with_adapters(build_plan_for(rs, self.config))
        sigmas = torch.tensor(
            [st.sigma for st in plan.steps] + [plan.steps[-1].sigma_next], dtype=torch.float64
        )
        solver = make_solver(rs.sampler, sigmas)
        trace = []
        t0 = time.perf_counter()
        bar = _progress(len(plan.steps), "denoise", progress)
        for st in plan.steps:
            ts = time.perf_counter()
            v = torch.zeros_like(x)
            sigma_in = model_sigma(st.sigma, rs.sampler)
            for name, weight, scale in zip(st.experts, st.weights, st.guidance):
                self.adapters.apply(name, st.adapter_scales)
                vel = self._velocity(name, x.to(self.dtype), sigma_in, cond, uncond, scale, c)
                v = v + weight * vel.float()
            x = c.impose(solver.step(v, x, st.index))
            trace.append(dict(index=st.index, sigma=st.sigma, experts=list(st.experts), weights=list(st.weights),
                              guidance=list(st.guidance), seconds=round(time.perf_counter() - ts, 4)))  # fmt: skip
            if st.adapter_scales:
                trace[-1]["adapters"] = dict(st.adapter_scales)
            bar.set_postfix_str("+".join(st.experts))
            bar.update()
            if callback is not None:
                callback(st.index, len(plan.steps), st.experts)
        bar.close()
        timings["denoise"] = time.perf_counter() - t0
        frames = None
        if output == "frames":
            t0 = time.perf_counter()
            video = self.vae.decode(x.to(next(self.vae.parameters()).dtype), progress=progress,
                                    callback=decode_callback)  # fmt: skip
            from vidmoe.io.video import to_uint8_frames

            frames = to_uint8_frames(video)
            timings["decode"] = time.perf_counter() - t0
        return GenerationResult(
            frames=frames, latents=x.cpu(), plan=plan, settings=rs, trace=trace, timings=timings
        )

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
        image = load_image(rs.image, rs.width, rs.height).to(self.device)
        if model_type == "i2v":
            return i2v_condition(self.vae, image, rs.num_frames)
        return ti2v_condition(self.vae, image)

    def num_params(self) -> dict[str, int]:
        """Parameters per expert, in total and active per step (one expert's worth)."""
        per = {n: sum(p.numel() for p in e.parameters()) for n, e in self.experts.items()}
        return {"total": sum(per.values()), "active": max(per.values()), **per}


def build_plan_for(rs: ResolvedSettings, config: ModelConfig) -> Plan:
    """Sigma grid + boundary mode + guidance -> the typed plan."""
    if rs.sigmas is not None:
        sigmas = sigmas_from_list(rs.sigmas)
    else:
        sigmas = make_sigmas(rs.num_steps, rs.shift, solver=rs.sampler)
    moe, boundary = dataclasses.replace(config.moe, band=rs.band), rs.boundary
    if isinstance(boundary, float):
        if len(moe.expert_names) != 2:
            raise ValueError(f"a numeric boundary needs a two-expert model; {config.name} has {len(moe.expert_names)}")
        moe, boundary = dataclasses.replace(moe, boundaries=(boundary,)), "release"
    if len(moe.expert_names) == 1:
        boundary = "release"
    return make_plan(
        moe, shift=rs.shift, sigmas=sigmas, boundary=boundary,
        budgets=rs.steps_per_expert or None, guidance=rs.guidance,
    )  # fmt: skip


def model_sigma(sigma: float, sampler: str) -> float:
    """The noise level the expert is told at a step."""
    if sampler in ("unipc", "dpm++"):
        # parity: the release's solvers hand the model int(1000 * sigma) (truncated)
        return float(timesteps_from_sigmas(torch.tensor([sigma], dtype=torch.float64))[0]) / 1000
    return sigma  # euler, as diffusers: timestep = 1000 * sigma exactly


class _NoBar:
    def set_postfix_str(self, s): ...
    def update(self, n=1): ...
    def close(self): ...


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step")
