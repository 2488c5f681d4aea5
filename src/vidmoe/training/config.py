"""The configuration of a training run: `TrainConfig`, read from TOML or JSON by
`load_train_config`, and the learning-rate schedule it names (`lr_factor`).

`vidmoe.training.loop` runs it; this module holds only the settings and their validation, so a
script that writes, checks or prints a config needs no model code.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vidmoe.config import (
    ExpertOverrides,
    MoEConfig,
    TransformerConfig,
    expert_transformer,
    normalize_expert_overrides,
)
from vidmoe.devices import check_device, resolve_device  # noqa: F401 (loop.py imports it here)
from vidmoe.models.fp8 import BLOCK_LINEARS
from vidmoe.models.transformer import warn_if_head_too_narrow
from vidmoe.training.objective import SIGMA_SAMPLINGS, expert_ranges
from vidmoe.training.objective_terms import ObjectiveOptions
from vidmoe.training.tables import parse_named_tables, parse_table

LR_SCHEDULES = ("constant", "cosine")
STRATEGIES = ("ddp", "fsdp")
# Release module names: the attention q/k/v/o and FFN linears of every block (peft matches a
# target against the end of a module name).
DEFAULT_LORA_TARGETS = tuple(n for n in BLOCK_LINEARS if not n.endswith("_img"))
# The LoRA keys of configs written before the [lora] table: top-level key -> key in [lora]
OLD_LORA_KEYS = {
    "lora_rank": "rank",
    "lora_alpha": "alpha",
    "lora_targets": "targets",
    "lora_dropout": "dropout",
}


@dataclass(frozen=True, kw_only=True)
class LoraTrainConfig:
    """One peft LoRA adapter per trained expert on frozen weights (`[lora]` in a train config);
    `rank = 0`, the default, trains all weights. `vidmoe.training.finetune` applies it."""

    rank: int = 0
    """> 0: train one LoRA adapter of this rank per expert, base weights frozen; 0: no LoRA."""
    alpha: float = 0.0
    """LoRA alpha (the adapter's scale is alpha / rank); 0: equal to `rank` (scale 1)."""
    targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
    """Module-name suffixes that get adapters (default: attention q/k/v/o and FFN linears)."""
    dropout: float = 0.0
    """Dropout on the LoRA input."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(self.targets))
        if self.rank < 0:
            raise ValueError(f"rank must be >= 0 (0: no LoRA, all weights train); got {self.rank}")
        if self.alpha < 0:
            raise ValueError(f"alpha must be >= 0 (0: equal to rank); got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1); got {self.dropout}")
        if self.rank and not self.targets:
            raise ValueError(
                f"targets is empty; name module suffixes such as {list(DEFAULT_LORA_TARGETS[:3])}"
            )

    @property
    def scale_alpha(self) -> float:
        """The alpha peft is given: `alpha`, or `rank` when that is 0 (scale 1)."""
        return self.alpha or self.rank


@dataclass(frozen=True, kw_only=True)
class DistributedConfig:
    """How a run launched by torchrun on several processes spreads the trained experts over
    them (`[distributed]` in a train config); a single process ignores it. Every rank takes an
    equal share of each global batch (`batch_size`); see `vidmoe.training.distributed`."""

    strategy: str = "ddp"
    """'ddp': every rank holds whole experts, gradients are all-reduced (torch DDP); 'fsdp':
    each block's parameters, gradients and optimiser state are sharded over the ranks (FSDP2
    `fully_shard`), gathered block by block for the forward and backward passes."""
    reshard_after_forward: bool = True
    """fsdp only: free each block's gathered weights after its forward and gather them again for
    the backward (less memory); false keeps them from forward to backward (less traffic)."""

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}; got {self.strategy!r}")


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
    """Clips per step (split between the experts by sigma); under torchrun the global batch,
    split equally over the ranks (it must be a multiple of the world size)."""
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
    schedule_start: int = 0
    """The step from which the warm-up and the cosine count: a run resumed from a checkpoint at
    this step starts a new learning-rate cycle there (a warm restart: warm-up to `lr`, cosine to
    10% at `max_steps`, from this config's `lr`); 0: the schedule spans the whole run."""
    stop_step: int = 0
    """End this run at this step (with a checkpoint) while the schedule still runs to
    `max_steps`; 0: at `max_steps`. A long schedule can so be trained in parts, and a run that
    stopped on `max_minutes` be repeated exactly (the shipped demo's decay phase names its step)."""
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
    oversample: dict[str, int] = field(default_factory=dict)
    """Class-balanced data: a clip whose caption has the word W appears N times per epoch
    (`oversample = {star = 2}` draws stars twice as often). Whole words of each clip's first
    caption, case-insensitive; a clip with several named words takes the largest N."""
    band_training: bool = False
    """Score samples inside a transition band (`[moe] band` > 0) on the router's blend of the
    two neighbouring experts, as sampling with that band runs them; needs every expert."""
    temporal_weight: float = 0.0
    """Weight of the frame-difference MSE of the predicted clean latent; 0: off."""
    edge_weight: float = 0.0
    """Weight of the velocity MSE weighted by the clean latent's edge map (outlines count more:
    thin detail such as a star's points); 0: off."""
    specialisation_weight: float = 0.0
    """Weight of the owner-beats-the-others margin term (every sample runs through every
    expert); 0: off; needs every expert."""
    specialisation_margin: float = 0.05
    """Velocity-MSE margin by which the owner should beat each other expert on its samples."""
    use_bf16: bool = False
    """Run the experts under bf16 autocast."""
    use_checkpointing: bool = False
    """Gradient checkpointing of the transformer blocks."""
    compile: bool = False
    """`torch.compile` each trained expert in place (`nn.Module.compile`: checkpoints keep their
    keys). The first steps pay the compile time (a C++ compiler is needed on the CPU); measured
    on the demo's low-noise expert on 2 CPU threads: 1.08x in fp32, 1.84x with `use_bf16`."""
    seed: int = 0
    """Seeds the initialisation, the data order, sigmas, noise and caption dropout."""
    log_every: int = 10
    """Steps between log.jsonl lines."""
    checkpoint_every: int = 200
    """Steps between checkpoints (a final one is always written)."""
    num_threads: int = 0
    """torch CPU threads; 0 leaves torch's default."""
    device: str = "cpu"
    """Where the experts train: "cpu", "cuda", "cuda:N" or "auto" (CUDA when there is one).
    Data, sigmas, noise and caption dropout are drawn on the CPU from the run's generator
    whatever the device, and checkpoints are read onto the CPU, so a run resumes on another
    device with the same draws."""
    use_progress: bool = True
    """Show a tqdm bar."""
    init: str = ""
    """Start from this model (a vidmoe, official or diffusers folder; its experts' architecture
    must equal `transformer`); empty: fresh weights. See `vidmoe.training.finetune`."""
    lora: LoraTrainConfig = field(default_factory=LoraTrainConfig)
    """LoRA fine-tuning (`[lora]`: rank, alpha, targets, dropout); rank 0: all weights train."""
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    """Several processes under torchrun (`[distributed]`: strategy, reshard_after_forward)."""

    def __post_init__(self) -> None:
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}; got {self.lr_schedule!r}")
        if self.sigma_sampling not in SIGMA_SAMPLINGS:
            raise ValueError(
                f"sigma_sampling must be one of {SIGMA_SAMPLINGS}; got {self.sigma_sampling!r}"
            )
        self._check_ranges()
        object.__setattr__(self, "experts", tuple(self.experts))
        check_device(self.device)
        for word, times in self.oversample.items():
            if not word.strip() or " " in word.strip():
                raise ValueError(f"oversample names single words; got {word!r}")
            if isinstance(times, bool) or not isinstance(times, int) or times < 1:
                raise ValueError(
                    f"oversample[{word!r}] must be a whole number of times >= 1; got {times!r}"
                )
        expert_ranges(self.moe, self.experts)  # unknown names are an error
        self.objective_options.check_run(self.moe, self.experts)
        overrides = normalize_expert_overrides(
            self.expert_overrides, self.transformer, self.moe.expert_names
        )
        object.__setattr__(self, "expert_overrides", overrides)
        for name in ("batch_size", "max_steps", "log_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if not 0 <= self.schedule_start < self.max_steps:
            raise ValueError(
                f"schedule_start must be in [0, max_steps={self.max_steps}); "
                f"got {self.schedule_start}"
            )
        if not 0 <= self.stop_step <= self.max_steps:
            raise ValueError(
                f"stop_step must be in [0, max_steps={self.max_steps}] (0: run to max_steps); "
                f"got {self.stop_step}"
            )
        for name in self.trained_experts:
            warn_if_head_too_narrow(self.transformer_for(name), name)

    def _check_ranges(self) -> None:
        """ValueError for a number outside its range, before any work is done."""
        ranges = (
            ("lr", self.lr > 0, "> 0"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ("warmup_steps", self.warmup_steps >= 0, ">= 0"),
            ("max_minutes", self.max_minutes >= 0, ">= 0 (0: no limit)"),
            ("grad_clip", self.grad_clip >= 0, ">= 0 (0: no clipping)"),
            ("ema_decay", 0 <= self.ema_decay <= 1, "in [0, 1]"),
            ("sigma_shift", self.sigma_shift > 0, "> 0"),
            ("logit_std", self.logit_std > 0, "> 0"),
            ("caption_dropout", 0 <= self.caption_dropout <= 1, "in [0, 1]"),
            ("num_threads", self.num_threads >= 0, ">= 0 (0: torch's default)"),
        )
        for name, ok, accepted in ranges:
            if not ok:
                raise ValueError(f"{name} must be {accepted}; got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Read a config's dict strictly: every key of every table must be a field there, of its
        type (`vidmoe.training.tables`); `[lora]` holds `LoraTrainConfig` fields."""
        old = [k for k in OLD_LORA_KEYS if k in d]
        if old:
            new = ", ".join(f"{OLD_LORA_KEYS[k]} = {d[k]!r}" for k in old)
            raise ValueError(
                f"{', '.join(old)}: the LoRA settings moved to the [lora] table; write "
                f"[lora] with {new} instead"
            )
        expert_overrides = functools.partial(parse_named_tables, TransformerConfig)
        return parse_table(cls, d, parsers={"expert_overrides": expert_overrides})

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
    def last_step(self) -> int:
        """The step this run ends at: `stop_step`, or `max_steps` when that is 0."""
        return self.stop_step or self.max_steps

    @property
    def trained_experts(self) -> tuple[str, ...]:
        """The experts this run trains, noisiest first."""
        return tuple(n for n in self.moe.expert_names if not self.experts or n in self.experts)

    @property
    def objective_options(self) -> ObjectiveOptions:
        """The optional objective terms of this run (`vidmoe.training.objective_terms`)."""
        return ObjectiveOptions(
            band_training=self.band_training,
            temporal_weight=self.temporal_weight,
            edge_weight=self.edge_weight,
            specialisation_weight=self.specialisation_weight,
            specialisation_margin=self.specialisation_margin,
        )


def load_train_config(path: str | Path) -> TrainConfig:
    """Read a TrainConfig from a .toml or .json file.

    A config may name another one it starts from with `base = "other.toml"` (a path relative to
    this file): the base is read first (it may have a base of its own) and this file's keys
    replace its keys; tables (`[transformer]`, `[moe]`, `[lora]`, `[expert_overrides.NAME]`) are
    merged key by key. A training phase that resumes another then says only what changes. The
    merged dict is read strictly (`TrainConfig.from_dict`); an error names this file.
    """
    d = read_config(path)
    try:
        return TrainConfig.from_dict(d)
    except ValueError as e:
        raise ValueError(f"train config {path}: {e}") from None


def read_config(path: str | Path, what: str = "train config") -> dict[str, Any]:
    """The dict of a .toml or .json config file, its `base` chain resolved (see
    `load_train_config`); `what` names the kind of config in error messages."""
    return _read_config_chain(Path(path), (), what)


def _read_config_chain(path: Path, seen: tuple[Path, ...], what: str) -> dict[str, Any]:
    if not path.is_file():
        named = f" (the base of {seen[-1]})" if seen else ""
        raise ValueError(f"{what} {path}{named} does not exist")
    if path.suffix not in (".toml", ".json"):
        raise ValueError(f"{what} must be .toml or .json; got {path.name}")
    key = path.resolve()
    if key in seen:
        chain = " -> ".join(str(p) for p in (*seen, key))
        raise ValueError(f"{what} bases form a cycle: {chain}")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} {path} cannot be read: {e}") from None
    try:
        if path.suffix == ".toml":
            import tomllib

            d = tomllib.loads(text)
        else:
            d = json.loads(text)
    except ValueError as e:  # tomllib.TOMLDecodeError and json.JSONDecodeError are ValueErrors
        raise ValueError(f"{what} {path} is not valid {path.suffix[1:]}: {e}") from None
    base = d.pop("base", None)
    if base is None:
        return d
    if not isinstance(base, str):
        raise ValueError(f"{what} {path}: base must be a file name; got {base!r}")
    return _merged(_read_config_chain(path.parent / base, (*seen, key), what), d)


def _merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`base` with `override`'s keys in place of its own; tables are merged key by key."""
    out = dict(base)
    for k, v in override.items():
        both_tables = isinstance(v, dict) and isinstance(out.get(k), dict)
        out[k] = _merged(out[k], v) if both_tables else v
    return out


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """Learning-rate multiplier after `step` optimiser steps (counted from `schedule_start`)."""
    step, length = step - cfg.schedule_start, cfg.max_steps - cfg.schedule_start
    if step < cfg.warmup_steps:
        return (max(step, 0) + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    progress = min((step - cfg.warmup_steps) / max(length - cfg.warmup_steps, 1), 1.0)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))
