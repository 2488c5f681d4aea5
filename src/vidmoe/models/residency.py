"""Residency policies: which expert weights sit on the compute device, in host RAM or only in
their file, and when they move. One policy per `Experts` (models/moe.py), chosen per run.

- `resident`: every expert on the device.
- `swap`: the idle experts in (pinned, where CUDA exists) host RAM; `prefetch(name)` copies the
  next expert on a side CUDA stream one step ahead, so the switch costs no step time.
- `disk`: the idle experts are not held at all (hollow tensors); an expert is re-read from its
  file when its phase comes, after the previous one is released: host RAM holds about one expert.
- `blocks`: the active expert's transformer blocks stream to the device one at a time, the next
  block copied on a side stream while the current one runs (GPUs smaller than one expert).

On the CPU every move is a no-op and every policy computes exactly what `resident` does; each
policy records what it moved in `log` (name, action) so the order is testable anywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import ClassVar

import torch
from torch import nn

ExpertSource = Callable[[], nn.Module]
"""Builds one expert anew from its file (the loader knows the file and layout)."""


def _tensors(module: nn.Module, skip: nn.Module | None = None):
    """(owner module, leaf name, tensor) for every parameter and buffer (adapters included), but
    for those inside `skip`."""
    skipped = {id(m) for m in skip.modules()} if skip is not None else set()
    for owner in module.modules():
        if id(owner) in skipped:
            continue
        for leaf, t in list(owner._parameters.items()) + list(owner._buffers.items()):
            if t is not None:
                yield owner, leaf, t


def _set(owner: nn.Module, leaf: str, value: torch.Tensor) -> None:
    if leaf in owner._parameters:
        old = owner._parameters[leaf]
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=old.requires_grad)
    else:
        owner._buffers[leaf] = value


class _HostCopy:
    """A module's tensors kept in host RAM, moved to the device and back without a round trip.

    The host tensors are the master copy (pinned where the device is CUDA), rescanned before each
    upload so adapters attached later travel too. Device copies are dropped on `evict` unless they
    were written to in place (a fused LoRA), which copies them back.
    """

    def __init__(self, module: nn.Module, device: torch.device, *, skip: nn.Module | None = None):
        self.module, self.device, self.skip = module, device, skip
        self.pin = device.type == "cuda"
        self.slots: list[tuple[nn.Module, str, torch.Tensor]] = []
        self.pending: tuple[list[torch.Tensor], object] | None = None
        self.versions: list[int] | None = None
        self._scan()

    def _scan(self) -> None:
        self.slots = []
        for owner, leaf, t in _tensors(self.module, self.skip):
            host = t.detach().to("cpu")
            if self.pin and not host.is_pinned():
                host = host.pin_memory()
            if host is not t and (host.data_ptr() != t.data_ptr() or host.device != t.device):
                _set(owner, leaf, host)
            self.slots.append((owner, leaf, host))

    def start(self, stream) -> None:
        """Begin the host -> device copy (on `stream`, asynchronous where CUDA exists)."""
        if self.pending is not None or self.versions is not None:
            return
        self._scan()
        if stream is None:
            self.pending = ([h.to(self.device) for _, _, h in self.slots], None)
            return
        with torch.cuda.stream(stream):
            copies = [h.to(self.device, non_blocking=True) for _, _, h in self.slots]
            self.pending = (copies, stream.record_event())

    def install(self, stream) -> None:
        """Put the device copies in the module (starting the copy if `start` was not called)."""
        if self.versions is not None:
            return
        self.start(stream)
        copies, event = self.pending
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for c in copies:
                c.record_stream(current)  # allocated on the side stream, used on this one
        for (owner, leaf, _), c in zip(self.slots, copies):
            _set(owner, leaf, c)
        self.versions = [c._version for c in copies]
        self.pending = None

    def evict(self) -> None:
        """Point the module back at the host tensors (copying back what was written on device)."""
        if self.versions is None:
            self.pending = None
            return
        for (owner, leaf, host), version in zip(self.slots, self.versions):
            current = getattr(owner, leaf)
            if current._version != version:
                with torch.no_grad():
                    host.copy_(current.detach())  # e.g. fused LoRA weights: keep them
            _set(owner, leaf, host)
        self.versions = None


def _side_stream(device: torch.device):
    return torch.cuda.Stream(device) if device.type == "cuda" else None


class Residency:
    """Which experts sit on the compute device, and when they move: one policy per `Experts`.

    `place` runs once when the experts are gathered, `prefetch` a step before an expert's first
    step (a hint; a policy may ignore it), `activate` before each expert runs.
    """

    name: ClassVar[str]
    offloads: ClassVar[bool] = True
    """Whether the text encoder and the VAE leave the device when their work is done."""

    def __init__(self, *, sources: Mapping[str, ExpertSource] | None = None):
        self.sources = dict(sources or {})
        self.log: list[tuple[str, str]] = []
        """(expert or block, action) in order: 'upload', 'prefetch', 'evict', 'read', 'release'."""

    def place(self, experts: Mapping[str, nn.Module], device: torch.device) -> None:
        """Initial placement of every expert."""

    def prefetch(self, experts: Mapping[str, nn.Module], name: str, device: torch.device) -> None:
        """Start bringing expert `name` to `device` (no effect by default)."""

    def activate(
        self, experts: Mapping[str, nn.Module], name: str, device: torch.device
    ) -> nn.Module:
        """Make expert `name` ready to run on `device`, and return it."""
        raise NotImplementedError

    def idle(self, experts: Mapping[str, nn.Module]) -> None:
        """The denoising is over: free what the decode does not need (no effect by default)."""

    def on_device(self) -> tuple[str, ...]:
        """The experts whose weights are on the compute device now (all of them or in part)."""
        raise NotImplementedError


class Resident(Residency):
    """Every expert stays on the compute device."""

    name = "resident"
    offloads = False

    def place(self, experts: Mapping[str, nn.Module], device: torch.device) -> None:
        for expert in experts.values():
            expert.to(device)
        self.names = tuple(experts)

    def activate(
        self, experts: Mapping[str, nn.Module], name: str, device: torch.device
    ) -> nn.Module:
        return experts[name]

    def on_device(self) -> tuple[str, ...]:
        return self.names


class Swap(Residency):
    """One expert on the device at a time; the idle ones wait in (pinned) host RAM.

    At a switch the device briefly holds two experts when the next one was prefetched.
    """

    name = "swap"

    def place(self, experts: Mapping[str, nn.Module], device: torch.device) -> None:
        self.copies = {n: _HostCopy(e, device) for n, e in experts.items()}
        self.stream = _side_stream(device)
        self.active: str | None = None

    def prefetch(self, experts: Mapping[str, nn.Module], name: str, device: torch.device) -> None:
        if name != self.active and self.copies[name].pending is None:
            self.log.append((name, "prefetch"))
            self.copies[name].start(self.stream)

    def activate(
        self, experts: Mapping[str, nn.Module], name: str, device: torch.device
    ) -> nn.Module:
        _switch(self, self.copies, name)
        return experts[name]

    def idle(self, experts: Mapping[str, nn.Module]) -> None:
        if self.active is not None:
            self.log.append((self.active, "evict"))
            self.copies[self.active].evict()
            self.active = None

    def on_device(self) -> tuple[str, ...]:
        return () if self.active is None else (self.active,)


def hollow(module: nn.Module) -> None:
    """Release a module's weights: each parameter and persistent buffer becomes a stride-0 view of
    one element (same shape, dtype, CPU), so shapes, counts and adapters still see the module."""
    persistent = {name for name, _ in module.state_dict(keep_vars=True).items()}
    named = dict(module.named_modules())
    for name in persistent:
        owner_name, _, leaf = name.rpartition(".")
        owner = named[owner_name]
        t = getattr(owner, leaf)
        _set(owner, leaf, torch.zeros((), dtype=t.dtype).expand(t.shape))


def is_hollow(module: nn.Module) -> bool:
    """True when the module's weights were released by `hollow`."""
    return any(p.numel() > 1 and 0 in p.stride() for p in module.parameters())


class Disk(Residency):
    """The idle experts are not held at all: an expert is read from its file when its phase comes,
    after the previous one is released, so memory holds about one expert."""

    name = "disk"

    def place(self, experts: Mapping[str, nn.Module], device: torch.device) -> None:
        missing = [n for n in experts if n not in self.sources]
        if missing:
            raise ValueError(
                f"residency 'disk' re-reads each expert from its file, but experts {missing} "
                "were built from modules with no file (a preset, a random or an in-memory model): "
                "use residency 'swap', or load a checkpoint folder with residency 'disk'"
            )
        for expert in experts.values():
            if not is_hollow(expert):
                hollow(expert)
        self.active: str | None = None

    def activate(
        self, experts: Mapping[str, nn.Module], name: str, device: torch.device
    ) -> nn.Module:
        if name == self.active:
            return experts[name]
        if self.active is not None:
            self._release(experts[self.active], self.active)
        self.log.append((name, "read"))
        fresh = self.sources[name]()
        module = experts[name]
        for key, t in fresh.state_dict(keep_vars=True).items():
            owner_name, _, leaf = key.rpartition(".")
            _set(module.get_submodule(owner_name), leaf, t.detach())
        del fresh
        module.to(device)  # the adapters' buffers follow (the weights are there already)
        self.active = name
        return module

    def idle(self, experts: Mapping[str, nn.Module]) -> None:
        if self.active is not None:
            self._release(experts[self.active], self.active)
            self.active = None

    def _release(self, module: nn.Module, name: str) -> None:
        from vidmoe.models.lora import is_fused

        if is_fused(module):
            raise ValueError(
                f"expert {name!r} holds fused LoRA weights, which residency 'disk' cannot re-read "
                "from its file: unfuse the LoRA (run it unfused) or use residency 'swap'"
            )
        self.log.append((name, "release"))
        hollow(module)

    def on_device(self) -> tuple[str, ...]:
        return () if self.active is None else (self.active,)


class Blocks(Residency):
    """The active expert's blocks stream to the device one at a time, the next block prefetched
    on a side stream while the current one runs; its other layers stay while it is active."""

    name = "blocks"

    def place(self, experts: Mapping[str, nn.Module], device: torch.device) -> None:
        self.stream = _side_stream(device)
        self.rest, self.blocks, self.handles = {}, {}, []
        for name, expert in experts.items():
            blocks = getattr(expert, "blocks", None)
            if not isinstance(blocks, nn.ModuleList) or not len(blocks):
                raise ValueError(
                    f"residency 'blocks' streams transformer blocks, but expert {name!r} "
                    f"({type(expert).__name__}) has no `blocks` list: use residency 'swap'"
                )
            self.blocks[name] = [_HostCopy(b, device) for b in blocks]
            self.rest[name] = _HostCopy(expert, device, skip=blocks)
            for i, block in enumerate(blocks):
                self.handles.append(block.register_forward_pre_hook(self._before(name, i)))
                self.handles.append(block.register_forward_hook(self._after(name, i)))
        self.active: str | None = None

    def _before(self, name: str, i: int):
        def hook(module, args):
            copies = self.blocks[name]
            self.log.append((f"{name}.blocks.{i}", "upload"))
            copies[i].install(self.stream)
            if i + 1 < len(copies):
                self.log.append((f"{name}.blocks.{i + 1}", "prefetch"))
                copies[i + 1].start(self.stream)

        return hook

    def _after(self, name: str, i: int):
        def hook(module, args, output):
            self.log.append((f"{name}.blocks.{i}", "evict"))
            self.blocks[name][i].evict()

        return hook

    def prefetch(self, experts: Mapping[str, nn.Module], name: str, device: torch.device) -> None:
        self.log.append((f"{name}.blocks.0", "prefetch"))
        self.blocks[name][0].start(self.stream)

    def activate(
        self, experts: Mapping[str, nn.Module], name: str, device: torch.device
    ) -> nn.Module:
        _switch(self, self.rest, name)
        self.blocks[name][0].start(self.stream)
        return experts[name]

    def idle(self, experts: Mapping[str, nn.Module]) -> None:
        if self.active is not None:
            self.log.append((self.active, "evict"))
            self.rest[self.active].evict()
            self.active = None

    def on_device(self) -> tuple[str, ...]:
        return () if self.active is None else (self.active,)


RESIDENCY: dict[str, type[Residency]] = {p.name: p for p in (Resident, Swap, Disk, Blocks)}


def _switch(policy, held: Mapping, name: str) -> None:
    """Make `name` the active expert of a policy that holds device copies in `held`: the active
    one's copy leaves the device first, then `name`'s is installed (both logged)."""
    if name == policy.active:
        return
    if policy.active is not None:
        policy.log.append((policy.active, "evict"))
        held[policy.active].evict()
    policy.log.append((name, "upload"))
    held[name].install(policy.stream)
    policy.active = name
