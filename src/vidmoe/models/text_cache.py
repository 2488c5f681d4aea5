"""Per-prompt memory of an expert's text path: every denoising step embeds the same prompt and
projects it to the same cross-attention keys and values, so at inference an expert keeps the
last result and serves it again while the input and the weights are unchanged (identical math).

Held by the modules that compute them (`WanTransformer` for the text embedding, `CrossAttention`
for its keys and values); nothing is kept while gradients are on or under torch.compile.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import nn


def cache_allowed() -> bool:
    """Inference in eager mode: no autograd graph to keep, no compiled region to guard."""
    return not torch.is_grad_enabled() and not torch.compiler.is_compiling()


def weights_key(*modules: nn.Module) -> tuple | None:
    """What the modules' outputs depend on besides their input: each parameter and buffer's
    object, storage address, version (bumped by in-place updates: an optimiser step, a fused
    LoRA, `load_state_dict`), device, dtype and shape; tensors swapped in by a residency policy or
    an `assign=True` load are new objects at new addresses. None when a module has a hook (a LoRA
    adapter, whose strength can change between calls): then nothing is cached."""
    key = []
    for module in modules:
        for m in module.modules():
            if m._forward_hooks or m._forward_pre_hooks:
                return None
        for t in itertools.chain(module.parameters(), module.buffers()):
            key.append((id(t), t.data_ptr(), t._version, t.device, t.dtype, t.shape))
    return tuple(key)


@dataclass(frozen=True, kw_only=True)
class Cached:
    """One cached result: the input it came from (held, with its version) and the weights' key."""

    source: torch.Tensor
    version: int
    key: tuple
    value: tuple[torch.Tensor, ...]

    def serves(self, source: torch.Tensor, key: tuple | None, *, same_object: bool) -> bool:
        """Whether `value` is what the modules would compute from `source` now."""
        if key is None or key != self.key:
            return False
        if same_object:
            return source is self.source and source._version == self.version
        s = self.source
        return (
            s.shape == source.shape
            and s.dtype == source.dtype
            and s.device == source.device
            and s._version == self.version
            and torch.equal(s, source)
        )
