"""The training loop of a Mixture of Experts over noise levels, trained from a latent cache.

`train(config)` builds the experts, resumes from `out_dir/checkpoint.pt` when one exists, and
runs AdamW steps (warm-up, per-expert gradient clipping, EMA, optional bf16 autocast, gradient
checkpointing and torch.compile), logging per-expert losses and sample counts to `log.jsonl` and
plots to PNG. `train_main(path)` is the `vidmoe train CONFIG` entry point (TOML or JSON config).
Under torchrun every rank runs `train(config, world=...)` on its share of each global batch
(`vidmoe.training.distributed`); rank 0 writes the checkpoint, log and plots.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vidmoe.models.moe import Experts, ParamCounts, Placement
from vidmoe.models.transformer import WanTransformer
from vidmoe.parallel.world import World
from vidmoe.training import finetune
from vidmoe.training.checkpoint import (
    CHECKPOINT_FILE,
    EMA,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from vidmoe.training.config import TrainConfig, load_train_config, lr_factor, resolve_device
from vidmoe.training.data import EpochSampler, LatentCache, oversampled_items
from vidmoe.training.distributed import DataParallel
from vidmoe.training.objective import (
    assign_experts,
    expert_ranges,
    flow_matching_loss,
    sample_sigma,
)

__all__ = ["TrainConfig", "Trainer", "load_train_config", "lr_factor", "train", "train_main"]

LOG_FILE = "log.jsonl"
NUM_SIGMA_BINS = 20


def build_experts(cfg: TrainConfig) -> dict[str, WanTransformer]:
    """The trained experts of a run, seeded by `cfg.seed` (in name order): fresh, or read from
    `cfg.init` (fp32, all parameters trainable); with `[lora]` rank > 0 each gets a peft
    adapter and its base is frozen (`vidmoe.training.finetune`)."""
    torch.manual_seed(cfg.seed)
    architectures = {n: cfg.transformer_for(n) for n in cfg.trained_experts}
    if cfg.init:
        experts = finetune.load_init_experts(cfg.init, architectures)
    else:
        experts = {n: WanTransformer(arch) for n, arch in architectures.items()}
    for expert in experts.values():
        expert.train().use_checkpointing = cfg.use_checkpointing
        if cfg.lora.rank:
            finetune.add_lora(expert, cfg.lora)
    return experts


class Trainer:
    """The state of one run: experts (an `Experts` of the trained ones), optimiser, scheduler,
    EMA, data position, RNG; under torchrun, this rank's part of it (`world`, joined already)."""

    def __init__(self, cfg: TrainConfig, *, world: World = World()):
        self.cfg = cfg
        self.out_dir = Path(cfg.out_dir)
        self.data = LatentCache(cfg.cache)
        if self.data.text_len != cfg.transformer.text_len:
            raise ValueError(
                f"the cache pads text to {self.data.text_len} tokens but the experts take "
                f"text_len={cfg.transformer.text_len}: rebuild the cache or set text_len"
            )
        self.device = resolve_device(cfg.device)
        if world.distributed and self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", world.local_rank)
        _check_distributed(cfg, world)
        dp = cfg.distributed
        self.parallel = DataParallel(
            world,
            dp.strategy,
            device=self.device,
            use_bf16=cfg.use_bf16,
            reshard_after_forward=dp.reshard_after_forward,
        )
        self.share = self.parallel.share(cfg.batch_size) if world.distributed else None
        # the trained experts only (`cfg.experts`); the router still knows every configured one
        placement = Placement(device=self.device)
        self.experts = Experts(build_experts(cfg), cfg.moe, placement=placement, require_all=False)
        if cfg.compile:
            for expert in self.experts.values():
                expert.compile()  # in place: state_dict keys and the optimiser's params unchanged
        self.modules = self.parallel.wrap(self.experts)  # what a step calls (DDP, FSDP2 or as is)
        self.sigma_ranges = expert_ranges(cfg.moe, cfg.experts) if cfg.experts else None
        groups = [
            {"params": [p for p in e.parameters() if p.requires_grad], "name": n}
            for n, e in self.experts.items()
        ]
        self.opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: lr_factor(cfg, s))
        self.ema = EMA(self.experts, cfg.ema_decay)
        items = oversampled_items(self.data.captions, cfg.oversample) if cfg.oversample else None
        self.sampler = EpochSampler(len(self.data), cfg.batch_size, cfg.seed, items)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.step = 0
        self.sigma_bins = torch.zeros(2, NUM_SIGMA_BINS, dtype=torch.float64)  # (sum, count)
        self.log_window: list[dict] = []  # step records not yet summarised into log.jsonl

    def param_counts(self) -> ParamCounts:
        """Parameters of the trained experts: total, one step's (the largest), per expert."""
        return self.experts.param_counts()

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "config": self.cfg.to_dict(),
            "experts": self.expert_states(),
            "ema": {**self.ema.state_dict(), "shadow": self.parallel.full_state(self.ema.shadow)},
            "optimizer": self.parallel.optimizer_state(self.opt),
            "scheduler": self.sched.state_dict(),
            "data": self.sampler.state_dict(),
            "rng": rng_state(self.generator),
            "sigma_bins": self.sigma_bins,
            "log_window": list(self.log_window),
        }

    def expert_states(self) -> dict[str, dict[str, torch.Tensor]]:
        """What a checkpoint keeps of each expert (`finetune.trainable_state`), whole tensors
        on every world size (a collective under FSDP2)."""
        return {
            n: self.parallel.full_state(finetune.trainable_state(e))
            for n, e in self.experts.items()
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load a checkpoint's state (whole tensors, written on any world size)."""
        self.step = state["step"]
        shard = self.parallel.sharded_module_state
        for n, e in self.experts.items():
            finetune.load_trainable_state(e, shard(e, state["experts"][n]))
        self.ema.load_state_dict(state["ema"], device=self.device)
        for n, e in self.experts.items():  # FSDP2: each average sharded as its parameter
            params = dict(e.named_parameters())
            shadow = self.ema.shadow[n]
            self.ema.shadow[n] = {
                k: self.parallel.like_param(v, params[k]) for k, v in shadow.items()
            }
        self.parallel.load_optimizer_state(self.opt, state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        # The config's lr and schedule rule from here on (the scheduler's state holds the old
        # base lr): a resumed run may change them, as a warm restart (schedule_start) does.
        self.sched.base_lrs = [self.cfg.lr] * len(self.opt.param_groups)
        for group in self.opt.param_groups:
            group["initial_lr"] = self.cfg.lr
            group["lr"] = self.cfg.lr * lr_factor(self.cfg, self.step)
        self.sched._last_lr = [group["lr"] for group in self.opt.param_groups]
        self.sampler.load_state_dict(state["data"])
        set_rng_state(state["rng"], self.generator)
        self.sigma_bins = state["sigma_bins"].clone()
        self.log_window = list(state["log_window"])

    def save(self) -> Path:
        """Write the checkpoint (and LoRA adapter files); under torchrun every rank calls it (the
        state is gathered) and rank 0 writes."""
        path = self.out_dir / CHECKPOINT_FILE
        state = self.state_dict()
        if self.parallel.is_main:
            save_checkpoint(state, path)
        if self.cfg.lora.rank:  # the adapter files, raw and (when it is on) EMA
            files = dict(
                lora=self.cfg.lora, expert_names=self.cfg.moe.expert_names, init=self.cfg.init
            )
            raw = state["experts"] if self.parallel.size > 1 else None  # whole tensors
            if self.parallel.is_main:
                folder = self.out_dir / finetune.LORA_DIR
                finetune.save_lora_adapters(self.experts, folder, shadows=raw, **files)
            if self.cfg.ema_decay > 0 and self.parallel.is_main:
                folder = self.out_dir / finetune.LORA_EMA_DIR
                shadows = state["ema"]["shadow"]
                finetune.save_lora_adapters(self.experts, folder, shadows=shadows, **files)
        self.parallel.barrier()  # no rank runs ahead of a checkpoint being written
        return path

    def try_resume(self) -> bool:
        """Load out_dir/checkpoint.pt if present; drop log lines written after it."""
        path = self.out_dir / CHECKPOINT_FILE
        if not self.parallel.agree(path.is_file()):  # rank 0's view decides
            return False
        if not path.is_file():
            raise ValueError(
                f"rank {self.parallel.world.rank} cannot read {path}, which rank 0 has: out_dir "
                "must be on a file system that every node of the run shares"
            )
        self.load_state_dict(load_checkpoint(path))
        log = self.out_dir / LOG_FILE
        if log.is_file() and self.parallel.is_main:
            lines = [ln for ln in log.read_text().splitlines() if ln.strip()]
            keep = [ln for ln in lines if json.loads(ln).get("step", 0) <= self.step]
            log.write_text("".join(ln + "\n" for ln in keep))
        return True

    # -- one step ------------------------------------------------------------------------------
    def train_step(self) -> dict[str, Any]:
        """Draw a batch, noise and sigmas; one optimiser step; returns the log record.

        Under torchrun every rank draws the whole global batch, as one process would, and runs
        its share of it, so the ranks' samples, noise and sigmas together are the one-process
        run's; the record holds global values."""
        cfg, g = self.cfg, self.generator
        x0, text = self.data.batch(self.sampler.next(), g)  # (B, Z, F, H, W), (B, S, D)
        b = x0.shape[0]
        drop = torch.rand(b, generator=g) < cfg.caption_dropout  # (B,)
        text = torch.where(drop[:, None, None], self.data.empty_text, text)  # (B, S, D)
        sigma = sample_sigma(
            b,
            kind=cfg.sigma_sampling,
            shift=cfg.sigma_shift,
            logit_mean=cfg.logit_mean,
            logit_std=cfg.logit_std,
            generator=g,
            ranges=self.sigma_ranges,
        )
        noise = torch.randn(x0.shape, generator=g)  # (B, Z, F, H, W)
        # every draw above is made on the CPU, so any device sees the same numbers
        if self.share is not None:  # this rank's samples (sigma stays whole: it routes)
            x0, text, noise = x0[self.share], text[self.share], noise[self.share]
        dev = self.device
        x0, text, sigma, noise = (t.to(dev, non_blocking=True) for t in (x0, text, sigma, noise))
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.use_bf16):
            out = flow_matching_loss(
                self.modules,
                cfg.moe,
                x0,
                text,
                sigma,
                noise,
                options=cfg.objective_options,
                share=self.share,
            )
        self.opt.zero_grad(set_to_none=True)
        # DDP and FSDP2 average the ranks' gradients; each rank's loss is its part of a sum
        (out.loss * self.parallel.size if self.share is not None else out.loss).backward()
        grad_norms = {}
        for name, expert in self.experts.items():
            if name in out.ran and cfg.grad_clip > 0:  # band/specialisation: not only owners
                norm = nn.utils.clip_grad_norm_(expert.parameters(), cfg.grad_clip)
                grad_norms[name] = round(float(self.parallel.whole(norm)), 4)
        self.opt.step()
        self.sched.step()
        self.step += 1
        self.ema.update(self.experts, self.step)
        per_expert, sample_loss = out.per_expert, out.sample_loss
        if self.share is not None:  # the global batch's values, as one process logs them
            sample_loss = self.parallel.gather(sample_loss)  # (B,)
            per_expert = _per_expert_means(sample_loss, sigma, cfg.moe, out.counts)
            out.terms = {
                n: float(self.parallel.mean(torch.tensor([v], dtype=torch.float64, device=dev)))
                for n, v in out.terms.items()
            }
        bins = (sigma.cpu() * NUM_SIGMA_BINS).long().clamp(0, NUM_SIGMA_BINS - 1)  # (B,)
        self.sigma_bins[0].index_add_(0, bins, sample_loss.double().cpu())
        self.sigma_bins[1].index_add_(0, bins, torch.ones(b, dtype=torch.float64))
        record = {
            "step": self.step,
            "loss": {n: round(v.item(), 6) for n, v in per_expert.items()},
            "count": out.counts,
            "grad_norm": grad_norms,
            "lr": self.sched.get_last_lr()[0],
        }
        if out.terms:  # optional objective terms: unweighted batch means
            record["terms"] = {n: round(v, 6) for n, v in out.terms.items()}
        if cfg.band_training:
            record["band_count"] = out.band_count
        return record


def train(
    cfg: TrainConfig,
    *,
    callback: Callable[[Trainer], None] | None = None,
    world: World = World(),
) -> Trainer:
    """Run (or resume) a training run to `cfg.last_step` or `cfg.max_minutes`.

    Args:
        cfg: the run's config.
        callback: called with the trainer after every step (after any checkpoint of that step).
        world: this process's place under torchrun; every rank calls `train` after joining the
            process group (`vidmoe.parallel.world.start`). Rank 0 writes the files.
    Returns:
        the trainer, after its final checkpoint.
    """
    from tqdm.auto import tqdm

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    trainer = Trainer(cfg, world=world)
    main = world.is_main
    if main:
        trainer.out_dir.mkdir(parents=True, exist_ok=True)
    trainer.parallel.barrier()
    trainer.try_resume()
    if trainer.step < cfg.schedule_start:
        raise ValueError(
            f"schedule_start={cfg.schedule_start} starts a new learning-rate cycle in a resumed "
            f"run, but {trainer.out_dir} is at step {trainer.step}: resume from a checkpoint at "
            f"step >= {cfg.schedule_start}, or set schedule_start = 0"
        )
    if main:
        (trainer.out_dir / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    start = time.time()
    bar = tqdm(total=cfg.last_step, initial=trainer.step, disable=not (cfg.use_progress and main))
    with open(trainer.out_dir / LOG_FILE, "a") if main else contextlib.nullcontext() as log:
        while trainer.step < cfg.last_step:
            record = trainer.train_step()
            trainer.log_window.append(record)
            bar.update()
            bar.set_postfix_str(" ".join(f"{n}={v:.4f}" for n, v in record["loss"].items()))
            if trainer.step % cfg.log_every == 0:
                summary = _summarise(trainer.log_window, time.time() - start)
                if main:
                    log.write(json.dumps(summary) + "\n")
                    log.flush()
                trainer.log_window = []
            timed_out = cfg.max_minutes and time.time() - start > 60 * cfg.max_minutes
            timed_out = trainer.parallel.agree(bool(timed_out)) if cfg.max_minutes else False
            if trainer.step % cfg.checkpoint_every == 0 or timed_out:
                trainer.save()
                if main:
                    write_plots(trainer)
            if callback is not None:
                callback(trainer)
            if timed_out:
                break
    bar.close()
    trainer.save()
    if main:
        write_plots(trainer)
    return trainer


def _check_distributed(cfg: TrainConfig, world: World) -> None:
    """ValueError for what a run on several processes cannot do."""
    if not world.distributed:
        return
    if cfg.compile and cfg.distributed.strategy == "fsdp":
        raise ValueError(
            "compile = true with [distributed] strategy = 'fsdp' is not supported: FSDP2 wraps "
            "each block after it is built; use strategy = 'ddp' or compile = false"
        )


def _per_expert_means(
    sample_loss: torch.Tensor, sigma: torch.Tensor, moe, counts: dict[str, int]
) -> dict[str, torch.Tensor]:
    """Mean of `sample_loss` (B,) over each expert's samples (by `sigma` (B,)), for the experts
    with a count: what `ObjectiveOutput.per_expert` holds for a one-process batch."""
    owner = assign_experts(sigma, moe)  # (B,)
    return {
        n: sample_loss[owner == moe.expert_names.index(n)].mean() for n, c in counts.items() if c
    }


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
    summary = {
        "step": last["step"],
        "loss": loss,
        "count": counts,
        "grad_norm": last["grad_norm"],
        "lr": last["lr"],
        "seconds": round(seconds, 1),
    }
    terms = [r["terms"] for r in window if "terms" in r]  # optional objective terms: step mean
    if terms:
        summary["terms"] = {n: round(sum(t[n] for t in terms) / len(terms), 6) for n in terms[0]}
    if any("band_count" in r for r in window):
        summary["band_count"] = sum(r.get("band_count", 0) for r in window)
    return summary


def write_plots(trainer: Trainer) -> None:
    """loss_per_expert.png (from log.jsonl) and loss_vs_sigma.png (running per-bin means)."""
    from vidmoe.io.plots import pyplot

    plt = pyplot()
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


def train_main(config_path: str | Path, *, world: World = World()) -> Path:
    """`vidmoe train CONFIG`: read the config, train (resuming if possible); returns out_dir.
    Under torchrun the caller has joined the process group of `world`."""
    trainer = train(load_train_config(config_path), world=world)
    return trainer.out_dir
