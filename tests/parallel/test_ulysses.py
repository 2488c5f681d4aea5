"""Ulysses sequence parallelism and CFG parallelism on real gloo CPU processes give the
single-process latents (fp32, within 1e-4 relative): t2v, a sequence that needs padding, a
windowed expert, ti2v's per-token sigma, the step cache, guidance 1; and the refusals."""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from tests.parallel.spawn import run_ranks
from vidmoe.config import ModelConfig
from vidmoe.models.step_cache import StepCache
from vidmoe.models.transformer import WanTransformer
from vidmoe.models.vae import WanVAE
from vidmoe.parallel.ulysses import TokenShard, check_heads
from vidmoe.parallel.world import Groups, Layout, World
from vidmoe.presets import PRESETS, get_preset

WINDOWED = dataclasses.replace(
    PRESETS["tiny-t2v"],
    name="tiny-t2v-windowed",
    expert_overrides={"low_noise": {"window_size": (5, 3)}},
)
STEPS = dict(num_steps=4, seed=7, output="latents")


def _image(folder) -> str:
    rng = np.random.default_rng(0)
    path = f"{folder}/first.png"
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    return path


def _runs(folder) -> dict:
    """name -> (model, generate kwargs): each case on one pipeline, every rank alike."""
    return {
        "t2v": ("tiny-t2v", dict(prompt="a red circle")),
        # 48x48: a 3x3x3 token grid, 27 tokens over 2 or 4 ranks needs padding
        "padded": ("tiny-t2v", dict(prompt="a cat", width=48, height=48)),
        "windowed": (WINDOWED, dict(prompt="a cat", width=48, height=48, boundary=0.6)),
        "ti2v": ("tiny-ti2v", dict(prompt="a dog", image=_image(folder))),
        "cached": ("tiny-t2v", dict(prompt="a cat", num_steps=8, step_cache=0.3)),
        "guidance_one": ("tiny-t2v", dict(prompt="a cat", guidance=1.0)),
    }


def _pipeline(config: ModelConfig | str):
    """A seeded random pipeline without a text encoder (no `transformers` import: each spawned
    process starts faster); prompts come as embeddings."""
    from vidmoe.sampling.pipeline import Pipeline

    config = get_preset(config) if isinstance(config, str) else config
    torch.manual_seed(0)
    experts = {}
    for name in config.moe.expert_names:
        experts[name] = WanTransformer(config.transformer_for(name))
        torch.nn.init.normal_(experts[name].head.head.weight, std=0.02)  # not the zero init
    return Pipeline(config, experts, WanVAE(config.vae), None)


def _generate(pipe, kwargs) -> dict:
    g = torch.Generator().manual_seed(len(kwargs["prompt"]))
    text_dim = pipe.config.transformer.text_dim
    embeds = dict(
        prompt_embeds=torch.randn(5, text_dim, generator=g),
        negative_prompt_embeds=torch.randn(3, text_dim, generator=g),
    )
    r = pipe.generate(**{**STEPS, **embeds, **kwargs})
    return {"latents": r.latents, "cached": [row.get("cached", []) for row in r.trace]}


def _single(folder, names) -> dict:
    pipes, out = {}, {}
    for name, (model, kwargs) in _runs(folder).items():
        if name in names:
            key = model if isinstance(model, str) else model.name
            if key not in pipes:
                pipes[key] = _pipeline(model)
            out[name] = _generate(pipes[key], kwargs)
    return out


def _parallel(rank, size, layouts, names, folder):
    """Every named case under every layout, on this rank."""
    world = World(rank=rank, size=size, local_rank=rank)
    out = {}
    for layout in layouts:
        groups = Groups(layout, world)
        for name, (model, kwargs) in _runs(folder).items():
            if name in names:
                pipe = _pipeline(model)
                pipe.set_parallel(groups)
                out[(layout.ulysses, layout.cfg, name)] = _generate(pipe, kwargs)
    return out


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


CASES = ("t2v", "padded", "windowed", "ti2v", "cached", "guidance_one")


@pytest.mark.parametrize("size", [2, 4])
def test_parallel_layouts_give_the_single_process_latents(tmp_path, size):
    layouts = (
        [Layout(ulysses=2), Layout(cfg=2)]
        if size == 2
        else [Layout(ulysses=2, cfg=2), Layout(ulysses=4)]
    )
    names = CASES if size == 2 else ("t2v", "padded", "cached")
    got = run_ranks(_parallel, size, tmp_path, layouts, names, str(tmp_path))
    want = _single(str(tmp_path), names)
    for key, value in got[0].items():
        ref = want[key[2]]
        assert _close(value["latents"], ref["latents"]) < 1e-4, key
        assert value["cached"] == ref["cached"], key  # the same steps skipped
        for other in got[1:]:  # every rank holds the same latents
            assert torch.equal(other[key]["latents"], value["latents"]), key
    assert any(want["cached"]["cached"])  # the cached case does skip steps


def test_token_shard_splits_pads_and_counts():
    shard = TokenShard(group=None, rank=1, size=4, num_tokens=27)
    last = dataclasses.replace(shard, rank=3)
    assert (shard.local, shard.padded, shard.num_real, last.num_real) == (7, 28, 7, 6)
    t = torch.arange(27.0)[None, :, None]  # (1, L, 1)
    assert shard.split(t).flatten().tolist() == list(range(7, 14))
    assert last.split(t).flatten().tolist() == [21, 22, 23, 24, 25, 26, 0]
    rope = torch.arange(27.0)[:, None]  # (L, 1): split on dim 0
    assert last.split(rope, dim=0).flatten().tolist() == [21, 22, 23, 24, 25, 26, 0]


def test_heads_must_divide_by_the_ulysses_size():
    check_heads(4, 2)
    with pytest.raises(ValueError, match="has 4 heads, not divisible by 3: use --ulysses 1, 2, 4"):
        check_heads(4, 3)


def test_a_sharded_step_cache_without_reduce_is_refused():
    cache = StepCache(threshold=0.1)
    with pytest.raises(ValueError, match="needs `reduce`"):
        cache.run([torch.nn.Identity()], torch.zeros(1, 4, 2), tokens=3)
