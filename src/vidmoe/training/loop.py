"""The training loop of a Mixture of Experts over noise levels, trained from a latent cache.

`train(config)` builds the experts, resumes from `out_dir/checkpoint.pt` when one exists, and
runs AdamW steps (warm-up, per-expert gradient clipping, EMA, optional bf16 autocast and
gradient checkpointing), logging per-expert losses and sample counts to `log.jsonl` and plots to
PNG. `train_main(path)` is the `vidmoe train CONFIG` entry point (TOML or JSON config).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vidmoe.config import (
    ExpertOverrides,
    MoEConfig,
    TransformerConfig,
    expert_transformer,
    normalize_expert_overrides,
)
from vidmoe.models.transformer import WanTransformer, warn_if_head_too_narrow
from vidmoe.training import finetune
from vidmoe.training.checkpoint import (
    CHECKPOINT_FILE,
    EMA,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from vidmoe.training.data import EpochSampler, LatentCache
from vidmoe.training.objective import expert_ranges, flow_matching_loss, sample_sigma
from vidmoe.training.objective_terms import ObjectiveOptions

LOG_FILE = "log.jsonl"
NUM_SIGMA_BINS = 20


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything one training run needs; read from TOML or JSON by `load_train_config`."""

    cache: str
    """Folder of the latent cache (`vidmoe.training.data.build_latent_cache`)."""
    out_dir: str
    """Where checkpoint.pt, log.jsonl and the plots go; a run resumes from it."""
    transformer: TransformerConfig
    """Architecture of every expert."""
    moe: MoEConfig = field(default_factory=MoEConfig)
    """Expert names and sigma boundaries (guidance is unused in training)."""
    experts: tuple[str, ...] = ()
    """Train only these experts (sigmas drawn inside their ranges); empty: all. Experts never
    share parameters, so a 2-expert model can train as two runs, one per device or CPU core,
    merged by `export_model([run_a, run_b], ...)`."""
    expert_overrides: ExpertOverrides = ()
    """Per-expert changes to `transformer` (TOML: `[expert_overrides.low_noise]` with
    `ffn_dim = 512`, `window_size = [-1, 64]`); as `ModelConfig.expert_overrides`. Empty: every
    expert is `transformer`."""
    batch_size: int = 16
    """Clips per step (split between the experts by sigma)."""
    lr: float = 3e-4
    """Peak AdamW learning rate."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    warmup_steps: int = 100
    """Linear learning-rate warm-up."""
    lr_schedule: str = "constant"
    """'constant' or 'cosine' (to 10% of `lr` at `max_steps`) after the warm-up."""
    max_steps: int = 1000
    """Optimiser steps of the whole run."""
    max_minutes: float = 0.0
    """Stop (with a checkpoint) after this many minutes in this process; 0: no limit."""
    grad_clip: float = 1.0
    """Max gradient norm, per expert; 0 disables clipping."""
    ema_decay: float = 0.999
    """EMA decay (warmed up as (1 + step) / (10 + step))."""
    sigma_sampling: str = "uniform"
    """'uniform' or 'logit_normal'."""
    sigma_shift: float = 1.0
    """Shift applied to drawn sigmas (> 1 favours high noise)."""
    logit_mean: float = 0.0
    """Mean of the logit-normal draw."""
    logit_std: float = 1.0
    """Std of the logit-normal draw."""
    caption_dropout: float = 0.1
    """Fraction of samples trained on the empty prompt (for classifier-free guidance)."""
    band_training: bool = False
    """Score samples inside a transition band (`[moe] band` > 0) on the router's blend of the
    two neighbouring experts, as sampling with that band runs them; needs every expert."""
    temporal_weight: float = 0.0
    """Weight of the frame-difference MSE of the predicted clean latent; 0: off."""
    specialisation_weight: float = 0.0
    """Weight of the owner-beats-the-others margin term (every sample runs through every
    expert); 0: off; needs every expert."""
    specialisation_margin: float = 0.05
    """Velocity-MSE margin by which the owner should beat each other expert on its samples."""
    use_bf16: bool = False
    """Run the experts under bf16 autocast."""
    use_checkpointing: bool = False
    """Gradient checkpointing of the transformer blocks."""
    seed: int = 0
    """Seeds the initialisation, the data order, sigmas, noise and caption dropout."""
    log_every: int = 10
    """Steps between log.jsonl lines."""
    checkpoint_every: int = 200
    """Steps between checkpoints (a final one is always written)."""
    num_threads: int = 0
    """torch CPU threads; 0 leaves torch's default."""
    use_progress: bool = True
    """Show a tqdm bar."""
    init: str = ""
    """Start from this model (a vidmoe, official or diffusers folder; its experts' architecture
    must equal `transformer`); empty: fresh weights. See `vidmoe.training.finetune`."""
    lora_rank: int = 0
    """> 0: train one peft LoRA adapter of this rank per expert on frozen weights; 0: all weights."""
    lora_alpha: float = 0.0
    """LoRA alpha (scale alpha / rank); 0: equal to `lora_rank`."""
    lora_targets: tuple[str, ...] = finetune.DEFAULT_LORA_TARGETS
    """Module-name suffixes that get adapters (default: attention q/k/v/o and FFN linears)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA input."""

    def __post_init__(self) -> None:
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(
                f"lr_schedule must be 'constant' or 'cosine'; got {self.lr_schedule!r}"
            )
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1]; got {self.caption_dropout}")
        object.__setattr__(self, "experts", tuple(self.experts))
        expert_ranges(self.moe, self.experts)  # unknown names are an error
        finetune.check_finetune_config(self)
        self.objective_options.check_run(self.moe, self.experts)
        overrides = normalize_expert_overrides(
            self.expert_overrides, self.transformer, self.moe.expert_names
        )
        object.__setattr__(self, "expert_overrides", overrides)
        for name in ("batch_size", "max_steps", "log_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        for name in self.trained_experts:
            warn_if_head_too_narrow(self.transformer_for(name), name)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown train config keys {unknown}; known: {sorted(names)}")
        if "transformer" not in d:
            raise ValueError(
                "the train config needs a [transformer] table (TransformerConfig fields)"
            )
        d = dict(d)
        d["transformer"] = TransformerConfig.from_dict(d["transformer"])
        d["moe"] = MoEConfig(**d.get("moe", {}))
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["transformer"] = self.transformer.to_dict()
        d["expert_overrides"] = {n: dict(changes) for n, changes in self.expert_overrides}
        return d

    def transformer_for(self, name: str) -> TransformerConfig:
        """The architecture of expert `name` (the shared `transformer` plus its overrides)."""
        return expert_transformer(
            self.transformer, self.expert_overrides, self.moe.expert_names, name
        )

    @property
    def trained_experts(self) -> tuple[str, ...]:
        """The experts this run trains, noisiest first."""
        return tuple(n for n in self.moe.expert_names if not self.experts or n in self.experts)

    @property
    def objective_options(self) -> ObjectiveOptions:
        """The optional objective terms of this run (`vidmoe.training.objective_terms`)."""
        return ObjectiveOptions(
            band_training=self.band_training, temporal_weight=self.temporal_weight,
            specialisation_weight=self.specialisation_weight,
            specialisation_margin=self.specialisation_margin,
        )  # fmt: skip


def load_train_config(path: str | Path) -> TrainConfig:
    """Read a TrainConfig from a .toml or .json file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"train config {path} does not exist")
    if path.suffix == ".toml":
        import tomllib

        return TrainConfig.from_dict(tomllib.loads(path.read_text()))
    if path.suffix == ".json":
        return TrainConfig.from_dict(json.loads(path.read_text()))
    raise ValueError(f"train config must be .toml or .json; got {path.name}")


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """Learning-rate multiplier after `step` optimiser steps."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    progress = min((step - cfg.warmup_steps) / max(cfg.max_steps - cfg.warmup_steps, 1), 1.0)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_experts(cfg: TrainConfig) -> dict[str, WanTransformer]:
    """One freshly initialised expert per trained name, seeded by `cfg.seed` (in name order)."""
    if cfg.init or cfg.lora_rank:
        return finetune.build_finetune_experts(cfg)
    torch.manual_seed(cfg.seed)
    experts = {}
    for name in cfg.trained_experts:
        expert = WanTransformer(cfg.transformer_for(name)).train()
        expert.use_checkpointing = cfg.use_checkpointing
        experts[name] = expert
    return experts


class Trainer:
    """The state of one run: experts, optimiser, scheduler, EMA, data position, RNG."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.out_dir = Path(cfg.out_dir)
        self.data = LatentCache(cfg.cache)
        if self.data.text_len != cfg.transformer.text_len:
            raise ValueError(
                f"the cache pads text to {self.data.text_len} tokens but the experts take "
                f"text_len={cfg.transformer.text_len}: rebuild the cache or set text_len"
            )
        self.experts = build_experts(cfg)
        self.sigma_ranges = expert_ranges(cfg.moe, cfg.experts) if cfg.experts else None
        groups = [{"params": [p for p in e.parameters() if p.requires_grad], "name": n}
                  for n, e in self.experts.items()]  # fmt: skip
        self.opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: lr_factor(cfg, s))
        self.ema = EMA(self.experts, cfg.ema_decay)
        self.sampler = EpochSampler(len(self.data), cfg.batch_size, cfg.seed)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.step = 0
        self.sigma_bins = torch.zeros(2, NUM_SIGMA_BINS, dtype=torch.float64)  # (sum, count)
        self.log_window: list[dict] = []  # step records not yet summarised into log.jsonl

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "config": self.cfg.to_dict(),
            "experts": {n: finetune.trainable_state(e) for n, e in self.experts.items()},
            "ema": self.ema.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "data": self.sampler.state_dict(),
            "rng": rng_state(self.generator),
            "sigma_bins": self.sigma_bins,
            "log_window": list(self.log_window),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state["step"]
        for n, e in self.experts.items():
            finetune.load_trainable_state(e, state["experts"][n])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["data"])
        set_rng_state(state["rng"], self.generator)
        self.sigma_bins = state["sigma_bins"].clone()
        self.log_window = list(state["log_window"])

    def save(self) -> Path:
        path = save_checkpoint(self.state_dict(), self.out_dir / CHECKPOINT_FILE)
        finetune.on_checkpoint(self)  # LoRA runs: the adapter files
        return path

    def try_resume(self) -> bool:
        """Load out_dir/checkpoint.pt if present; drop log lines written after it."""
        path = self.out_dir / CHECKPOINT_FILE
        if not path.is_file():
            return False
        self.load_state_dict(load_checkpoint(path))
        log = self.out_dir / LOG_FILE
        if log.is_file():
            lines = [ln for ln in log.read_text().splitlines() if ln.strip()]
            keep = [ln for ln in lines if json.loads(ln).get("step", 0) <= self.step]
            log.write_text("".join(ln + "\n" for ln in keep))
        return True

    # -- one step ------------------------------------------------------------------------------
    def train_step(self) -> dict[str, Any]:
        """Draw a batch, noise and sigmas; one optimiser step; returns the log record."""
        cfg, g = self.cfg, self.generator
        x0, text = self.data.batch(self.sampler.next())  # (B, Z, F, H, W), (B, S, D)
        b = x0.shape[0]
        drop = torch.rand(b, generator=g) < cfg.caption_dropout  # (B,)
        text = torch.where(drop[:, None, None], self.data.empty_text, text)  # (B, S, D)
        sigma = sample_sigma(
            b, kind=cfg.sigma_sampling, shift=cfg.sigma_shift, logit_mean=cfg.logit_mean,
            logit_std=cfg.logit_std, generator=g, ranges=self.sigma_ranges,
        )  # fmt: skip
        noise = torch.randn(x0.shape, generator=g)  # (B, Z, F, H, W)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.use_bf16):
            out = flow_matching_loss(
                self.experts, cfg.moe, x0, text, sigma, noise, options=cfg.objective_options
            )
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        grad_norms = {}
        for name, expert in self.experts.items():
            if name in out.ran and cfg.grad_clip > 0:  # band/specialisation: not only owners
                norm = nn.utils.clip_grad_norm_(expert.parameters(), cfg.grad_clip)
                grad_norms[name] = round(float(norm), 4)
        self.opt.step()
        self.sched.step()
        self.step += 1
        self.ema.update(self.experts, self.step)
        bins = (out.sigma * NUM_SIGMA_BINS).long().clamp(0, NUM_SIGMA_BINS - 1)  # (B,)
        self.sigma_bins[0].index_add_(0, bins, out.sample_loss.double())
        self.sigma_bins[1].index_add_(0, bins, torch.ones(b, dtype=torch.float64))
        record = {
            "step": self.step,
            "loss": {n: round(v.item(), 6) for n, v in out.per_expert.items()},
            "count": out.counts,
            "grad_norm": grad_norms,
            "lr": self.sched.get_last_lr()[0],
        }
        if out.terms:  # optional objective terms: unweighted batch means
            record["terms"] = {n: round(v, 6) for n, v in out.terms.items()}
        if cfg.band_training:
            record["band_count"] = out.band_count
        return record


def train(cfg: TrainConfig, *, callback: Callable[[Trainer], None] | None = None) -> Trainer:
    """Run (or resume) a training run to `cfg.max_steps` or `cfg.max_minutes`.

    Args:
        cfg: the run's config.
        callback: called with the trainer after every step (after any checkpoint of that step).
    Returns:
        the trainer, after its final checkpoint.
    """
    from tqdm.auto import tqdm

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    trainer = Trainer(cfg)
    trainer.out_dir.mkdir(parents=True, exist_ok=True)
    trainer.try_resume()
    (trainer.out_dir / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    start = time.time()
    bar = tqdm(total=cfg.max_steps, initial=trainer.step, disable=not cfg.use_progress)
    with open(trainer.out_dir / LOG_FILE, "a") as log:
        while trainer.step < cfg.max_steps:
            record = trainer.train_step()
            trainer.log_window.append(record)
            bar.update()
            bar.set_postfix_str(" ".join(f"{n}={v:.4f}" for n, v in record["loss"].items()))
            if trainer.step % cfg.log_every == 0:
                summary = _summarise(trainer.log_window, time.time() - start)
                log.write(json.dumps(summary) + "\n")
                log.flush()
                trainer.log_window = []
            timed_out = cfg.max_minutes and time.time() - start > 60 * cfg.max_minutes
            if trainer.step % cfg.checkpoint_every == 0 or timed_out:
                trainer.save()
                write_plots(trainer)
            if callback is not None:
                callback(trainer)
            if timed_out:
                break
    bar.close()
    trainer.save()
    write_plots(trainer)
    return trainer


def _summarise(window: list[dict], seconds: float) -> dict[str, Any]:
    """Sample-weighted mean loss and total count per expert over the steps of `window`."""
    names = {n for r in window for n in r["count"]}
    counts = {n: sum(r["count"][n] for r in window) for n in sorted(names)}
    loss = {
        n: round(sum(r["loss"][n] * r["count"][n] for r in window if n in r["loss"]) / c, 6)
        for n, c in counts.items()
        if c
    }
    last = window[-1]
    summary = {"step": last["step"], "loss": loss, "count": counts,
               "grad_norm": last["grad_norm"], "lr": last["lr"], "seconds": round(seconds, 1)}  # fmt: skip
    terms = [r["terms"] for r in window if "terms" in r]  # optional objective terms: step mean
    if terms:
        summary["terms"] = {n: round(sum(t[n] for t in terms) / len(terms), 6) for n in terms[0]}
    if any("band_count" in r for r in window):
        summary["band_count"] = sum(r.get("band_count", 0) for r in window)
    return summary


def write_plots(trainer: Trainer) -> None:
    """loss_per_expert.png (from log.jsonl) and loss_vs_sigma.png (running per-bin means)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("training plots need matplotlib: pip install matplotlib") from e
    out = trainer.out_dir
    records = [json.loads(ln) for ln in (out / LOG_FILE).read_text().splitlines() if ln.strip()]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in trainer.cfg.trained_experts:
        pts = [(r["step"], r["loss"][name]) for r in records if name in r["loss"]]
        if pts:
            ax.plot(*zip(*pts), label=name)
    ax.set(xlabel="step", ylabel="velocity MSE", yscale="log", title="loss per expert")
    if ax.lines:
        ax.legend()
    fig.savefig(out / "loss_per_expert.png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    total, count = trainer.sigma_bins
    centres = (torch.arange(NUM_SIGMA_BINS) + 0.5) / NUM_SIGMA_BINS
    keep = count > 0
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(centres[keep], (total[keep] / count[keep]), marker="o")
    for b in trainer.cfg.moe.boundaries:
        ax.axvline(b, color="grey", linestyle="--")
    ax.set(xlabel="sigma", ylabel="velocity MSE (run mean)", title="loss vs sigma")
    fig.savefig(out / "loss_vs_sigma.png", dpi=100, bbox_inches="tight")
    plt.close(fig)


def train_main(config_path: str | Path) -> Path:
    """`vidmoe train CONFIG`: read the config, train (resuming if possible); returns out_dir."""
    trainer = train(load_train_config(config_path))
    return trainer.out_dir
