"""Attention and its backends: exact softmax attention by SDPA (windows in query chunks, never an
(L, L) mask), flash-attn and SageAttention when installed, and the registry that picks one.

Every backend takes and returns the layout (B, L, N, Dh), applies no mask except an optional
local window, and refuses (ValueError) an input it cannot honour: a dtype, a device, a head width
or a window. `resolve_backend` checks all of that once at load; `attention` checks the cheap parts
again on every call, so a backend never falls back silently.

Shape legend: B batch, Lq query tokens, Lk key tokens, N heads, Dh head width.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange

Window = tuple[int, int]
HALF = (torch.float16, torch.bfloat16)


def band_mask(
    queries: range, keys: range, window: Window, device: torch.device | None = None
) -> torch.Tensor:
    """Boolean (len(queries), len(keys)) mask of a local window: True where key - query lies in
    [-left, right]. `window` is (left, right) in tokens as in flash-attention; -1 is unbounded."""
    left, right = window
    q = torch.arange(queries.start, queries.stop, device=device)
    k = torch.arange(keys.start, keys.stop, device=device)
    offset = k[None, :] - q[:, None]  # (Lq, Lk) key - query
    allowed = torch.ones_like(offset, dtype=torch.bool)
    if left >= 0:
        allowed &= offset >= -left
    if right >= 0:
        allowed &= offset <= right
    return allowed


def window_mask(
    grid: tuple[int, int, int], window: Window, device: torch.device | None = None
) -> torch.Tensor | None:
    """Boolean (L, L) mask of a local window over the flattened token sequence (None: global).

    Dense, so O(L^2) memory: `attention(..., window=)` never builds it; tests compare against it.
    """
    if window[0] < 0 and window[1] < 0:
        return None
    n = math.prod(grid)
    return band_mask(range(n), range(n), window, device)


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: Window | None = None,
    *,
    chunk: int = 2048,
) -> torch.Tensor:
    """Exact softmax attention by `F.scaled_dot_product_attention` (any device and dtype).

    Args:
        q: (B, Lq, N, Dh); k, v: (B, Lk, N, Dh), all in one dtype.
        window: optional local window (left, right) in tokens (self-attention, Lq == Lk); -1 is
            unbounded on that side. Computed in query chunks of `chunk` tokens against only the
            keys their window reaches, so no (L, L) mask is ever built: memory grows with
            chunk x (chunk + left + right), not L^2.
    Returns:
        (B, Lq, N, Dh).
    """
    q, k, v = (rearrange(t, "b l n d -> b n l d") for t in (q, k, v))
    if window is None:
        out = F.scaled_dot_product_attention(q, k, v)  # (B, N, Lq, Dh)
        return rearrange(out, "b n l d -> b l n d")
    left, right = window
    n = q.shape[2]
    outs = []
    for start in range(0, n, chunk):
        queries = range(start, min(start + chunk, n))
        k0 = 0 if left < 0 else max(0, queries.start - left)
        k1 = n if right < 0 else min(n, queries.stop - 1 + right + 1)
        mask = band_mask(queries, range(k0, k1), window, q.device)  # (Lc, Kc)
        outs.append(
            F.scaled_dot_product_attention(
                q[:, :, queries.start : queries.stop],
                k[:, :, k0:k1],
                v[:, :, k0:k1],
                attn_mask=mask,
            )
        )  # (B, N, Lc, Dh)
    return rearrange(torch.cat(outs, dim=2), "b n l d -> b l n d")


def flash_attention(q, k, v, window: Window | None = None) -> torch.Tensor:
    """flash-attn 2 (`flash_attn_func`), its native `window_size` for a local window."""
    from flash_attn import flash_attn_func

    return flash_attn_func(q, k, v, window_size=window or (-1, -1))  # (B, Lq, N, Dh)


def sage_attention(q, k, v, window: Window | None = None) -> torch.Tensor:
    """SageAttention (`sageattn`): int8 Q.K^T with smoothing, fp16 P.V (approximate); no window."""
    from sageattention import sageattn

    return sageattn(q, k, v, tensor_layout="NHD", is_causal=False)  # (B, Lq, N, Dh)


@dataclass(frozen=True, kw_only=True)
class AttentionBackend:
    """One attention implementation and what it can honour."""

    name: str
    """The key users pass (`--attention NAME`)."""
    fn: Callable[..., torch.Tensor]
    """(q, k, v, window) -> out, all (B, L, N, Dh); window is None or (left, right)."""
    package: str | None = None
    """Module that must be importable (None: always available)."""
    install: str = ""
    """How to install the package, for the error."""
    cuda_only: bool = False
    """Runs on CUDA tensors only."""
    dtypes: tuple[torch.dtype, ...] | None = None
    """Input dtypes it computes exactly as asked (None: any)."""
    head_dims: Callable[[int], bool] | None = None
    """Which head widths it takes (None: any)."""
    head_dims_text: str = ""
    """The accepted head widths in words, for the error."""
    supports_window: bool = True
    """Honours a local window (else a windowed expert is refused)."""

    def problems(
        self,
        *,
        device: torch.device,
        dtype: torch.dtype,
        head_dim: int | None = None,
        window: Window | None = None,
        check_package: bool = True,
    ) -> list[str]:
        """What stops this backend from running these inputs ([] when it can)."""
        found = []
        if check_package and self.package and importlib.util.find_spec(self.package) is None:
            found.append(f"the {self.package} package is not installed ({self.install})")
        if self.cuda_only and torch.device(device).type != "cuda":
            found.append(f"it runs on CUDA only, and the device is {torch.device(device)}")
        if self.dtypes is not None and dtype not in self.dtypes:
            names = " or ".join(str(d).removeprefix("torch.") for d in self.dtypes)
            found.append(
                f"it needs {names} inputs, and they are {str(dtype).removeprefix('torch.')}"
            )
        if head_dim is not None and self.head_dims is not None and not self.head_dims(head_dim):
            found.append(f"it takes head widths {self.head_dims_text}, and this one is {head_dim}")
        if window is not None and not self.supports_window:
            found.append(f"it cannot honour the local window {window} of a windowed expert")
        return found


ATTENTION_BACKENDS: dict[str, AttentionBackend] = {
    b.name: b
    for b in (
        AttentionBackend(name="sdpa", fn=sdpa_attention),
        AttentionBackend(
            name="flash",
            fn=flash_attention,
            package="flash_attn",
            cuda_only=True,
            dtypes=HALF,
            install="pip install 'vidmoe[flash]', CUDA only",
            head_dims=lambda d: d <= 256,
            head_dims_text="up to 256",
        ),
        AttentionBackend(
            name="sage",
            fn=sage_attention,
            package="sageattention",
            cuda_only=True,
            dtypes=HALF,
            install="pip install 'vidmoe[sage]', CUDA only",
            head_dims=lambda d: d in (64, 96, 128),
            head_dims_text="64, 96 or 128",
            supports_window=False,
        ),
    )
}
"""Attention backends by name; `register_backend` adds one."""
ATTENTION_CHOICES = ("auto", *ATTENTION_BACKENDS)
"""What `--attention` accepts (the built-in backends and auto)."""


def register_backend(backend: AttentionBackend) -> None:
    """Make `backend` selectable by its name (a new kernel, or a reference in a test)."""
    if backend.name == "auto":
        raise ValueError("'auto' is the automatic choice, not a backend name: pick another name")
    ATTENTION_BACKENDS[backend.name] = backend


def resolve_backend(
    name: str,
    *,
    device: torch.device | str,
    dtype: torch.dtype,
    head_dim: int | None = None,
    window: Window | None = None,
) -> str:
    """The backend that runs these inputs: `name` if it can, a ValueError saying why not if not.

    'auto' is flash on CUDA in float16/bfloat16 when flash-attn is installed and can honour the
    head width, else sdpa (so on the CPU it is always sdpa, bit-identical to before backends).
    """
    if name == "auto":
        flash = ATTENTION_BACKENDS.get("flash")
        if flash and not flash.problems(
            device=torch.device(device), dtype=dtype, head_dim=head_dim, window=window
        ):
            return "flash"
        return "sdpa"
    if name not in ATTENTION_BACKENDS:
        raise ValueError(
            f"attention must be one of {', '.join(['auto', *ATTENTION_BACKENDS])}; got {name!r}"
        )
    found = ATTENTION_BACKENDS[name].problems(
        device=torch.device(device), dtype=dtype, head_dim=head_dim, window=window
    )
    if found:
        raise ValueError(
            f"attention backend {name!r} cannot run here: "
            + "; ".join(found)
            + ". Use attention 'sdpa' (runs everywhere) or 'auto'"
        )
    return name


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: Window | None = None,
    *,
    backend: str = "sdpa",
    chunk: int = 2048,
) -> torch.Tensor:
    """Exact softmax attention (1/sqrt(Dh) scale, no mask but the window) by a named backend.

    Args:
        q: (B, Lq, N, Dh); k, v: (B, Lk, N, Dh); q and k are cast to v's dtype.
        window: optional local window (left, right) in tokens (self-attention, Lq == Lk); -1 is
            unbounded on that side; (-1, -1) or None is global attention.
        backend: a key of ATTENTION_BACKENDS ('sdpa' computes windows in chunks of `chunk`
            queries, see `sdpa_attention`).
    Returns:
        (B, Lq, N, Dh) in v's dtype.
    """
    q, k = q.to(v.dtype), k.to(v.dtype)
    if window is not None and window[0] < 0 and window[1] < 0:
        window = None
    if backend == "sdpa":
        return sdpa_attention(q, k, v, window, chunk=chunk)
    impl = ATTENTION_BACKENDS[backend]
    found = impl.problems(
        device=v.device, dtype=v.dtype, head_dim=v.shape[-1], window=window, check_package=False
    )
    if found:
        raise ValueError(
            f"attention backend {backend!r} cannot run these inputs: " + "; ".join(found)
        )
    return impl.fn(q, k, v, window)  # (B, Lq, N, Dh)
