"""Experts and the text encoder sharded with FSDP2 on 2 gloo processes give the single-process
latents, each rank holding half of the weights; the options that cannot shard are refused."""

import json

import pytest
import torch

from tests.parallel.spawn import run_ranks
from vidmoe.loading import build_random_pipeline, load_pipeline
from vidmoe.parallel.fsdp import Sharding, check_shardable, shard_mesh

GEN = dict(num_steps=3, seed=1, output="latents")


def _sharded_preset_and_cli(rank, size, cli_args):
    import os

    from typer.testing import CliRunner

    from vidmoe.cli import app
    from vidmoe.parallel.fsdp import local_numel, shard_mesh, shard_pipeline

    pipe = build_random_pipeline("tiny-t2v")
    whole = {n: e.num_params() for n, e in pipe.experts.items()}
    whole["text"] = sum(p.numel() for p in pipe.text_encoder.model.parameters())
    shard_pipeline(pipe, shard_mesh(torch.device("cpu")), text_encoder=True)
    local = {n: local_numel(e) for n, e in pipe.experts.items()}
    local["text"] = local_numel(pipe.text_encoder.model)
    latents = pipe.generate("a red circle", **GEN).latents
    try:
        pipe.load_lora("adapter.safetensors")  # refused before the file is looked at
        lora_error = ""
    except ValueError as e:
        lora_error = str(e)
    # the same world runs the CLI next (one spawn for both: starting processes is the cost)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank))
    r = CliRunner().invoke(app, cli_args)
    return {
        "latents": latents,
        "whole": whole,
        "local": local,
        "source": pipe.source["shard"],
        "cli": (r.exit_code, r.output),
        "lora": lora_error,
    }


def test_sharded_experts_and_text_encoder_match_one_process(tmp_path):
    """API and CLI on one 2-rank world: bit-identical latents and video, half the weights held
    per rank, rank 0 alone writing."""
    from typer.testing import CliRunner

    from vidmoe.cli import app
    from vidmoe.io.video import read_video

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank runs: the decode's sums then have the same order
    try:
        ref = build_random_pipeline("tiny-t2v").generate("a red circle", **GEN).latents
        args = ["generate", "a red circle", "-m", "tiny-t2v", "-s", "2", "--device", "cpu"]
        one, out = tmp_path / "one.mp4", tmp_path / "sharded.mp4"
        r = CliRunner().invoke(app, [*args, "-o", str(one), "--quiet"])
    finally:
        torch.set_num_threads(threads)
    assert r.exit_code == 0, r.output
    sharded = [*args, "-o", str(out), "--shard-experts", "--shard-text-encoder"]
    got = run_ranks(_sharded_preset_and_cli, 2, tmp_path / "ranks", sharded)
    for rank in got:
        assert torch.equal(rank["latents"], ref)  # bit-identical: the same math, gathered
        assert rank["source"] == {"experts": "fsdp2", "ranks": 2, "text_encoder": "fsdp2"}
        assert "LoRA adapters cannot attach to experts sharded" in rank["lora"]
    for name, whole in got[0]["whole"].items():
        held = [rank["local"][name] for rank in got]
        assert sum(held) == whole  # the shards partition the weights
        assert max(held) <= 0.55 * whole  # each rank about half (row counts round up)
    (code0, said0), (code1, said1) = (rank["cli"] for rank in got)
    assert (code0, code1) == (0, 0), said0 + said1
    assert f"wrote {out}" in said0 and said1 == ""  # rank 0 alone speaks and writes
    assert (read_video(out)[0] == read_video(one)[0]).all()
    record = json.loads((tmp_path / "sharded.mp4.json").read_text())
    assert record["model"]["shard"] == {"experts": "fsdp2", "ranks": 2, "text_encoder": "fsdp2"}


def _sharded_folder(rank, size, root):
    from vidmoe.parallel.fsdp import local_numel

    pipe = load_pipeline(root, device="cpu", dtype="float32", shard=Sharding())
    latents = pipe.generate("a red circle", **GEN).latents
    return {"latents": latents, "local": local_numel(pipe.experts["low_noise"])}


def test_checkpoint_folder_loads_shard_by_shard(tmp_path):
    from tests.checkpoints import tiny_pipeline_weights
    from vidmoe.io.writers import write_vidmoe_layout

    config, experts, vae = tiny_pipeline_weights()
    root = write_vidmoe_layout(tmp_path / "model", config=config, experts=experts, vae=vae)
    ref = load_pipeline(root, device="cpu", dtype="float32")
    want = ref.generate("a red circle", **GEN).latents
    whole = ref.experts["low_noise"].num_params()
    got = run_ranks(_sharded_folder, 2, tmp_path / "ranks", root)
    for rank in got:
        torch.testing.assert_close(rank["latents"], want, rtol=1e-4, atol=1e-6)
    assert sum(rank["local"] for rank in got) == whole


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(residency="swap"), "replaces residency; got --residency swap"),
        (dict(residency="blocks"), "use --residency resident"),
        (dict(residency="resident", quantize="fp8"), "got --quantize fp8"),
        (dict(residency="resident", compile=True), "--compile with --shard-experts"),
    ],
)
def test_options_that_cannot_shard_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        check_shardable(**kwargs)
    with pytest.raises(ValueError, match=message):  # load_pipeline refuses before loading
        load_pipeline("tiny-t2v", device="cpu", shard=Sharding(), **kwargs)


def test_sharding_without_a_process_group_says_how_to_launch():
    with pytest.raises(ValueError, match="torchrun --nproc-per-node N"):
        shard_mesh(torch.device("cpu"))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--shard-experts"], "this is one: launch with `torchrun --nproc-per-node 2"),
        (["--shard-text-encoder"], "add --shard-experts"),
    ],
)
def test_generate_shard_flags_refused_outside_torchrun(tmp_path, flags, message):
    from typer.testing import CliRunner

    from vidmoe.cli import app

    r = CliRunner().invoke(
        app, ["generate", "x", "-m", "tiny-t2v", "-o", str(tmp_path / "a.mp4"), *flags]
    )
    assert r.exit_code == 2 and message in " ".join(r.output.split()), r.output
    assert not (tmp_path / "a.mp4").exists()
