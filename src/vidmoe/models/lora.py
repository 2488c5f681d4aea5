"""Adapters on a frozen model: LoRA (low-rank A, B with an alpha/rank scale) and whole-tensor
deltas (`.diff` weight, `.diff_b` bias), several stacked per module, each with a name and a
strength that can change between any two forward calls; fuse/unfuse merges them into the weights.

Unfused adapters run beside the frozen module through a forward hook: y = f(x) + sum_i s_i
delta_i(x). Their tensors live in a child module `lora_adapters` as non-persistent buffers, so
they follow the model across devices (`.to`) while `state_dict()` keeps the release names only.
Supported: nn.Linear, nn.Conv3d (the patch embedding), the affine norms (`.diff`/`.diff_b`) and
bare parameters such as `blocks.N.modulation` (`.diff`, added for the duration of each call).
Shape legend: O output features, I input features, R rank, k kernel.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vidmoe.models.layers import LayerNorm, RMSNorm

STACK_NAME = "lora_adapters"
ADAPTABLE = (nn.Linear, nn.Conv3d, LayerNorm, RMSNorm)


@dataclass
class AdapterWeights:
    """One adapter's tensors for one module; any of the three parts may be absent."""

    down: torch.Tensor | None = None
    """(R, I) or (R, I, *k) LoRA A (`lora_down`)."""
    up: torch.Tensor | None = None
    """(O, R) or (O, R, 1, 1, 1) LoRA B (`lora_up`)."""
    scale: float = 1.0
    """alpha / rank (1 when the file stores no alpha)."""
    diff: torch.Tensor | None = None
    """Whole-weight delta, the weight's shape."""
    diff_b: torch.Tensor | None = None
    """Bias delta, the bias's shape."""


class Adapter(nn.Module):
    """One named adapter's tensors on one module (non-persistent buffers)."""

    def __init__(self, w: AdapterWeights, *, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.scale = float(w.scale)
        for key in ("down", "up", "diff", "diff_b"):
            t = getattr(w, key)
            t = None if t is None else t.detach().to(device=device, dtype=dtype)
            self.register_buffer(key, t, persistent=False)

    def delta(self, weight: torch.Tensor) -> torch.Tensor | None:
        """The whole-weight delta at strength 1 in float32 (LoRA B A scale + diff)."""
        out = None
        if self.down is not None:
            down, up = self.down.float().flatten(1), self.up.float().flatten(1)  # (R, I*k), (O, R)
            out = (up @ down).reshape(weight.shape) * self.scale  # (O, I, *k)
        if self.diff is not None:
            out = self.diff.float() if out is None else out + self.diff.float()
        return out


class AdapterStack(nn.Module):
    """The adapters attached to one module (or one bare parameter of it), and which are fused."""

    def __init__(self, strengths: dict[str, float], param: str | None = None):
        super().__init__()
        self.adapters = nn.ModuleDict()
        self.param = param  # None: the module's output; else a bare parameter ('modulation')
        self.strengths = strengths  # shared with the model's registry
        self.fused: dict[str, float] = {}  # name -> strength baked into the weights
        self.original: dict[str, torch.Tensor] = {}  # CPU copies of the unfused parameters
        self.saved: torch.Tensor | None = None  # a bare parameter's value during one call

    def active(self) -> Iterable[tuple[Adapter, float]]:
        for name, a in self.adapters.items():
            s = self.strengths.get(name, 0.0)
            if name not in self.fused and s != 0.0:
                yield a, s


def _norm_delta(module: nn.Module, x: torch.Tensor, dw, db) -> torch.Tensor:
    """Output change of an affine norm whose (weight, bias) change by (dw, db)."""
    if isinstance(module, RMSNorm):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + module.eps)
        return xf.type_as(x) * dw
    shape = module.normalized_shape
    dw = torch.zeros(shape, device=x.device) if dw is None else dw.float()
    db = torch.zeros(shape, device=x.device) if db is None else db.float()
    return F.layer_norm(x.float(), shape, dw, db, module.eps).type_as(x)


def _adapter_output(module: nn.Module, a: Adapter, x: torch.Tensor) -> torch.Tensor:
    """delta_i(x) of one adapter at strength 1 (every supported module is linear in its params)."""
    if isinstance(module, nn.Linear):
        out = F.linear(x, a.diff, a.diff_b) if a.diff is not None else 0.0  # (..., O)
        if a.down is not None:
            out = out + F.linear(F.linear(x, a.down), a.up) * a.scale  # (..., R) -> (..., O)
        if a.diff is None and a.diff_b is not None:
            out = out + a.diff_b
        return out
    if isinstance(module, nn.Conv3d):
        conv = module._conv_forward  # the module's own map (a patch embedding's patch_conv)
        out = 0.0
        if a.diff is not None or a.diff_b is not None:
            dw = a.diff if a.diff is not None else torch.zeros_like(module.weight)
            out = conv(x, dw, a.diff_b)  # (B, O, f, h, w)
        if a.down is not None:
            down = a.down.reshape(a.down.shape[0], *module.weight.shape[1:])  # (R, I, *k)
            up = a.up.reshape(*a.up.shape[:2], 1, 1, 1)  # (O, R, 1, 1, 1)
            out = out + F.conv3d(conv(x, down, None), up) * a.scale  # (B, O, f, h, w)
        return out
    return _norm_delta(module, x, a.diff, a.diff_b)


def _hook(module: nn.Module, args, output):
    stack: AdapterStack = getattr(module, STACK_NAME)
    x = args[0]
    for a, s in stack.active():
        output = output + _adapter_output(module, a, x) * s
    return output


def _param_pre_hook(module: nn.Module, args):
    """Add the active deltas to a bare parameter for this call (restored by `_param_post_hook`)."""
    for stack in _owned_stacks(module, params=True):
        deltas = [a.diff.float() * s for a, s in stack.active()]
        if deltas:
            p = getattr(module, stack.param)
            stack.saved = p.detach().clone()  # bare parameters are small (modulation tables)
            p.data.copy_((p.float() + sum(deltas)).to(p.dtype))


def _param_post_hook(module: nn.Module, args, output):
    for stack in _owned_stacks(module, params=True):
        if stack.saved is not None:
            getattr(module, stack.param).data.copy_(stack.saved)  # bit-exact restore
            stack.saved = None
    return output


def _owned_stacks(module: nn.Module, *, params: bool) -> list[AdapterStack]:
    return [
        m
        for m in module._modules.values()
        if isinstance(m, AdapterStack) and (m.param is not None) == params
    ]


def _registry(model: nn.Module) -> dict[str, float]:
    """The model's adapter strengths (name -> strength), created on first use."""
    if "_adapter_strengths" not in model.__dict__:
        model.__dict__["_adapter_strengths"] = {}
    return model.__dict__["_adapter_strengths"]


def _stacks(model: nn.Module) -> Iterable[tuple[str, nn.Module, AdapterStack]]:
    for name, m in list(model.named_modules()):
        for stack in list(m._modules.values()):
            if isinstance(stack, AdapterStack):
                yield name, m, stack


def _target(model: nn.Module, name: str) -> tuple[nn.Module | None, str | None]:
    """(module, None) for an adaptable module; (owner, attribute) for a bare parameter."""
    modules = dict(model.named_modules())
    module = modules.get(name)
    if module is not None:
        ok = isinstance(module, ADAPTABLE) and getattr(module, "weight", None) is not None
        return (module, None) if ok else (None, type(module).__name__)
    owner, _, attr = name.rpartition(".")
    parent = modules.get(owner)
    if parent is not None and isinstance(parent._parameters.get(attr), nn.Parameter):
        return parent, attr
    return None, "no such module"


def _check_shapes(module_name: str, module: nn.Module, adapter: str, w: AdapterWeights) -> None:
    weight, bias = module.weight, getattr(module, "bias", None)
    where = f"adapter {adapter!r}, module {module_name}"
    if (w.down is None) != (w.up is None):
        raise ValueError(f"{where}: LoRA needs both A (down) and B (up); got only one")
    if w.down is not None:
        if not isinstance(module, (nn.Linear, nn.Conv3d)):
            raise ValueError(f"{where}: LoRA on a {type(module).__name__} is not supported")
        rank_a, rank_b = w.down.shape[0], w.up.shape[1]
        if w.up.dim() < 2 or rank_a != rank_b:
            raise ValueError(
                f"{where}: lora_A rank {rank_a} {tuple(w.down.shape)} and lora_B rank "
                f"{rank_b if w.up.dim() >= 2 else '?'} {tuple(w.up.shape)} disagree"
            )
        in_numel, out_dim = math.prod(weight.shape[1:]), weight.shape[0]
        if math.prod(w.down.shape[1:]) != in_numel or w.up.shape[0] != out_dim:
            expect = f"A (R, {in_numel}) and B ({out_dim}, R)"
            raise ValueError(
                f"{where}: lora_A {tuple(w.down.shape)} / lora_B {tuple(w.up.shape)} do not fit "
                f"the weight {tuple(weight.shape)} (expected {expect}): an adapter for another model?"
            )
    for key, ref in (("diff", weight), ("diff_b", bias)):
        t = getattr(w, key)
        if t is None:
            continue
        if ref is None or tuple(t.shape) != tuple(ref.shape):
            got = "no parameter" if ref is None else tuple(ref.shape)
            raise ValueError(
                f"{where}: .{key} has shape {tuple(t.shape)} but the model's tensor is {got}: "
                "an adapter for another model?"
            )


def add_adapter(
    model: nn.Module, name: str, weights: Mapping[str, AdapterWeights], *, strength: float = 1.0
) -> None:
    """Attach adapter `name` to the modules of `model` named in `weights` (unfused).

    Args:
        weights: module name (release names, e.g. 'blocks.0.self_attn.q') -> its tensors; a bare
            parameter ('blocks.0.modulation') takes a `.diff` only.
        strength: initial strength (change it with `set_strengths`).
    """
    strengths = _registry(model)
    if name in strengths:
        raise ValueError(
            f"adapter {name!r} is already attached; unload it first or pick a new name"
        )
    targets = {}
    for mod_name, w in weights.items():
        module, attr = _target(model, mod_name)
        if module is None:
            raise ValueError(f"adapter {name!r}: cannot attach to {mod_name!r} ({attr})")
        if attr is None:
            _check_shapes(mod_name, module, name, w)
        else:
            _check_param_delta(mod_name, getattr(module, attr), name, w)
        targets[mod_name] = (module, attr)
    set_strengths(model, {name: strength})
    for mod_name, w in weights.items():
        module, attr = targets[mod_name]
        child = STACK_NAME if attr is None else f"{STACK_NAME}_{attr}"
        stack = module._modules.get(child)
        if stack is None:
            stack = AdapterStack(strengths, attr)
            module.add_module(child, stack)
            if attr is None:
                stack.handles = [module.register_forward_hook(_hook)]
            else:
                stack.handles = [
                    module.register_forward_pre_hook(_param_pre_hook),
                    module.register_forward_hook(_param_post_hook, always_call=True),
                ]
        ref = module.weight if attr is None else getattr(module, attr)
        stack.adapters[name] = Adapter(w, dtype=ref.dtype, device=ref.device)


def _check_param_delta(name: str, p: torch.Tensor, adapter: str, w: AdapterWeights) -> None:
    if w.down is not None or w.diff_b is not None or w.diff is None:
        raise ValueError(
            f"adapter {adapter!r}: {name} is a bare parameter; only a .diff delta applies to it"
        )
    if tuple(w.diff.shape) != tuple(p.shape):
        raise ValueError(
            f"adapter {adapter!r}: .diff for {name} has shape {tuple(w.diff.shape)} but the "
            f"model's tensor is {tuple(p.shape)}: an adapter for another model?"
        )


def set_strengths(model: nn.Module, strengths: Mapping[str, float]) -> None:
    """Set the strength of attached adapters; takes effect at the next forward call."""
    reg = _registry(model)
    for name, s in strengths.items():
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
            raise ValueError(f"strength of adapter {name!r} must be a finite number; got {s!r}")
        fused = next((st.fused[name] for _, _, st in _stacks(model) if name in st.fused), None)
        if fused is not None and float(s) != fused:
            raise ValueError(
                f"adapter {name!r} is fused at strength {fused:g}; unfuse before changing it to {s:g}"
            )
        reg[name] = float(s)


def adapter_strengths(model: nn.Module) -> dict[str, float]:
    """Attached adapter names -> current strength."""
    return dict(_registry(model))


def remove_adapter(model: nn.Module, name: str | None = None) -> None:
    """Detach adapter `name` (None: all); fused weights are restored first."""
    reg = _registry(model)
    if name is not None and name not in reg:
        known = ", ".join(reg) or "none"
        raise ValueError(f"no adapter named {name!r} on this model; attached: {known}")
    names = list(reg) if name is None else [name]
    refuse = {n for _, _, st in _stacks(model) for n in st.fused} - set(names)
    unfuse(model)
    for _, module, stack in list(_stacks(model)):
        for n in names:
            if n in stack.adapters:
                del stack.adapters[n]
        if not len(stack.adapters):
            for handle in stack.handles:
                handle.remove()
            child = next(k for k, v in module._modules.items() if v is stack)
            del module._modules[child]
    for n in names:
        reg.pop(n)
    if refuse:
        fuse(model, sorted(refuse))


@torch.no_grad()
def fuse(model: nn.Module, names: Iterable[str] | None = None) -> None:
    """Merge adapters (default: all) at their current strengths into the weights.

    The original parameters are copied to host memory first, so `unfuse` is bit-exact.
    """
    reg = _registry(model)
    chosen = list(reg) if names is None else list(names)
    for _, module, stack in _stacks(model):
        todo = [n for n in chosen if n in stack.adapters and n not in stack.fused]
        if not todo:
            continue
        keys = ("weight", "bias") if stack.param is None else (stack.param,)
        for key in keys:
            p = getattr(module, key, None)
            if p is not None and key not in stack.original:
                stack.original[key] = p.detach().to("cpu", copy=True)
        target = getattr(module, keys[0])
        dw, db = torch.zeros_like(target, dtype=torch.float32), None
        for n in todo:
            a, s = stack.adapters[n], reg[n]
            d = a.delta(target)
            if d is not None:
                dw += s * d
            if a.diff_b is not None:
                db = (0 if db is None else db) + s * a.diff_b.float()
            stack.fused[n] = s
        target.copy_((target.float() + dw).to(target.dtype))
        if db is not None:
            module.bias.copy_((module.bias.float() + db).to(module.bias.dtype))


@torch.no_grad()
def unfuse(model: nn.Module) -> None:
    """Restore the exact original weights; the adapters stay attached, unfused."""
    for _, module, stack in _stacks(model):
        for key, saved in stack.original.items():
            getattr(module, key).copy_(saved)
        stack.original.clear()
        stack.fused.clear()


def is_fused(model: nn.Module) -> bool:
    return any(stack.fused for _, _, stack in _stacks(model))


def adaptable_modules(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Names adapters can attach to -> weight shape: modules, and bare parameters (`.diff` only)."""
    out = {}
    for n, m in model.named_modules():
        if isinstance(m, AdapterStack):
            continue
        if isinstance(m, ADAPTABLE) and getattr(m, "weight", None) is not None:
            out[n] = tuple(m.weight.shape)
        elif not isinstance(m, ADAPTABLE):
            prefix = f"{n}." if n else ""
            out.update(
                {prefix + k: tuple(p.shape) for k, p in m._parameters.items() if p is not None}
            )
    return out
