"""Windowed attention in query chunks equals attention under the dense (L, L) window mask."""

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from vidmoe.models.layers import attention, window_mask


def dense(q, k, v, mask):
    q, k, v = (rearrange(t, "b l n d -> b n l d") for t in (q, k, v))
    return rearrange(F.scaled_dot_product_attention(q, k, v, attn_mask=mask), "b n l d -> b l n d")


@pytest.mark.parametrize("window", [(0, 0), (3, 5), (7, -1), (-1, 2), (40, 40), (-1, -1)])
@pytest.mark.parametrize("chunk", [1, 4, 9, 64])
def test_chunked_window_equals_dense_mask(window, chunk):
    g = torch.Generator().manual_seed(0)
    grid = (3, 2, 5)  # 30 tokens
    q, k, v = (torch.randn(2, 30, 3, 8, generator=g, dtype=torch.float64) for _ in range(3))
    got = attention(q, k, v, window, chunk=chunk)
    want = dense(q, k, v, window_mask(grid, window))
    assert got.shape == (2, 30, 3, 8)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_each_chunk_sees_only_the_keys_its_window_reaches():
    # a key far outside every query's window changes nothing; one inside changes its neighbours
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 50, 2, 4, generator=g) for _ in range(3))
    base = attention(q, k, v, (2, 2), chunk=8)
    v2 = v.clone()
    v2[:, 30] += 10.0
    moved = (attention(q, k, v2, (2, 2), chunk=8) - base).abs().amax(dim=(0, 2, 3)) > 0  # (50,)
    assert moved.nonzero().flatten().tolist() == [28, 29, 30, 31, 32]
