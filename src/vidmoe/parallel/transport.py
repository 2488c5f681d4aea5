"""Point-to-point messages between ranks: a nested structure of dicts, lists, numbers, strings
and tensors, sent as one pickled skeleton plus each tensor's raw bytes (exact, any dtype).

`send_message` is asynchronous: it returns an `Outgoing` that keeps the buffers alive until
`wait()`, so the sender can go on computing while the receiver takes the message. Under NCCL the
buffers go through `device`; under gloo through the CPU.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class _TensorSlot:
    index: int
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass
class Outgoing:
    """A message on its way: its buffers and the send handles."""

    buffers: list[torch.Tensor]
    works: list

    def wait(self) -> None:
        for w in self.works:
            w.wait()
        self.works, self.buffers = [], []


def _split(obj, tensors: list[torch.Tensor]):
    """The skeleton of `obj` with each tensor replaced by a `_TensorSlot` (appended to tensors)."""
    if torch.is_tensor(obj):
        tensors.append(obj.detach())
        return _TensorSlot(len(tensors) - 1, tuple(obj.shape), obj.dtype)
    if isinstance(obj, dict):
        return {k: _split(v, tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_split(v, tensors) for v in obj)
    return obj


def _join(skeleton, tensors: list[torch.Tensor]):
    if isinstance(skeleton, _TensorSlot):
        return tensors[skeleton.index]
    if isinstance(skeleton, dict):
        return {k: _join(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, (list, tuple)):
        return type(skeleton)(_join(v, tensors) for v in skeleton)
    return skeleton


def _slots(skeleton) -> list[_TensorSlot]:
    if isinstance(skeleton, _TensorSlot):
        return [skeleton]
    values = skeleton.values() if isinstance(skeleton, dict) else skeleton
    if isinstance(skeleton, (dict, list, tuple)):
        return [s for v in values for s in _slots(v)]
    return []


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor (any dtype, bit-exact)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def _wire_device(device: torch.device) -> torch.device:
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def send_message(obj, dst: int, device: torch.device) -> Outgoing:
    """Start sending `obj` to rank `dst`; call `.wait()` on the result before reusing it."""
    wire = _wire_device(device)
    tensors: list[torch.Tensor] = []
    skeleton = pickle.dumps(_split(obj, tensors))
    header = torch.frombuffer(bytearray(skeleton), dtype=torch.uint8).to(wire)
    size = torch.tensor([header.numel()], dtype=torch.int64, device=wire)
    buffers = [size, header] + [_as_bytes(t.to(wire)) for t in tensors if t.numel()]
    return Outgoing(buffers=buffers, works=[dist.isend(b, dst) for b in buffers])


def recv_message(src: int, device: torch.device):
    """Receive the next message from rank `src`; its tensors land on `device`."""
    wire = _wire_device(device)
    size = torch.empty(1, dtype=torch.int64, device=wire)
    dist.recv(size, src)
    header = torch.empty(int(size.item()), dtype=torch.uint8, device=wire)
    dist.recv(header, src)
    skeleton = pickle.loads(header.cpu().numpy().tobytes())  # from a peer of this same run
    tensors = []
    for slot in sorted(_slots(skeleton), key=lambda s: s.index):
        t = torch.empty(slot.shape, dtype=slot.dtype, device=wire)
        if t.numel():
            dist.recv(_as_bytes(t), src)
        tensors.append(t.to(device))
    return _join(skeleton, tensors)
