"""The adapters (LoRA, weight deltas) loaded into a pipeline's experts: which file, which
format, which strength on which expert, and the per-step strengths the plan asks for.

The tensors live on the expert modules (`vidmoe.models.lora`); this registry remembers where
they came from so a run's JSON can name every adapter (file, sha256, format, strengths).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from torch import nn

from vidmoe.models import lora


@dataclass
class AdapterRecord:
    """One loaded adapter: its file and its strength on each expert it is attached to."""

    name: str
    file: str
    sha256: str
    format: str
    strengths: dict[str, float]
    """Expert name -> strength."""
    num_modules: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def check_strength(strength, what: str = "strength") -> float:
    if (
        isinstance(strength, bool)
        or not isinstance(strength, (int, float))
        or not math.isfinite(strength)
    ):
        raise ValueError(f"{what} must be a finite number, e.g. 0.8; got {strength!r}")
    return float(strength)


class AdapterSet:
    """The adapters of a pipeline, keyed by name."""

    def __init__(self, experts: Mapping[str, nn.Module]):
        self.experts = experts
        self.records: dict[str, AdapterRecord] = {}

    def _check_expert(self, expert: str) -> None:
        if expert not in self.experts:
            raise ValueError(f"unknown expert {expert!r}; valid experts: {', '.join(self.experts)}")

    def load(
        self,
        path: str | Path,
        *,
        expert: str | None = None,
        strength: float | Mapping[str, float] = 1.0,
        name: str | None = None,
        strict: bool = True,
    ) -> AdapterRecord:
        """Read a LoRA file (any supported format) and attach it, unfused.

        Args:
            expert: the expert to adapt; None: the experts the file names (diffusers
                `transformer_2.`, vidmoe prefixes), else every expert.
            strength: one strength, or expert name -> strength.
            name: the adapter's name (default: the file's stem); unique per pipeline.
            strict: raise when tensors match no module (False: warn and skip them).
        """
        from torch.distributed.fsdp import FSDPModule

        from vidmoe.io.lora_formats import read_lora

        if any(isinstance(e, FSDPModule) for e in self.experts.values()):
            raise ValueError(
                "LoRA adapters cannot attach to experts sharded with --shard-experts (FSDP2 "
                "manages their layers): merge the LoRA into a checkpoint first, or run unsharded"
            )
        if expert is not None:
            self._check_expert(expert)
        per_expert = dict(strength) if isinstance(strength, Mapping) else None
        for e, s in (per_expert or {"all experts": strength}).items():
            if per_expert is not None:
                self._check_expert(e)
            check_strength(s, f"LoRA strength for {e}")
        path = Path(path)
        name = name or path.stem
        first = next(iter(self.experts.values()))
        lf = read_lora(
            path,
            modules=lora.adaptable_modules(first),
            expert_names=list(self.experts),
            strict=strict,
        )
        targets = self._targets(lf.experts, expert, path)
        rec = self.records.get(name)
        # the same file may be added to another expert under its name (own strength there)
        if rec is not None and (rec.sha256 != lf.sha256 or set(targets) & set(rec.strengths)):
            raise ValueError(
                f"an adapter named {name!r} is already loaded on {', '.join(rec.strengths)}; "
                "pass another name"
            )
        strengths = {e: float(per_expert.get(e, 1.0) if per_expert else strength) for e in targets}
        attached = []
        try:
            for e, weights in targets.items():
                lora.add_adapter(self.experts[e], name, weights, strength=strengths[e])
                attached.append(e)
        except ValueError:
            for e in attached:
                lora.remove_adapter(self.experts[e], name)
            raise
        if rec is None:
            rec = AdapterRecord(
                name=name,
                file=str(path),
                sha256=lf.sha256,
                format=lf.format,
                strengths={},
                num_modules=lf.num_modules,
            )
            self.records[name] = rec
        rec.strengths.update(strengths)
        return rec

    def _targets(self, groups: dict, expert: str | None, path: Path) -> dict[str, dict]:
        shared = groups.get(None, {})
        named = {e: w for e, w in groups.items() if e is not None}
        for e in named:
            self._check_expert(e)
        if expert is not None:
            if expert not in named and not shared:
                raise ValueError(
                    f"{path.name} holds adapters for {', '.join(named)} only, not {expert!r}"
                )
            return {expert: {**shared, **named.get(expert, {})}}
        if not named:
            return {e: shared for e in self.experts}
        return {e: {**shared, **w} for e, w in named.items()}

    def _record(self, name: str) -> AdapterRecord:
        if name not in self.records:
            known = ", ".join(self.records) or "none"
            raise ValueError(f"no adapter named {name!r}; loaded: {known}")
        return self.records[name]

    def unload(self, name: str | None = None) -> None:
        """Detach one adapter (None: all) and restore the original weights."""
        names = list(self.records) if name is None else [self._record(name).name]
        for n in names:
            for e in self.records.pop(n).strengths:
                lora.remove_adapter(self.experts[e], n)

    def set_strength(self, name: str, strength: float, expert: str | None = None) -> None:
        """Change an adapter's strength on one expert (None: on every expert holding it)."""
        rec = self._record(name)
        s = check_strength(strength)
        if expert is not None:
            self._check_expert(expert)
            if expert not in rec.strengths:
                raise ValueError(f"adapter {name!r} is not attached to {expert!r}")
        for e in [expert] if expert else list(rec.strengths):
            lora.set_strengths(self.experts[e], {name: s})
            rec.strengths[e] = s

    def fuse(self, names: list[str] | None = None) -> None:
        """Merge adapters (default: all) into the expert weights at their current strengths."""
        names = list(self.records) if names is None else [self._record(n).name for n in names]
        for e, module in self.experts.items():
            chosen = [n for n in names if e in self.records[n].strengths]
            lora.fuse(module, chosen)

    def unfuse(self) -> None:
        """Restore the exact original weights; the adapters stay loaded, unfused."""
        for module in self.experts.values():
            lora.unfuse(module)

    def strengths(self) -> dict[str, dict[str, float]]:
        """Adapter name -> expert -> strength."""
        return {n: dict(r.strengths) for n, r in self.records.items()}

    def apply(self, expert: str, step_scales: Mapping[str, float]) -> None:
        """Set the strengths of `expert`'s adapters for one step (`StepPlan.adapter_scales`)."""
        scales = {}
        for n, rec in self.records.items():
            if expert in rec.strengths:
                scales[n] = step_scales.get(
                    f"{expert}/{n}", step_scales.get(n, rec.strengths[expert])
                )
        if scales:
            lora.set_strengths(self.experts[expert], scales)

    def to_list(self) -> list[dict]:
        return [r.to_dict() for r in self.records.values()]
