"""Residency policies: every policy gives the video `resident` gives (bit-exact on the CPU), from
a preset and from a checkpoint on disk, and each moves what it should, in the order it should."""

import pytest
import torch

from vidmoe.io.writers import write_vidmoe_layout
from vidmoe.loading import build_random_pipeline, load_pipeline
from vidmoe.models.moe import RESIDENCY, Experts, Placement, hollow, is_hollow
from vidmoe.presets import get_preset

POLICIES = ("swap", "disk", "blocks")
RUN = dict(num_steps=4, seed=3, width=32, height=32, num_frames=5)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The tiny-t2v model written in vidmoe's layout."""
    pipe = build_random_pipeline("tiny-t2v", seed=5)
    root = tmp_path_factory.mktemp("tiny") / "model"
    experts = {n: e.state_dict() for n, e in pipe.experts.items()}
    write_vidmoe_layout(root, config=pipe.config, experts=experts, vae=pipe.vae.state_dict())
    return root


@pytest.fixture(scope="module")
def resident_video(checkpoint):
    return load_pipeline(checkpoint, device="cpu").generate("a red circle", **RUN)


@pytest.mark.parametrize("residency", POLICIES)
def test_each_policy_gives_the_resident_video_from_a_checkpoint(
    checkpoint, resident_video, residency
):
    pipe = load_pipeline(checkpoint, device="cpu", residency=residency)
    assert pipe.residency == residency
    out = pipe.generate("a red circle", **RUN)
    assert torch.equal(out.latents, resident_video.latents)
    assert (out.frames == resident_video.frames).all()
    again = pipe.generate("a red circle", **RUN)  # the second run starts from the last expert
    assert torch.equal(again.latents, resident_video.latents)


@pytest.mark.parametrize("residency", ("swap", "blocks"))
def test_each_policy_gives_the_resident_video_from_a_preset(residency):
    ref = load_pipeline("tiny-t2v", device="cpu").generate("x", output="latents", **RUN)
    pipe = load_pipeline("tiny-t2v", device="cpu", residency=residency)
    assert torch.equal(pipe.generate("x", output="latents", **RUN).latents, ref.latents)


def test_disk_is_refused_for_experts_with_no_file():
    with pytest.raises(
        ValueError,
        match="residency 'disk' re-reads each expert from its file.*use residency 'swap'",
    ):
        load_pipeline("tiny-t2v", device="cpu", residency="disk")
    pipe = build_random_pipeline("tiny-t2v")
    with pytest.raises(ValueError, match=r"experts \['high_noise', 'low_noise'\] were built"):
        Experts(dict(pipe.experts.items()), pipe.config.moe, placement=Placement(residency="disk"))


def test_disk_holds_one_expert_and_reads_each_when_its_phase_comes(checkpoint):
    pipe = load_pipeline(checkpoint, device="cpu", residency="disk")
    experts = pipe.experts
    assert all(is_hollow(e) for e in experts.values())  # nothing held after loading
    counts = experts.param_counts()  # shapes survive the release
    assert counts == load_pipeline(checkpoint, device="cpu").experts.param_counts()
    pipe.generate("x", output="latents", **RUN)
    assert experts.policy.log == [
        ("high_noise", "read"),
        ("high_noise", "release"),
        ("low_noise", "read"),
        ("low_noise", "release"),
    ]
    assert all(is_hollow(e) for e in experts.values())  # released for the decode
    assert experts.on_device() == ()
    assert experts.activate("low_noise") is experts["low_noise"]
    assert is_hollow(experts["high_noise"]) and not is_hollow(experts["low_noise"])
    assert experts.on_device() == ("low_noise",)


def test_swap_prefetches_the_next_expert_one_step_before_its_first_step():
    pipe = load_pipeline("tiny-t2v", device="cpu", residency="swap")
    steps = []
    result = pipe.generate(
        "x",
        output="latents",
        callback=lambda i, n, e: steps.append(list(pipe.experts.policy.log)),
        **RUN,
    )
    first_low = next(r["index"] for r in result.trace if r["experts"] == ["low_noise"])
    assert first_low >= 1
    before = steps[first_low - 1]  # the log after the step before the switch
    assert before[-1] == ("low_noise", "prefetch") and ("low_noise", "upload") not in before
    assert steps[first_low][-2:] == [("high_noise", "evict"), ("low_noise", "upload")]
    assert pipe.experts.policy.log[-1] == ("low_noise", "evict")  # to host RAM for the decode
    assert pipe.experts.on_device() == ()


def test_blocks_stream_one_block_ahead_and_leave_none_behind():
    pipe = load_pipeline("tiny-t2v", device="cpu", residency="blocks")
    expert = pipe.experts.activate("high_noise")
    num = len(expert.blocks)
    policy = pipe.experts.policy
    policy.log.clear()
    x = torch.randn(1, 16, 2, 4, 4)
    ctx = [torch.randn(3, pipe.config.transformer.text_dim)]
    expert(x, torch.tensor([0.5]), ctx)
    expected = []
    for i in range(num):
        expected.append((f"high_noise.blocks.{i}", "upload"))
        if i + 1 < num:
            expected.append((f"high_noise.blocks.{i + 1}", "prefetch"))
        expected.append((f"high_noise.blocks.{i}", "evict"))
    assert policy.log == expected
    assert all(c.versions is None and c.pending is None for c in policy.blocks["high_noise"])


def _fuse_one(expert):
    from vidmoe.models import lora

    w = expert.blocks[0].self_attn.q.weight
    lora.add_adapter(
        expert,
        "a",
        {
            "blocks.0.self_attn.q": lora.AdapterWeights(
                down=torch.ones(1, w.shape[1]), up=torch.ones(w.shape[0], 1)
            )
        },
    )
    lora.fuse(expert)
    return expert.blocks[0].self_attn.q.weight.detach().clone()


def test_a_fused_lora_survives_swap_but_disk_refuses_to_drop_it(checkpoint):
    swap = load_pipeline(checkpoint, device="cpu", residency="swap").experts
    fused = _fuse_one(swap.activate("high_noise"))
    swap.activate("low_noise")
    assert torch.equal(swap.activate("high_noise").blocks[0].self_attn.q.weight, fused)
    disk = load_pipeline(checkpoint, device="cpu", residency="disk").experts
    _fuse_one(disk.activate("high_noise"))
    with pytest.raises(ValueError, match="fused LoRA weights, which residency 'disk' cannot"):
        disk.activate("low_noise")


def test_hollow_keeps_shapes_and_dtypes_but_no_storage():
    pipe = build_random_pipeline("tiny-t2v")
    expert = pipe.experts["high_noise"]
    shapes = {k: (v.shape, v.dtype) for k, v in expert.state_dict().items()}
    hollow(expert)
    assert is_hollow(expert)
    assert {k: (v.shape, v.dtype) for k, v in expert.state_dict().items()} == shapes
    assert all(v.untyped_storage().nbytes() <= 8 for v in expert.state_dict().values())


def test_the_text_encoder_runs_where_the_placement_says_and_offload_follows_the_policy():
    assert set(RESIDENCY) == {"resident", "swap", "disk", "blocks"}
    pipe = load_pipeline("tiny-t2v", device="cpu", text_encoder_device="cpu")
    assert pipe.experts.placement.text_encoder_device == torch.device("cpu")
    assert pipe.experts.rest_device == torch.device("cpu")
    meta = Experts(
        dict(pipe.experts.items()), get_preset("tiny-t2v").moe, placement=Placement(device="meta")
    )
    assert meta.rest_device == torch.device("meta")  # resident: the VAE stays on the device
    swap = Placement(device="meta", residency="swap")
    layer = torch.nn.Linear(2, 2)
    experts = Experts(
        {n: torch.nn.Linear(2, 2) for n in ("high_noise", "low_noise")},
        get_preset("tiny-t2v").moe,
        placement=swap,
    )
    assert experts.rest_device == torch.device("cpu")
    with experts.lend(layer, torch.device("cpu")):
        assert layer.weight.device == torch.device("cpu")
