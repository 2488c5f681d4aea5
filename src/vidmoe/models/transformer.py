"""One expert of the MoE: the Wan-style video diffusion transformer.

patchify -> text/time embeddings -> blocks (self-attn with 3D RoPE, cross-attn, FFN, six-way
time modulation) -> modulated head -> unpatchify. Batched over (B, C, F, H, W); parameter names
equal the released checkpoints', so their weights load without a key map.

Shape legend: B batch, C channels, F/H/W latent frames/height/width, f/h/w token grid,
L = f*h*w video tokens, S text tokens (text_len), D width, N heads, Dh head width.
"""

from __future__ import annotations

import math
import warnings

import torch
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from vidmoe.config import TransformerConfig
from vidmoe.models.attention import resolve_backend
from vidmoe.models.layers import (
    LayerNorm,
    Linear,
    Modulation,
    PatchEmbedding,
    RMSNorm,
    apply_rope,
    attention,
    rope_angles,
    sinusoidal_embedding,
)
from vidmoe.models.text_cache import Cached, cache_allowed, weights_key
from vidmoe.parallel.ulysses import SequenceParallel, TokenShard, check_heads


class SelfAttention(nn.Module):
    """Multi-head self-attention with q/k RMSNorm and 3D rotary embeddings."""

    attention_backend: str = "sdpa"
    """A key of ATTENTION_BACKENDS (models/attention.py); set by `WanTransformer.set_attention`."""
    sequence_shard: TokenShard | None = None
    """Ulysses: this rank's share of the sequence, set by `WanTransformer.forward` (None: all)."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.q, self.k = Linear(cfg.dim, cfg.dim), Linear(cfg.dim, cfg.dim)
        self.v, self.o = Linear(cfg.dim, cfg.dim), Linear(cfg.dim, cfg.dim)
        self.norm_q = RMSNorm(cfg.dim, cfg.eps) if cfg.qk_norm else nn.Identity()
        self.norm_k = RMSNorm(cfg.dim, cfg.eps) if cfg.qk_norm else nn.Identity()

    def forward(self, x, rope, window):
        heads = dict(n=self.num_heads)
        q = rearrange(self.norm_q(self.q(x)), "b l (n d) -> b l n d", **heads)  # (B, L, N, Dh)
        k = rearrange(self.norm_k(self.k(x)), "b l (n d) -> b l n d", **heads)  # (B, L, N, Dh)
        v = rearrange(self.v(x), "b l (n d) -> b l n d", **heads)  # (B, L, N, Dh)
        q, k = apply_rope(q, rope), apply_rope(k, rope)  # (B, L, N, Dh) fp32
        shard = self.sequence_shard
        if shard is not None:  # Ulysses: all heads of L/P tokens -> N/P heads of all L tokens
            q, k, v = shard.heads_to_sequence(q.to(v.dtype), k.to(v.dtype), v)  # (B, L, N/P, Dh)
        out = attention(q, k, v, window, backend=self.attention_backend)  # (B, L, N, Dh)
        if shard is not None:
            out = shard.sequence_to_heads(out)  # (B, L/P, N, Dh)
        return self.o(rearrange(out, "b l n d -> b l (n d)"))  # (B, L, D)


class CrossAttention(SelfAttention):
    """Attention from video tokens to text tokens (no RoPE, no mask); same projections."""

    text_kv_cache: Cached | None = None
    """k and v of the last embedded context (CPU inference only; models/text_cache.py)."""

    def forward(self, x, context):
        heads = dict(n=self.num_heads)
        q = rearrange(self.norm_q(self.q(x)), "b l (n d) -> b l n d", **heads)  # (B, L, N, Dh)
        k, v = self.text_kv(context)  # (B, S, N, Dh) each
        # parity: zero-padded text tokens are attended without a mask
        out = attention(q, k, v, backend=self.attention_backend)  # (B, L, N, Dh)
        return self.o(rearrange(out, "b l n d -> b l (n d)"))  # (B, L, D)

    def text_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the embedded text (B, S, D) -> 2 x (B, S, N, Dh). On the CPU they
        are kept for the next call with the same context tensor (the expert serves one embedded
        tensor per prompt); on a GPU they are a small share of a step and would hold
        num_layers x 2 x B x S x D of device memory, so they are recomputed."""
        heads = dict(n=self.num_heads)
        if not (cache_allowed() and context.device.type == "cpu"):
            # the cache is not read here: a compiled block must not guard on it
            k = rearrange(self.norm_k(self.k(context)), "b s (n d) -> b s n d", **heads)
            return k, rearrange(self.v(context), "b s (n d) -> b s n d", **heads)
        key = weights_key(self.k, self.v, self.norm_k)
        hit = self.text_kv_cache
        if hit is not None and hit.serves(context, key, same_object=True):
            return hit.value
        k = rearrange(self.norm_k(self.k(context)), "b s (n d) -> b s n d", **heads)
        v = rearrange(self.v(context), "b s (n d) -> b s n d", **heads)
        self.text_kv_cache = (
            None
            if key is None
            else Cached(source=context, version=context._version, key=key, value=(k, v))
        )
        return k, v


class Block(nn.Module):
    """Self-attention, cross-attention and FFN, modulated by the timestep embedding."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.norm1 = LayerNorm(cfg.dim, cfg.eps)
        self.self_attn = SelfAttention(cfg)
        # `norm3` is the cross-attention norm (the release's name)
        self.norm3 = (
            LayerNorm(cfg.dim, cfg.eps, elementwise_affine=True)
            if cfg.cross_attn_norm
            else nn.Identity()
        )
        self.cross_attn = CrossAttention(cfg)
        self.norm2 = LayerNorm(cfg.dim, cfg.eps)
        self.ffn = nn.Sequential(
            Linear(cfg.dim, cfg.ffn_dim),
            nn.GELU(approximate="tanh"),
            Linear(cfg.ffn_dim, cfg.dim),
        )
        self.modulation = nn.Parameter(torch.randn(1, 6, cfg.dim) / cfg.dim**0.5)

    def forward(self, x, e, context, rope, window):
        """x: (B, L, D) fp32 residual stream; e: (B, L|1, 6, D) fp32 time projection."""
        dtype = getattr(self.ffn[0], "compute_dtype", self.ffn[0].weight.dtype)  # fp8: its own
        m = (self.modulation.float() + e).unbind(dim=2)  # 6 x (B, L|1, D)
        attn_mod, ffn_mod = Modulation(m[0], m[1], m[2]), Modulation(m[3], m[4], m[5])
        y = self.self_attn(attn_mod.apply(self.norm1(x)).to(dtype), rope, window)  # (B, L, D)
        x = attn_mod.gated(x, y.float())
        x = x + self.cross_attn(self.norm3(x).to(dtype), context).float()  # (B, L, D)
        y = self.ffn(ffn_mod.apply(self.norm2(x)).to(dtype))  # (B, L, D)
        return ffn_mod.gated(x, y.float())


class Head(nn.Module):
    """Final modulated norm and projection to patch pixels."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.norm = LayerNorm(cfg.dim, cfg.eps)
        self.head = Linear(cfg.dim, math.prod(cfg.patch_size) * cfg.out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x, e):
        """x: (B, L, D) fp32; e: (B, L|1, D) fp32 time embedding (before the projection)."""
        shift, scale = (self.modulation.float() + e[:, :, None]).unbind(dim=2)  # 2 x (B, L|1, D)
        y = Modulation(shift, scale).apply(self.norm(x))  # (B, L, D)
        return self.head(y.to(self.head.weight.dtype)).float()  # (B, L, p*q*r*C_out)


def pooled_tokens(context: torch.Tensor) -> torch.Tensor:
    """Mean of the prompt's token embeddings, the zero padding left out: (B, S, D) -> (B, D)."""
    real = (context != 0).any(dim=-1, keepdim=True).to(context.dtype)  # (B, S, 1)
    return (context * real).sum(dim=1) / real.sum(dim=1).clamp(min=1)  # (B, D)


def warn_if_head_too_narrow(cfg: TransformerConfig, name: str) -> None:
    """Warn when a token's outputs (patch volume x channels) outnumber the width.

    The head is linear from `dim` features to those outputs, so it reaches only a `dim`-wide
    subspace of them: the starting noise outside it is never removed while sampling, and the
    expert sees that noise at every step, far more than its noise level says. Measured on the
    demo's v2 experts (width 192, 256 outputs per token): their clips were speckled blobs.
    """
    outputs = math.prod(cfg.patch_size) * cfg.out_dim
    if cfg.dim < outputs:
        warnings.warn(
            f"expert {name!r}: width {cfg.dim} is below the {outputs} values each token outputs "
            f"(patch {list(cfg.patch_size)} x {cfg.out_dim} channels); the head cannot remove "
            f"{outputs - cfg.dim} of them from the noise. Use dim >= {outputs} or a smaller patch.",
            stacklevel=3,
        )


class WanTransformer(nn.Module):
    """One expert: the Wan2.x diffusion transformer (t2v, i2v and ti2v in one class)."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.config = cfg
        self.use_checkpointing = False
        self.sequence_parallel: SequenceParallel | None = None
        d = cfg.dim
        self.patch_embedding = PatchEmbedding(
            cfg.in_dim, d, kernel_size=cfg.patch_size, stride=cfg.patch_size
        )
        self.text_embedding = nn.Sequential(
            Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"), Linear(d, d)
        )
        self.time_embedding = nn.Sequential(Linear(cfg.freq_dim, d), nn.SiLU(), Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), Linear(d, 6 * d))
        if cfg.pooled_text:
            self.text_pool = nn.Sequential(Linear(cfg.text_dim, d), nn.SiLU(), Linear(d, d))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    def init_weights(self) -> None:
        """Xavier linears, small normal embeddings, zero output projection (the release's init)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        for seq in (self.text_embedding, self.time_embedding):
            for m in seq.modules():
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.head.head.weight)
        if self.config.pooled_text:  # starts as the model without it
            nn.init.normal_(self.text_pool[0].weight, std=0.02)
            nn.init.zeros_(self.text_pool[2].weight)

    def pad_context(self, context: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """Zero-pad prompt embeddings [(S_i, text_dim)] to (B, text_len, text_dim)."""
        cfg = self.config
        if isinstance(context, torch.Tensor):
            context = list(context) if context.dim() == 3 else [context]
        out = context[0].new_zeros(len(context), cfg.text_len, cfg.text_dim)
        for i, c in enumerate(context):
            if c.dim() != 2 or c.shape[1] != cfg.text_dim:
                raise ValueError(
                    f"text embedding {i} must be (tokens, {cfg.text_dim}); got {tuple(c.shape)}"
                )
            if c.shape[0] > cfg.text_len:
                raise ValueError(
                    f"text embedding {i} has {c.shape[0]} tokens; the model takes at most {cfg.text_len}"
                )
            out[i, : c.shape[0]] = c
        return out

    def forward(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        context,
        y: torch.Tensor | None = None,
        *,
        cache=None,
    ) -> torch.Tensor:
        """Predict the flow velocity.

        Args:
            x: (B, C_in, F, H, W) noisy latents (C_in excludes the i2v condition channels).
            sigma: noise level in [0, 1]: (B,) per sample, or (B, L) per token (ti2v).
            context: (B, S<=text_len, text_dim) tensor or list of (S_i, text_dim) embeddings.
            y: (B, C_y, F, H, W) i2v condition (mask + image latents), concatenated on channels.
            cache: a `StepCache` that may serve the blocks after the first from an earlier step.
        Returns:
            (B, C_out, F, H, W) velocity in float32.
        """
        cfg = self.config
        if y is not None:
            x = torch.cat([x, y.to(x.dtype)], dim=1)  # (B, C_in, F, H, W)
        if x.shape[1] != cfg.in_dim:
            raise ValueError(
                f"expert expects {cfg.in_dim} input channels (latents + condition); got {x.shape[1]}"
            )
        dtype = self.patch_embedding.weight.dtype
        x = self.patch_embedding(x.to(dtype))  # (B, D, f, h, w)
        grid = tuple(x.shape[2:])
        x = rearrange(x, "b d f h w -> b (f h w) d").float()  # (B, L, D)
        sp = self.sequence_parallel
        shard = None if sp is None else sp.shard(x.shape[1])
        if shard is not None:  # Ulysses: this rank keeps its L/P tokens until after the head
            x = shard.split(x)  # (B, L/P, D)

        # parity: the release embeds timestep = 1000 * sigma
        timestep = sigma.to(x.device, torch.float64) * 1000
        if timestep.dim() == 1:
            timestep = timestep[:, None]  # (B, 1): one timestep shared by all tokens
        elif shard is not None:
            timestep = shard.split(timestep)  # (B, L/P): per-token sigma, sharded with the tokens
        t_emb = sinusoidal_embedding(timestep, cfg.freq_dim)  # (B, L|1, freq_dim)
        e = self.time_embedding(t_emb.to(dtype)).float()  # (B, L|1, D)
        if not isinstance(context, torch.Tensor) or context.shape[1] != cfg.text_len:
            context = self.pad_context(context)  # (B, S, text_dim)
        if cfg.pooled_text:
            e = e + self.text_pool(pooled_tokens(context).to(dtype)).float()[:, None]  # (B, L|1, D)
        e6 = rearrange(self.time_projection(e.to(dtype)).float(), "b l (six d) -> b l six d", six=6)

        context = self.embed_text(context)  # (B, S, D)

        angles = rope_angles(grid, cfg.head_dim, device=x.device)  # (L, Dh/2)
        rope = torch.polar(torch.ones_like(angles), angles).to(torch.complex64)  # (L, Dh/2)
        window = None if cfg.window_size == (-1, -1) else cfg.window_size
        if shard is not None:
            rope = shard.split(rope, dim=0)  # (L/P, Dh/2): each token keeps its true position
        for block in self.blocks:
            block.self_attn.sequence_shard = shard
        if cache is not None:
            tokens = None if shard is None else shard.num_real  # the metric skips the padding
            x = cache.run(self.blocks, x, e6, context, rope, window, tokens=tokens)  # (B, L, D)
        elif self.use_checkpointing and self.training:
            for block in self.blocks:
                x = checkpoint(block, x, e6, context, rope, window, use_reentrant=False)
        else:
            for block in self.blocks:
                x = block(x, e6, context, rope, window)  # (B, L, D)
        x = self.head(x, e)  # (B, L, p*q*r*C_out)
        if shard is not None:
            x = shard.gather(x)  # (B, L, p*q*r*C_out): every rank's tokens, padding dropped
        (p, q, r), (f, h, w) = cfg.patch_size, grid
        return rearrange(
            x, "b (f h w) (p q r c) -> b c (f p) (h q) (w r)", f=f, h=h, w=w, p=p, q=q, r=r
        )  # (B, C_out, F, H, W)

    def set_sequence_parallel(self, group) -> None:
        """Split every forward's tokens over the ranks of `group` (Ulysses: see
        vidmoe.parallel.ulysses); None runs the whole sequence here again. Every rank of the group
        must run the same forwards. A ValueError if the heads do not divide by the group size."""
        if group is None:
            self.sequence_parallel = None
            return
        sp = SequenceParallel.of(group)
        check_heads(self.config.num_heads, sp.size)
        self.sequence_parallel = sp

    text_cache: Cached | None = None
    """The last prompt's embedding (models/text_cache.py)."""

    def embed_text(self, context: torch.Tensor) -> torch.Tensor:
        """(B, S, text_dim) padded prompts -> (B, S, D); at inference the last result is served
        again for an equal context while the weights are unchanged."""
        key = weights_key(self.text_embedding) if cache_allowed() else None
        hit = self.text_cache
        if hit is not None and hit.serves(context, key, same_object=False):
            return hit.value[0]
        dtype = self.patch_embedding.weight.dtype
        # parity: the zero padding is embedded too (the bias makes it non-zero)
        out = self.text_embedding(context.to(dtype))  # (B, S, D)
        self.text_cache = (
            None
            if key is None
            else Cached(source=context, version=context._version, key=key, value=(out,))
        )
        return out

    def set_attention(self, backend: str, *, device: torch.device | str) -> str:
        """Run every attention of this expert with `backend` ('auto' picks; see
        `resolve_backend`), checked against the expert's dtype, head width and window on
        `device` (a ValueError says what the backend cannot honour). Returns the backend chosen.
        """
        v = self.blocks[0].self_attn.v if len(self.blocks) else None
        dtype = (
            getattr(v, "compute_dtype", None) or self.patch_embedding.weight.dtype
        )  # fp8: its own
        window = None if self.config.window_size == (-1, -1) else self.config.window_size
        name = resolve_backend(
            backend, device=device, dtype=dtype, head_dim=self.config.head_dim, window=window
        )
        for m in self.modules():
            if isinstance(m, SelfAttention):  # CrossAttention too
                m.attention_backend = name
        return name

    def compile_blocks(self) -> None:
        """Regional torch.compile: each `Block` compiled in place (`nn.Module.compile`), the rest
        eager. The blocks share one code object, so one compilation serves every block of every
        expert of the same shape (a new shape, dtype or window compiles once more)."""
        for block in self.blocks:
            block.compile(dynamic=False)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
