"""Batches over several gloo processes: lines split across ranks, and expert-pipelined groups
(high-noise expert on one rank, low-noise on the other) give the single-process results."""

import json

import pytest
import torch

from tests.parallel.spawn import run_ranks
from tests.parallel.tiny import tiny_pipeline
from vidmoe.batch import generate_batch, read_jobs
from vidmoe.config import get_preset
from vidmoe.parallel.pipelined import check_pipelined, generate_pipelined, make_stage, phase_ranges
from vidmoe.parallel.transport import recv_message, send_message
from vidmoe.parallel.world import Groups, Layout, World
from vidmoe.sampling.conditioning import Conditioning
from vidmoe.sampling.pipeline import solver_for
from vidmoe.sampling.settings import GenerateSettings

SMALL = GenerateSettings(width=32, height=32, num_frames=5, num_steps=4, boundary="steps:2")
LINES = [
    '{"prompt": "a red circle", "seed": 1}',
    '{"prompt": "a blue star", "seed": 2, "sampler": "dpm++", "name": "star"}',
    '{"prompt": "banded", "band": 0.1, "boundary": 0.5, "shift": 1.0, "num_steps": 6}',
    # shift 12 puts every step above sigma 0.5: the low-noise group runs none, only decodes
    '{"prompt": "a green triangle", "seed": 3, "sampler": "euler", "boundary": 0.5}',
]


@pytest.fixture(scope="module")
def reference():
    """Single-process latents and video hashes of LINES, on one thread like the ranks."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pipe = tiny_pipeline()
        yield pipe
    finally:
        torch.set_num_threads(threads)


def _prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(LINES) + "\n")
    return path


def _split(rank, size, path, out):
    pipe = tiny_pipeline()
    world = World(rank=rank, size=size, local_rank=rank)
    return generate_batch(pipe, read_jobs(path, SMALL), out, world=world)


def _hashes(out):
    return {
        p.name: json.loads(p.read_text())["video"]["sha256"] for p in sorted(out.glob("*.json"))
    }


def test_lines_split_across_two_ranks_give_the_single_process_videos(reference, tmp_path):
    path = _prompts(tmp_path)
    reports = run_ranks(_split, 2, tmp_path / "spawn", path, tmp_path / "ranks")
    assert reports[0] == reports[1]  # every rank returns the whole report
    assert [(o.status, o.rank) for o in reports[0].outcomes] == [
        ("done", 0),
        ("done", 1),
        ("done", 0),  # one process blends two experts in a transition band
        ("done", 1),
    ]
    torch.set_num_threads(1)
    single = generate_batch(reference, read_jobs(path, SMALL), tmp_path / "single")
    assert [o.status for o in single.outcomes] == [o.status for o in reports[0].outcomes]
    assert _hashes(tmp_path / "ranks") == _hashes(tmp_path / "single")
    assert len(_hashes(tmp_path / "single")) == 4


def _pipelined(rank, size, path, out):
    groups = Groups(Layout(expert_groups=2), World(rank=rank, size=size, local_rank=rank))
    stage = make_stage(tiny_pipeline(), groups)
    latents = {}
    report = generate_pipelined(
        stage,
        read_jobs(path, SMALL),
        out,
        on_result=lambda job, result: latents.update({job.index: result.latents}),
    )
    again = generate_pipelined(stage, read_jobs(path, SMALL), out)  # a restart
    cpu = torch.device("cpu")
    odd = {
        "bf16": torch.randn(3, 2).bfloat16(),
        "flags": torch.tensor([True, False]),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(7),
        "rest": [1, "a", None, (2.5,)],
    }
    if rank == 0:
        send_message(odd, 1, cpu).wait()
    else:
        odd = recv_message(0, cpu)
    held = (list(stage.pipe.experts), stage.pipe.text_encoder is not None, stage.pipe.vae)
    return {
        "reports": (report, again),
        "latents": latents,
        "held": held[:2] + (held[2] is not None,),
        "message": odd,
    }


def test_expert_pipelined_groups_give_each_prompt_the_single_process_latents(reference, tmp_path):
    path = _prompts(tmp_path)
    first, second = run_ranks(_pipelined, 2, tmp_path / "spawn", path, tmp_path / "out")
    assert first["held"] == (["high_noise"], True, False)  # the text encoder, no VAE
    assert second["held"] == (["low_noise"], False, True)  # the VAE, no text encoder
    report, again = first["reports"]
    assert [o.status for o in report.outcomes] == ["done", "done", "failed", "done"]
    assert "blends high_noise and low_noise" in report.outcomes[2].error
    assert [o.status for o in again.outcomes] == ["skipped", "skipped", "failed", "skipped"]
    assert first["latents"] == {} and sorted(second["latents"]) == [0, 1, 3]
    sent, got = first["message"], second["message"]
    assert got["rest"] == [1, "a", None, (2.5,)]
    for key in ("bf16", "flags", "empty", "scalar"):
        assert got[key].dtype == sent[key].dtype and torch.equal(got[key], sent[key])
    torch.set_num_threads(1)
    jobs = read_jobs(path, SMALL)
    for index, latents in second["latents"].items():
        expected = reference.generate(jobs[index].settings, output="latents").latents
        assert torch.equal(latents, expected)  # bit-identical


def test_denoise_in_slices_is_the_whole_run():
    """Pipeline._denoise over steps [0, 2) then [2, 4) with the solver carried on gives the
    whole run's latents (what each expert group does)."""
    pipe = tiny_pipeline()
    rs = pipe.resolve(SMALL)
    plan = pipe.plan(rs)
    cond, uncond = pipe._embeddings(rs, None, None)
    noise = pipe._initial_latents(rs, None)
    args = (plan, rs.sampler, cond, uncond, Conditioning(), False, None, {})
    whole, _ = pipe._denoise(noise, *args)
    solver = solver_for(plan, rs.sampler)
    half, first = pipe._denoise(noise, *args, steps=range(0, 2), solver=solver)
    x, second = pipe._denoise(half, *args, steps=range(2, 4), solver=solver)
    assert torch.equal(x, whole)
    assert [r["index"] for r in first + second] == [0, 1, 2, 3]
    assert phase_ranges(plan) == {"high_noise": range(0, 2), "low_noise": range(2, 4)}


def test_pipelined_refusals():
    tiny = get_preset("tiny-t2v")
    with pytest.raises(ValueError, match="has 2 experts .* needs 2 groups; got 3"):
        check_pipelined(tiny, 3)
    with pytest.raises(ValueError, match="tiny-i2v is a i2v model"):
        check_pipelined(get_preset("tiny-i2v"), 2)
    plan = tiny_pipeline().plan(GenerateSettings(num_steps=6, band=0.1, boundary=0.5, shift=1.0))
    with pytest.raises(ValueError, match="transition band"):
        phase_ranges(plan)
