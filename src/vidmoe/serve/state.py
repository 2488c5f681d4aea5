"""What a running server holds: its configuration (`ServeConfig`, what `vidmoe serve` was started
with) and its state (`ServeState`: the model config, the job store, the worker, the folders),
kept in `app.state.serve` and read by every route through the `serve_state` dependency.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from starlette.requests import Request

from vidmoe.config import ModelConfig
from vidmoe.planner import MemoryBudget, MemoryRequest, machine_budget
from vidmoe.sampling.settings import Limits
from vidmoe.serve.queue import JobStore
from vidmoe.serve.worker import Worker

LIMITS = ("max_steps", "max_num_frames", "max_pixels")
"""The limits an operator may tighten (the fields of `Limits` in sampling/settings.py)."""
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]", "::1")
"""Host names a browser uses for this machine; a Host header naming another is refused (DNS
rebinding) unless listed in `ServeConfig.allowed_hosts` or a token guards the server."""


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    """What `vidmoe serve` was started with."""

    model: str | None = None
    """Checkpoint path or preset; None is the demo model."""
    outputs: Path = Path("outputs/serve")
    """Folder for the job database, videos and uploads."""
    max_queue: int = 64
    """Jobs waiting at most; more get 429."""
    token: str | None = None
    """Bearer token required on every /v1 route, or None."""
    device: str = "auto"
    dtype: str = "auto"
    residency: str = "resident"
    attention: str = "auto"
    """Attention backend of the experts: auto, sdpa, flash or sage (models/attention.py)."""
    compile: bool = False
    """torch.compile each transformer block at load."""
    max_upload_bytes: int = 10 * 1024 * 1024
    """Largest accepted request body (images included)."""
    event_interval: float = 0.2
    """Seconds between progress polls of one event stream."""
    max_steps: int | None = None
    """Most denoising steps one job may ask for; None keeps the shared limit for the model
    (`Limits.for_model`, sampling/settings.py). Same for the two below."""
    max_num_frames: int | None = None
    """Most frames one job may ask for."""
    max_pixels: int | None = None
    """Most pixels per frame (width x height) one job may ask for."""
    max_attempts: int = 2
    """Runs of one job that may end with the server killed; then the job is `failed`."""
    allowed_hosts: tuple[str, ...] = ()
    """Host names (`name` or `name:port`) accepted beside the loopback names."""
    allowed_origins: tuple[str, ...] = ()
    """Origins (`scheme://host[:port]`) accepted on state-changing requests beside the
    server's own."""
    memory_budget: MemoryBudget | None = None
    """Memory a job may need at its predicted peak (vidmoe/planner.py); None: the machine's
    available RAM (and free CUDA memory) when the server starts, before the model loads."""

    def __post_init__(self) -> None:
        for name in ("max_queue", "max_attempts", *LIMITS):
            value = getattr(self, name)
            if name in LIMITS and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1; got {value!r}")
        from vidmoe.models.attention import ATTENTION_BACKENDS

        if self.attention != "auto" and self.attention not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attention must be one of auto, {', '.join(ATTENTION_BACKENDS)}; got {self.attention!r}"
            )
        for origin in self.allowed_origins:
            if not origin.startswith(("http://", "https://")) or origin.count("/") != 2:
                raise ValueError(
                    f"an allowed origin is scheme://host[:port] with no path, as a browser "
                    f"sends it; got {origin!r}: use e.g. https://example.org"
                )

    def limit_overrides(self) -> dict[str, int]:
        """The limits this server's operator set, by their `Limits` field names."""
        return {name: getattr(self, name) for name in LIMITS if getattr(self, name) is not None}


@dataclass(frozen=True, kw_only=True)
class ServeState:
    """The objects every route reads (one per application)."""

    cfg: ServeConfig
    config: ModelConfig
    limits: Limits
    """The shared limits for the model, tightened by the operator; no client names a file."""
    store: JobStore
    worker: Worker
    videos: Path
    uploads: Path
    model_info: dict = field(default_factory=dict)
    """`/v1/model`'s answer, filled on first use (counting parameters builds the model)."""
    memory_budget: MemoryBudget | None = None
    """What a job may need (see `ServeConfig.memory_budget`); filled when the state is built."""

    def __post_init__(self) -> None:
        if self.memory_budget is None:
            budget = self.cfg.memory_budget or machine_budget(self.memory_request(1, 1, 1).device)
            object.__setattr__(self, "memory_budget", budget)

    def memory_request(self, width: int, height: int, num_frames: int) -> MemoryRequest:
        """The planner's request for a job of this size on this server's device and dtype."""
        from vidmoe.devices import resolve_device, resolve_dtype

        device = resolve_device(self.cfg.device)
        dtype = str(resolve_dtype(self.cfg.dtype, device)).removeprefix("torch.")
        return MemoryRequest(
            width=width,
            height=height,
            num_frames=num_frames,
            dtype=dtype,
            residency=self.cfg.residency,
            device=device.type,
        )


def serve_state(request: Request) -> ServeState:
    """The dependency every route takes: the application's `ServeState`."""
    return request.app.state.serve
