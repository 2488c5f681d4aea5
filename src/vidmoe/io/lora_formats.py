"""LoRA files in every format in circulation, read into per-expert adapter weights on release
module names.

Formats (detected from the tensor names, never guessed silently):
- `diffusers`: peft names on diffusers modules, `transformer.blocks.0.attn1.to_q.lora_A.weight`
  (also without `transformer.`); `transformer_2.` is the second (low-noise) expert; alpha, if
  any, in the `lora_adapter_metadata` JSON; `lora_B.bias` is a bias delta.
- `release`: release names as ComfyUI and the step-distilled (Lightning / lightx2v) adapters
  write them, `diffusion_model.blocks.0.self_attn.q.lora_down.weight` / `lora_up` (or
  `lora_A`/`lora_B`), `.alpha`, `.diff` (whole-weight delta), `.diff_b` (bias delta), and
  `.diff` / lightx2v's `.diff_m` on the bare `modulation` tables.
- `kohya`: musubi-tuner / Kohya, `lora_unet_blocks_0_self_attn_q.lora_down.weight` + `.alpha`;
  the underscores are resolved against the model's module names.
- `vidmoe`: our trainer's files, `high_noise.blocks.0.self_attn.q.lora_A.weight` (`lora_B`,
  optional scalar `.alpha`, `.diff`, `.diff_b`) on release names, prefixed by the expert name;
  metadata `vidmoe_format = "lora/1"`.
Scale of a low-rank pair: alpha / rank when an alpha is stored, else 1 (the peft default).
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vidmoe.io.keymaps import transformer_to_release
from vidmoe.io.tensors import SafetensorsFile
from vidmoe.models.lora import AdapterWeights

FORMATS = ("diffusers", "release", "kohya", "vidmoe")
VIDMOE_FORMAT = "lora/1"
# (suffix, part); checked in order, longest first where they overlap.
_SUFFIXES = (
    (".lora_A.weight", "A"),
    (".lora_down.weight", "A"),
    (".lora_B.weight", "B"),
    (".lora_up.weight", "B"),
    (".lora_B.bias", "B_bias"),
    (".lora_up.bias", "B_bias"),
    (".alpha", "alpha"),
    (".diff_b", "diff_b"),
    (".diff", "diff"),
    (".diff_m", "diff_m"),
)
_RELEASE_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
_DIFFUSERS_EXPERTS = {"transformer.": 0, "transformer_2.": 1}


@dataclass
class LoRAFile:
    """A parsed LoRA file: adapter weights per expert (None: not tied to an expert)."""

    path: Path
    format: str
    sha256: str
    experts: dict[str | None, dict[str, AdapterWeights]]
    """Expert name (or None) -> release module name -> weights."""
    unmatched: list[str] = field(default_factory=list)
    """Tensor names that map to no module of the model."""
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def num_modules(self) -> int:
        return sum(len(m) for m in self.experts.values())


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def detect_format(
    names: Sequence[str], metadata: Mapping[str, str], expert_names: Sequence[str]
) -> str:
    """The format of a LoRA file from its tensor names and metadata (one of FORMATS)."""
    if metadata.get("vidmoe_format") or any(n.split(".", 1)[0] in expert_names for n in names):
        return "vidmoe"
    if any(n.startswith("lora_unet_") for n in names):
        return "kohya"
    if any(n.startswith(_RELEASE_PREFIXES) for n in names):
        return "release"
    bare = [_strip_prefix(n)[0] for n in names]
    if any(p in n for n in bare for p in (".self_attn.", ".cross_attn.", ".ffn.0.", ".ffn.2.")):
        return "release"
    if any(
        n.startswith(("transformer.", "transformer_2.", "base_model.model.")) for n in names
    ) or any(
        p in n
        for n in bare
        for p in (".attn1.", ".attn2.", ".ffn.net.", "condition_embedder.", "proj_out.")
    ):
        return "diffusers"
    raise ValueError(
        f"cannot tell the LoRA format from tensor names such as {list(names)[:3]}; known formats: "
        f"{', '.join(FORMATS)}"
    )


def _strip_prefix(name: str) -> tuple[str, str | None]:
    """Drop a known outer prefix; returns (rest, diffusers expert prefix or None)."""
    name = name.removeprefix("base_model.model.")
    for p in _RELEASE_PREFIXES:
        if name.startswith(p):
            return name[len(p) :], None
    for p in _DIFFUSERS_EXPERTS:
        if name.startswith(p):
            return name[len(p) :], p
    return name, None


def _split_suffix(name: str) -> tuple[str, str] | None:
    for suffix, part in _SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)], part
    return None


def _resolve_module(
    mod: str, fmt: str, modules: Mapping[str, tuple], underscored: dict
) -> str | None:
    if fmt == "kohya":
        return underscored.get(mod.removeprefix("lora_unet_"))
    if mod in modules:
        return mod
    mapped = transformer_to_release(mod + ".weight").removesuffix(".weight")
    return mapped if mapped in modules else None


def _peft_alphas(metadata: Mapping[str, str]) -> tuple[float | None, dict[str, float], bool]:
    """(lora_alpha, alpha_pattern, use_rslora) from diffusers' `lora_adapter_metadata` JSON."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None, {}, False
    try:
        cfg = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"lora_adapter_metadata is not valid JSON ({e})") from None
    cfg = {k.removeprefix("transformer."): v for k, v in cfg.items()}
    alpha = cfg.get("lora_alpha")
    pattern = {
        transformer_to_release(k + ".weight").removesuffix(".weight"): float(v)
        for k, v in (cfg.get("alpha_pattern") or {}).items()
    }
    return (None if alpha is None else float(alpha)), pattern, bool(cfg.get("use_rslora", False))


def parse_lora(
    tensors: Mapping[str, torch.Tensor],
    *,
    modules: Mapping[str, tuple],
    expert_names: Sequence[str],
    metadata: Mapping[str, str] | None = None,
    path: Path | str = "<memory>",
    sha256: str = "",
) -> LoRAFile:
    """Map a LoRA state dict onto release module names, per expert.

    Args:
        tensors: tensor name -> tensor (a safetensors file or a dict).
        modules: the model's adaptable module names -> weight shape (`adaptable_modules`).
        expert_names: the model's experts, noisiest first.
    Raises:
        ValueError: ranks of A and B disagree, a tensor does not fit its module (an adapter
            for another model), A without B, or an unknown format.
    """
    metadata = dict(metadata or {})
    names = list(tensors)
    fmt = detect_format(names, metadata, expert_names)
    underscored = {m.replace(".", "_"): m for m in modules}
    has_second = any(
        n.removeprefix("base_model.model.").startswith("transformer_2.") for n in names
    )
    parts: dict[tuple[str | None, str], dict[str, tuple[str, torch.Tensor]]] = {}
    unmatched = []
    for name in names:
        expert, rest = None, name
        if fmt == "vidmoe" and name.split(".", 1)[0] in expert_names:
            expert, rest = name.split(".", 1)
        else:
            rest, dprefix = _strip_prefix(name)
            if dprefix is not None and has_second:
                idx = _DIFFUSERS_EXPERTS[dprefix]
                if idx >= len(expert_names):
                    raise ValueError(f"{name}: this model has only {len(expert_names)} expert(s)")
                expert = expert_names[idx]
        split = _split_suffix(rest)
        if split is not None and split[1] == "diff_m":  # lightx2v's name for `modulation.diff`
            split = (split[0] + ".modulation", "diff")
        module = None if split is None else _resolve_module(split[0], fmt, modules, underscored)
        if module is None:
            unmatched.append(name)
            continue
        parts.setdefault((expert, module), {})[split[1]] = (name, tensors[name])
    alpha, pattern, rslora = _peft_alphas(metadata)
    experts: dict[str | None, dict[str, AdapterWeights]] = {}
    for (expert, module), p in parts.items():
        experts.setdefault(expert, {})[module] = _weights(
            module, p, modules[module], alpha, pattern, rslora
        )
    return LoRAFile(
        path=Path(path),
        format=fmt,
        sha256=sha256,
        experts=experts,
        unmatched=unmatched,
        metadata=metadata,
    )


def _weights(module: str, p: dict, shape: tuple, alpha, pattern, rslora) -> AdapterWeights:
    """Check one module's tensors against its weight shape and build its `AdapterWeights`."""
    if ("A" in p) != ("B" in p):
        have, need = ("A", "B") if "A" in p else ("B", "A")
        raise ValueError(f"{p[have][0]}: LoRA {have} without its {need} for module {module}")
    if "alpha" in p and "A" not in p:
        raise ValueError(f"{p['alpha'][0]}: an alpha without lora_A/lora_B for module {module}")
    w = AdapterWeights()
    if "A" in p:
        (name_a, a), (name_b, b) = p["A"], p["B"]
        if b.dim() < 2 or a.shape[0] != b.shape[1]:
            raise ValueError(
                f"ranks of {name_a} {tuple(a.shape)} and {name_b} {tuple(b.shape)} disagree "
                f"(lora_A is (rank, in), lora_B is (out, rank))"
            )
        rank, in_numel, out_dim = a.shape[0], int(torch.Size(shape[1:]).numel()), shape[0]
        if a[0].numel() != in_numel or b.shape[0] != out_dim:
            raise ValueError(
                f"{name_a} {tuple(a.shape)} / {name_b} {tuple(b.shape)} do not fit {module}, whose "
                f"weight is {tuple(shape)}: is this an adapter for another model?"
            )
        if "alpha" in p:
            a_val = float(p["alpha"][1].float().reshape(-1)[0])
        else:
            a_val = next((float(v) for k, v in pattern.items() if module.endswith(k)), alpha)
        denom = rank**0.5 if rslora else rank
        w.down, w.up, w.scale = a, b, 1.0 if a_val is None else a_val / denom
    if "B_bias" in p:
        if "diff_b" in p or "A" not in p:
            raise ValueError(f"{p['B_bias'][0]}: a lora_B bias needs lora_A/lora_B and no .diff_b")
        # peft's `lora_bias`: the bias is part of lora_B, so it is scaled by alpha / rank too
        p["diff_b"] = (p["B_bias"][0], p["B_bias"][1] * w.scale)
    for key in ("diff", "diff_b"):
        if key in p:
            name, t = p[key]
            want = tuple(shape) if key == "diff" else (shape[0],)
            if tuple(t.shape) != want:
                raise ValueError(
                    f"{name} has shape {tuple(t.shape)} but {module} needs {want}: is this an "
                    "adapter for another model?"
                )
            setattr(w, key, t)
    return w


def read_lora(
    path: str | Path,
    *,
    modules: Mapping[str, tuple],
    expert_names: Sequence[str],
    strict: bool = True,
) -> LoRAFile:
    """Read a LoRA safetensors file (any of FORMATS) and check it against the model.

    Strict (default): a tensor that maps to no module raises ValueError listing the first ten
    and a count; non-strict warns with the same list and skips them.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file not found: {path}")
    if path.suffix != ".safetensors":
        raise ValueError(f"LoRA files must be .safetensors; got {path.name}")
    src = SafetensorsFile(path)  # checks the header and the length (truncated files)
    tensors = {n: src[n] for n in src}
    lora = parse_lora(
        tensors,
        modules=modules,
        expert_names=expert_names,
        metadata=src.metadata,
        path=path,
        sha256=file_sha256(path),
    )
    check_unmatched(lora, strict=strict)
    if not lora.num_modules:
        raise ValueError(f"{path.name}: no tensor of this {lora.format} LoRA matches the model")
    return lora


def check_unmatched(lora: LoRAFile, *, strict: bool) -> None:
    if not lora.unmatched:
        return
    shown = ", ".join(lora.unmatched[:10])
    more = f" (and {len(lora.unmatched) - 10} more)" if len(lora.unmatched) > 10 else ""
    msg = (
        f"{lora.path.name} ({lora.format} format): {len(lora.unmatched)} tensor(s) match no "
        f"module of the model: {shown}{more}"
    )
    if strict:
        raise ValueError(msg + "; load with strict=False (--lora-strict off) to skip them")
    warnings.warn(msg + "; skipped", stacklevel=3)


def vidmoe_lora_state_dict(
    experts: Mapping[str, Mapping[str, AdapterWeights]],
) -> dict[str, torch.Tensor]:
    """Our trainer's format: `{expert}.{module}.lora_A.weight` / `lora_B` / `alpha` / `diff` / `diff_b`."""
    out = {}
    for expert, mods in experts.items():
        if not re.fullmatch(r"[A-Za-z_]\w*", expert):
            raise ValueError(f"expert name {expert!r} cannot prefix tensor names")
        for mod, w in mods.items():
            key = f"{expert}.{mod}"
            if w.down is not None:
                out[f"{key}.lora_A.weight"], out[f"{key}.lora_B.weight"] = w.down, w.up
                out[f"{key}.alpha"] = torch.tensor(w.scale * w.down.shape[0])
            if w.diff is not None:
                out[f"{key}.diff"] = w.diff
            if w.diff_b is not None:
                out[f"{key}.diff_b"] = w.diff_b
    return {k: v.contiguous() for k, v in out.items()}
