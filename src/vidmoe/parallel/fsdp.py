"""Inference weights sharded with FSDP2 (`fully_shard`): each rank of a mesh holds 1/P of an
expert's (or the text encoder's) weights and all-gathers one block at a time as it runs.

Every transformer block is one FSDP unit and the module itself the root unit (its embeddings
and head), so at most the root, the running block and the prefetched next block are whole on a
rank at once. `load_sharded_expert` builds an expert on the meta device, shards it, and fills
each rank's rows tensor by tensor from the checkpoint, so no rank ever holds the whole expert.
`shard_pipeline` shards a loaded pipeline's experts (and text encoder) in place.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

SHARDABLE_RESIDENCY = ("resident",)


@dataclass(frozen=True, kw_only=True)
class Sharding:
    """What `load_pipeline(..., shard=...)` shards with FSDP2, and over which ranks."""

    text_encoder: bool = False
    """Shard the text encoder's blocks too (umT5-XXL is 11 GB in bf16)."""
    group: object | None = None
    """The process group of the ranks that run the same experts (a `Groups.expert_group`);
    None: every rank of the world."""


def shard_mesh(device: torch.device, group=None) -> DeviceMesh:
    """A 1-D device mesh over `group` (None: the whole world) on `device`'s type."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        raise ValueError(
            "sharded weights need a process group: launch with `torchrun --nproc-per-node N "
            "-m vidmoe ...` (N >= 2)"
        )
    if group is None:
        return init_device_mesh(device.type, (dist.get_world_size(),))
    return DeviceMesh.from_group(group, device.type)


def shard_blocks(
    module: nn.Module,
    blocks: Iterable[nn.Module],
    mesh: DeviceMesh,
    *,
    mp_policy=None,
    reshard_after_forward: bool = True,
    root_reshard_after_forward: bool | None = None,
    prefetch: bool = True,
) -> nn.Module:
    """`fully_shard` each of `blocks`, then `module` (the root: every weight outside the blocks).

    Args:
        module: the whole network; becomes an `FSDPModule` in place (and is returned).
        blocks: its repeated layers, in the order the forward runs them.
        mesh: the ranks that share the weights (1-D).
        mp_policy: a `MixedPrecisionPolicy` (training), or None: compute in the stored dtype.
        reshard_after_forward: free each block's gathered weights after it ran.
        root_reshard_after_forward: the same for the root (None: as the blocks); training keeps
            the root gathered, since its backward needs it again at once.
        prefetch: each block starts the all-gather of the next before it runs.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs = dict(
        mesh=mesh,
        reshard_after_forward=reshard_after_forward,
        mp_policy=mp_policy or MixedPrecisionPolicy(),
    )
    blocks = list(blocks)
    for block in blocks:
        fully_shard(block, **kwargs)
    if root_reshard_after_forward is not None:
        kwargs["reshard_after_forward"] = root_reshard_after_forward
    fully_shard(module, **kwargs)
    if prefetch:
        for block, following in zip(blocks, blocks[1:]):
            block.set_modules_to_forward_prefetch([following])
    return module


def bf16_policy():
    """Mixed precision for training: gathered weights compute in bf16, gradients reduce in fp32
    (the sharded master weights and the optimiser state stay fp32)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def shard_expert(expert: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """Shard one expert (a `WanTransformer`): one unit per block, the rest in the root."""
    blocks = getattr(expert, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or not len(blocks):
        raise ValueError(
            f"--shard-experts shards transformer blocks, but the expert ({type(expert).__name__}) "
            "has no `blocks` list"
        )
    return shard_blocks(expert, blocks, mesh)


def encoder_blocks(network: nn.Module) -> nn.ModuleList:
    """The repeated layers of a transformers text encoder: umT5 (`encoder.block`) or BERT/MiniLM
    (`encoder.layer`)."""
    encoder = getattr(network, "encoder", None)
    for name in ("block", "layer"):
        blocks = getattr(encoder, name, None)
        if isinstance(blocks, nn.ModuleList) and len(blocks):
            return blocks
    raise ValueError(
        f"--shard-text-encoder shards the encoder's layers, but {type(network).__name__} has no "
        "`encoder.block` (umT5) or `encoder.layer` (BERT) list"
    )


def shard_text_encoder(text_encoder, mesh: DeviceMesh):
    """Shard an `HFTextEncoder`'s network in place (umT5 blocks or MiniLM layers)."""
    network = getattr(text_encoder, "model", None)
    if not isinstance(network, nn.Module):
        raise ValueError(
            f"--shard-text-encoder needs a transformers encoder; got {type(text_encoder).__name__}"
        )
    shard_blocks(network, encoder_blocks(network), mesh)
    return text_encoder


def local_numel(module: nn.Module) -> int:
    """Parameter elements this rank holds (its shards; a plain parameter counts whole)."""
    from torch.distributed.tensor import DTensor

    return sum(
        p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in module.parameters()
    )


def load_sharded_expert(
    config,
    tensors,
    mesh: DeviceMesh,
    *,
    device: torch.device,
    dtype: torch.dtype,
    strict: bool = True,
) -> nn.Module:
    """An expert built on meta, sharded over `mesh`, and filled with this rank's rows of each
    checkpoint tensor: a rank holds its shard plus one checkpoint tensor at a time.

    Args:
        config: the expert's `TransformerConfig`.
        tensors: a `TensorSource` under release names (`Layout.expert_tensors(name)`).
    """
    from torch.distributed.tensor import DTensor, Shard

    from vidmoe.io.checkpoints import check_names_and_shapes
    from vidmoe.io.tensors import FP8Source
    from vidmoe.models.transformer import WanTransformer

    with torch.device("meta"):
        expert = WanTransformer(config).to(dtype)
    shard_expert(expert, mesh)
    expert.to_empty(device=device)
    source = FP8Source(tensors)  # fp8 files load dequantised, as `load_expert` does
    targets = expert.state_dict(keep_vars=True)
    check_names_and_shapes(targets, source, strict=strict, into="the sharded expert")
    with torch.no_grad():
        for name, target in targets.items():
            if name not in source:
                continue
            if isinstance(target, DTensor) and tuple(target.placements) == (Shard(0),):
                local = target.to_local()  # (rows of this rank, ...)
                start, stop = _row_range(target.shape[0], mesh)
                assert stop - start == local.shape[0], (name, start, stop, local.shape)
                local.copy_(source.rows(name, start, stop))  # only these rows are read
            else:
                target.copy_(source[name])
    return expert.eval().requires_grad_(False)


def _row_range(num_rows: int, mesh: DeviceMesh) -> tuple[int, int]:
    """This rank's rows of a dim-0 shard: `torch.chunk`'s split, as FSDP2 cuts (the last ranks
    may get fewer rows, or none)."""
    per = -(-num_rows // mesh.size())  # ceil
    start = min(mesh.get_local_rank() * per, num_rows)
    return start, min(start + per, num_rows)


def shard_pipeline(pipe, mesh: DeviceMesh, *, text_encoder: bool = False):
    """Shard `pipe`'s experts (and its text encoder) over `mesh` in place; returns `pipe`.

    Refuses residency policies other than resident (a sharded expert stays where its shards
    are) and loaded LoRA adapters (they would wrap layers FSDP2 already manages)."""
    check_shardable(residency=pipe.residency)
    if pipe.adapters.records:
        raise ValueError(
            "--shard-experts cannot shard experts that carry LoRA adapters (FSDP2 would manage "
            "the adapters' layers too): merge the LoRA into a checkpoint first, or run unsharded"
        )
    for expert in pipe.experts.values():
        if not _is_sharded(expert):
            shard_expert(expert, mesh)
    if text_encoder:
        if pipe.text_encoder is None:
            raise ValueError("--shard-text-encoder: this pipeline has no text encoder")
        if not _is_sharded(getattr(pipe.text_encoder, "model", None)):
            shard_text_encoder(pipe.text_encoder, mesh)
    pipe.source["shard"] = {
        "experts": "fsdp2",
        "ranks": mesh.size(),
        "text_encoder": "fsdp2" if text_encoder else "whole",
    }
    return pipe


def load_sharded_pipeline(
    model,
    placement,
    shard: Sharding,
    *,
    strict: bool = True,
    files: dict | None = None,
):
    """`load_pipeline(..., shard=...)`: a checkpoint folder's experts are loaded shard by shard
    (`load_sharded_expert`); a preset, or components from separate files, are built whole on
    each rank first and sharded after. The VAE stays whole on every rank."""
    from pathlib import Path

    from vidmoe.io.checkpoints import detect_layout, load_vae
    from vidmoe.loading import _default_model, _place_text_encoder, build_random_pipeline
    from vidmoe.models.moe import Experts
    from vidmoe.models.text_encoder import build_text_encoder
    from vidmoe.presets import PRESETS
    from vidmoe.sampling.pipeline import Pipeline

    check_shardable(residency=placement.residency)
    mesh = shard_mesh(placement.device, shard.group)
    if files:
        from vidmoe.loading import load_pipeline_from_files

        pipe = load_pipeline_from_files(
            model, device=placement.device, dtype=placement.dtype, strict=strict, **files
        )
        return shard_pipeline(pipe, mesh, text_encoder=shard.text_encoder)
    model = _default_model(model)
    if isinstance(model, str) and model in PRESETS:
        pipe = build_random_pipeline(
            model,
            device=placement.device,
            dtype=placement.dtype,
            text_encoder_device=placement.text_encoder_device,
        )
        return shard_pipeline(pipe, mesh, text_encoder=shard.text_encoder)
    layout = detect_layout(Path(model))
    if layout.vae is None:
        raise ValueError(
            f"{model} is a {layout.kind} file with one expert and no VAE or text encoder; use a "
            "full checkpoint folder"
        )
    experts = {
        name: load_sharded_expert(
            layout.config.transformer_for(name),
            layout.expert_tensors(name),
            mesh,
            device=placement.device,
            dtype=placement.dtype,
            strict=strict,
        )
        for name in layout.experts
    }
    vae = load_vae(layout, device=placement.device, dtype=torch.float32, strict=strict)
    kind = layout.config.text_encoder
    text = build_text_encoder(
        kind,
        layout.root if kind == "umt5-xxl" else layout.text_encoder,
        device=placement.text_encoder_device or placement.device,
        max_length=layout.config.transformer.text_len,
    )
    _place_text_encoder(text, placement)
    pipe = Pipeline(
        layout.config, Experts(experts, layout.config.moe, placement=placement), vae, text
    )
    pipe.source = {"path": str(model), "layout": layout.kind}
    return shard_pipeline(pipe, mesh, text_encoder=shard.text_encoder)


def check_shardable(*, residency: str, quantize: str | None = None, compile: bool = False) -> None:
    """ValueError unless the options can run with sharded experts."""
    if residency not in SHARDABLE_RESIDENCY:
        raise ValueError(
            f"--shard-experts keeps each rank's shard of every expert on its device and gathers "
            f"one block at a time, which replaces residency; got --residency {residency}: use "
            "--residency resident (the default) with --shard-experts, or drop --shard-experts"
        )
    if quantize is not None:
        raise ValueError(
            f"--shard-experts shards bf16/fp16/fp32 weights; got --quantize {quantize}: "
            "drop --quantize or --shard-experts"
        )
    if compile:
        raise ValueError("--compile with --shard-experts is not supported; drop one of them")


def _is_sharded(module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)
