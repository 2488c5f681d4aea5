"""Batches over 4 gloo processes in every layout: lines dealt out over replicas of one rank, of
ulysses 2 (sharded), of cfg 2 and of 2 expert groups (high-noise expert on one group, low-noise
on the other; each group one rank, or 2 splitting each request), and the CLI over them; each
prompt is published once, with the single-process result."""

import json

import pytest
import torch

from tests.parallel.spawn import run_ranks
from tests.parallel.tiny import tiny_pipeline
from vidmoe.batch import generate_batch, read_jobs
from vidmoe.parallel.pipelined import check_pipelined, generate_pipelined, make_stage, phase_ranges
from vidmoe.parallel.transport import recv_message, send_message
from vidmoe.parallel.world import Groups, Layout, World
from vidmoe.presets import get_preset
from vidmoe.sampling.conditioning import Conditioning
from vidmoe.sampling.plan import solver_for
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


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def _hashes(out):
    return {
        p.name: json.loads(p.read_text())["video"]["sha256"] for p in sorted(out.glob("*.json"))
    }


def _odd() -> dict:
    """A message of every kind of tensor (the same in every process)."""
    return {
        "bf16": (torch.arange(6.0).reshape(3, 2) / 7).bfloat16(),
        "flags": torch.tensor([True, False]),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(7),
        "rest": [1, "a", None, (2.5,)],
    }


def _layouts(rank, size, path, out, cli_args):
    """One 4-rank world runs every batch layout in turn (starting processes is the cost)."""
    import os

    from typer.testing import CliRunner

    from vidmoe.cli import app
    from vidmoe.parallel.fsdp import shard_mesh, shard_pipeline

    world = World(rank=rank, size=size, local_rank=rank)
    jobs = read_jobs(path, SMALL)
    got = {}

    def keep(name):
        got[name] = {"latents": {}}
        return lambda job, result: got[name]["latents"].update({job.index: result.latents})

    # 4 replicas of one rank (no Groups): whole videos per rank
    got["split"] = {
        "reports": (generate_batch(tiny_pipeline(), jobs, out / "split", world=world), None)
    }
    # one replica of 2 expert groups x ulysses 2: each group's 2 ranks split every request
    stage = make_stage(tiny_pipeline(), Groups(Layout(expert_groups=2, ulysses=2), world))
    report = generate_pipelined(stage, jobs, out / "groups", on_result=keep("groups"))
    got["groups"]["reports"] = report, None
    # 2 replicas of 2 one-rank expert groups: each replica its half, a restart skips all
    stage = make_stage(tiny_pipeline(), Groups(Layout(expert_groups=2).filling(world), world))
    report = generate_pipelined(stage, jobs, out / "copies", on_result=keep("copies"))
    got["copies"]["reports"] = report, generate_pipelined(stage, jobs, out / "copies")
    held = (list(stage.pipe.experts), stage.pipe.text_encoder is not None, stage.pipe.vae)
    got["held"] = held[:2] + (held[2] is not None,)
    cpu = torch.device("cpu")
    if rank in (0, 1):  # tensors of every kind, point to point
        got["message"] = send_message(_odd(), 1, cpu).wait() if rank == 0 else recv_message(0, cpu)
    # 2 replicas x ulysses 2, every expert sharded over the replica's 2 ranks
    groups = Groups(Layout(ulysses=2).filling(world), world)
    pipe = shard_pipeline(tiny_pipeline(), shard_mesh(cpu, groups.expert_group))
    pipe.set_parallel(groups)
    report = generate_batch(pipe, jobs, out / "sharded", groups=groups, on_result=keep("sharded"))
    again = generate_batch(pipe, jobs, out / "sharded", groups=groups)
    got["sharded"]["reports"] = report, again
    # 2 replicas x cfg 2: cond and uncond on the two ranks of each replica
    groups = Groups(Layout(cfg=2).filling(world), world)
    pipe = tiny_pipeline()
    pipe.set_parallel(groups)
    report = generate_batch(pipe, jobs, out / "cfg", groups=groups, on_result=keep("cfg"))
    got["cfg"]["reports"] = report, None
    # last, the CLI (it leaves the process group when it ends)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank))
    r = CliRunner().invoke(app, cli_args)
    got["cli"] = r.exit_code, r.output
    return got


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    """The 4 ranks' results of `_layouts` (one spawn for every test below) and its folder."""
    tmp_path = tmp_path_factory.mktemp("four")
    text = tmp_path / "p.txt"
    text.write_text("a red circle\na blue star\n")
    cli = ["generate", "--prompts", str(text), "-m", "tiny-t2v", "-W", "32", "-H", "32"]
    cli += ["-f", "5", "-s", "2", "--device", "cpu", "-q", "-o"]
    par = cli + [str(tmp_path / "cli"), "--expert-groups", "2", "--ulysses", "2"]
    par += ["--shard-experts", "--shard-text-encoder"]
    got = run_ranks(_layouts, 4, tmp_path / "spawn", _prompts(tmp_path), tmp_path, par)
    return got, tmp_path, cli


EXPECTED = {  # statuses, and the rank that published each prompt
    "split": (["done"] * 4, [0, 1, 2, 3]),  # one process blends two experts in a band
    "groups": (["done", "done", "failed", "done"], [2] * 4),  # the last group's first rank
    "copies": (["done", "done", "failed", "done"], [1, 3, 1, 3]),  # job % 2 -> replica
    "sharded": (["done"] * 4, [0, 2, 0, 2]),  # each replica's first rank
    "cfg": (["done"] * 4, [0, 2, 0, 2]),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_each_prompt_is_published_once_by_its_replica_with_the_single_process_result(
    four, reference, name
):
    got, tmp_path, _ = four
    statuses, ranks = EXPECTED[name]
    report, again = got[0][name]["reports"]
    assert all(g[name]["reports"] == (report, again) for g in got)  # every rank has the report
    assert [o.status for o in report.outcomes] == statuses
    done = [o for o in report.outcomes if o.status == "done"]
    assert [o.rank for o in done] == [r for r, s in zip(ranks, statuses) if s == "done"]
    if name in ("groups", "copies"):
        assert "blends high_noise and low_noise" in report.outcomes[2].error
    if again is not None:  # a restart: the finished ones skipped, the bad line still bad
        assert [o.status for o in again.outcomes] == [
            "failed" if s == "failed" else "skipped" for s in statuses
        ]
    lines = (tmp_path / name / "batch.jsonl").read_text().splitlines()
    assert [json.loads(line)["status"] for line in lines] == [
        o.status for o in (again or report).outcomes
    ]
    records = sorted((tmp_path / name).glob("*.mp4.json"))
    assert len(records) == len(done)
    parallel = json.loads(records[0].read_text())["parallel"]
    replicas = {"groups": 1, "split": 4}.get(name, 2)
    assert parallel["world_size"] == 4 and parallel["replicas"] == replicas
    torch.set_num_threads(1)
    jobs = read_jobs(tmp_path / "prompts.jsonl", SMALL)
    if name == "split":  # whole videos, the very single-process bytes
        single = generate_batch(reference, jobs, tmp_path / "single")
        assert _hashes(tmp_path / "split") == _hashes(tmp_path / "single")
        assert [o.status for o in single.outcomes] == statuses
        return
    published = {}  # each prompt's latents, from the one rank that published it
    for g in got:
        assert not published.keys() & g[name]["latents"].keys()
        published |= g[name]["latents"]
    assert sorted(published) == [o.index for o in done]
    for index, latents in published.items():
        single = reference.generate(jobs[index].settings, output="latents").latents
        if name == "copies":  # one rank per group: the same math, bit for bit
            assert torch.equal(latents, single)
        assert _rel(latents, single) < 1e-4, index
    if name == "sharded":
        record = json.loads(records[0].read_text())
        assert record["model"]["shard"]["ranks"] == 2  # a replica's ranks, not the world's


def _record(path):
    return json.loads(path.read_text())


def test_groups_hold_their_parts_and_tensors_of_every_kind_travel(four):
    got, _, _ = four
    assert got[0]["held"] == (["high_noise"], True, False)  # the text encoder, no VAE
    assert got[1]["held"] == (["low_noise"], False, True)  # the VAE, no text encoder
    got, sent = got[1]["message"], _odd()
    assert got["rest"] == [1, "a", None, (2.5,)]
    for key in ("bf16", "flags", "empty", "scalar"):
        assert got[key].dtype == sent[key].dtype and torch.equal(got[key], sent[key])


def test_cli_batch_of_two_groups_of_ulysses_two_sharded(four):
    """`vidmoe generate --prompts` on 4 ranks, 2 expert groups x ulysses 2, sharded: rank 0
    alone speaks, each video once, records with the layout, the single-process videos."""
    from typer.testing import CliRunner

    from vidmoe.cli import app
    from vidmoe.io.video import read_video

    got, tmp_path, cli = four
    assert [g["cli"][0] for g in got] == [0] * 4, [g["cli"][1] for g in got]
    assert "batch: 2 done, 0 skipped, 0 failed" in got[0]["cli"][1]
    assert all(g["cli"][1] == "" for g in got[1:])  # rank 0 alone speaks
    videos = ["0000-a-red-circle.mp4", "0001-a-blue-star.mp4"]
    assert sorted(p.name for p in (tmp_path / "cli").iterdir()) == sorted(
        ["batch.jsonl", *videos, *(v + ".json" for v in videos)]
    )
    record = _record(tmp_path / "cli" / "0001-a-blue-star.mp4.json")
    want = {"ulysses": 2, "cfg": 1, "expert_groups": 2, "replicas": 1, "world_size": 4}
    assert record["parallel"] == want
    assert record["model"]["shard"] == {"experts": "fsdp2", "ranks": 2, "text_encoder": "fsdp2"}
    r = CliRunner().invoke(app, cli + [str(tmp_path / "one")])
    assert r.exit_code == 0, r.output
    for name in videos:
        a, b = read_video(tmp_path / "one" / name)[0], read_video(tmp_path / "cli" / name)[0]
        # the same latents to ~1e-7; h264 can turn a one-level change into tens nearby
        assert a.shape == b.shape and abs(a.astype(float) - b.astype(float)).mean() < 0.5
