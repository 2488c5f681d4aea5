"""Expert-pipelined generation: each expert on its own group of ranks, requests flowing through.

With K experts there are K expert groups; group g holds only expert g (noisiest first), never
another and never swapping. The text encoder lives on group 0, the VAE on the last group. A
request runs its first expert's steps on group 0; the latents, the solver's history (multistep
samplers keep x0 predictions) and the text embeddings then go to group 1 point to point, and so
on; the last group decodes and publishes. A group starts the next request as soon as it has sent
one on, so with a stream of requests every group is busy.

A group may hold several ranks that split each request (Ulysses, CFG); a rank of group g talks
to the rank with the same (cfg, ulysses) place in groups g - 1 and g + 1 of its replica. With
several replicas (whole copies of the groups) a batch's jobs are dealt out over them. Every rank
reads the same jobs and plans them the same way, so no schedule is exchanged.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from vidmoe.batch import (
    BatchReport,
    Job,
    Replica,
    check_jobs,
    finish_batch,
    layout_record,
    outcome,
    pending,
    progress_bar,
    run_record,
)
from vidmoe.config import ModelConfig
from vidmoe.parallel.transport import Outgoing, recv_message, send_message
from vidmoe.parallel.world import Groups, Layout, World
from vidmoe.sampling.conditioning import Conditioning
from vidmoe.sampling.pipeline import GenerationResult, Pipeline
from vidmoe.sampling.plan import Plan, solver_for


@dataclass(frozen=True, kw_only=True)
class Stage:
    """This rank's part of an expert pipeline."""

    pipe: Pipeline
    """Holds only `expert`; the text encoder on group 0, the VAE on the last group."""
    groups: Groups
    expert: str

    @property
    def group(self) -> int:
        return self.groups.place.expert_group

    @property
    def num_groups(self) -> int:
        return self.groups.layout.expert_groups

    def peer(self, group: int) -> int:
        """The rank in `group` (of this replica) with this rank's (cfg, ulysses) place."""
        p = self.groups.place
        return self.groups.layout.rank_of(group, p.cfg_rank, p.ulysses_rank, p.replica)

    @property
    def writer(self) -> int:
        """The one rank that publishes this replica's videos: its last group's first rank."""
        p = self.groups.place
        return self.groups.layout.rank_of(self.num_groups - 1, 0, 0, p.replica)


def check_pipelined(config: ModelConfig, expert_groups: int) -> None:
    """ValueError unless `config`'s model can run as `expert_groups` expert groups."""
    names = config.moe.expert_names
    if expert_groups != len(names):
        raise ValueError(
            f"--expert-groups puts one expert on each group: {config.name} has {len(names)} "
            f"experts ({', '.join(names)}), so it needs {len(names)} groups; got "
            f"{expert_groups}: use --expert-groups {len(names)}, or 1 to split the prompts "
            "across ranks instead"
        )
    if config.transformer.model_type != "t2v":
        raise ValueError(
            f"expert-pipelined groups run text-to-video models; {config.name} is a "
            f"{config.transformer.model_type} model (its image conditioning needs the VAE on "
            "the first group): run it without --expert-groups"
        )


def phase_ranges(plan: Plan) -> dict[str, range]:
    """The steps each expert runs: one run of consecutive steps per expert, noisiest first.

    Raises ValueError for a plan whose steps blend two experts (a transition band): a group
    holds one expert, so no step can need two."""
    for st in plan.steps:
        if len(st.experts) != 1:
            raise ValueError(
                f"step {st.index} (sigma {st.sigma:.4f}) blends {' and '.join(st.experts)} in a "
                "transition band; expert-pipelined groups run one expert per step: use band 0, "
                "or run without --expert-groups"
            )
    ranges, start = {}, 0
    for name in plan.expert_names:
        stop = start
        while stop < len(plan.steps) and plan.steps[stop].experts == (name,):
            stop += 1
        ranges[name], start = range(start, stop), stop
    assert start == len(plan.steps), "the router gives each expert one run, noisiest first"
    return ranges


def generate_pipelined(
    stage: Stage,
    jobs: list[Job],
    out_dir: str | Path,
    *,
    progress: bool = False,
    recipe: str | None = None,
    log=None,
    on_result=None,
) -> BatchReport:
    """Run a batch through the expert groups (call on every rank): each replica runs the jobs
    dealt to it (index % replicas), and its writer (`Stage.writer`) publishes them.

    Args:
        log: called on rank 0 with each bad line (line number and reason) before any work.
        on_result: called on the writer as on_result(job, GenerationResult) before publishing.
    Returns:
        The `BatchReport` of every job (on every rank); rank 0 writes OUT_DIR/batch.jsonl.
    """
    world, out_dir = stage.groups.world, Path(out_dir)
    replica = Replica.of(world, stage.groups, writer=stage.writer)
    checked = []
    for job, rs, error in check_jobs(jobs, stage.pipe.resolve):
        plan = None
        if rs is not None:
            try:
                plan = stage.pipe.plan(rs)
                phase_ranges(plan)
            except ValueError as e:
                rs, error = None, str(e)
        checked.append((job, rs, plan, error))
    if log is not None and world.is_main:
        for job, _, _, error in checked:
            if error:
                log(f"line {job.line}: {error}")
    mine = [c for c in checked if replica.owns(c[0])]
    outcomes, todo = pending(
        replica, world, [(job, rs, error) for job, rs, _, error in mine], out_dir, stage.pipe.source
    )
    parallel = layout_record(world, stage.groups)
    outgoing: Outgoing | None = None
    run = [(job, rs, plan) for job, rs, plan, _ in mine if job.index in todo]
    for job, rs, plan in progress_bar(run, progress, world):
        t0 = time.perf_counter()
        state, outgoing = _run_stage(stage, rs, plan, outgoing)
        error = state["error"]
        if world.rank == stage.writer:
            if not error:
                try:
                    result = _finish(stage.pipe, rs, plan, state)
                    _publish(stage.pipe, job, result, out_dir, recipe, on_result, parallel)
                except Exception as e:  # one request's failure must not stop the batch
                    error = f"{type(e).__name__}: {e}"
            status = "failed" if error else "done"
            outcomes.append(outcome(job, status, error, time.perf_counter() - t0, world.rank))
    if outgoing is not None:
        outgoing.wait()
    return finish_batch(outcomes, out_dir, world)


def _run_stage(stage: Stage, rs, plan: Plan, outgoing: Outgoing | None):
    """This group's steps of one request: (its state, with "error" set if it failed, and the
    message now being sent on, or still the previous one on the last group)."""
    pipe, g = stage.pipe, stage.group
    try:
        if g == 0:
            state = _start(pipe, rs, plan)
        else:
            state = recv_message(stage.peer(g - 1), pipe.device)
        if not state["error"]:
            _denoise(stage, rs, plan, state)
    except Exception as e:  # sent on, so that the next groups skip this request
        state = {"error": f"{type(e).__name__}: {e}"}
    if g < stage.num_groups - 1:
        if outgoing is not None:
            outgoing.wait()  # the previous request's buffers are free only now
        return state, send_message(state, stage.peer(g + 1), pipe.device)
    return state, outgoing


def _start(pipe: Pipeline, rs, plan: Plan) -> dict:
    """Group 0: the text embeddings, the seeded noise and a fresh solver, as `generate` does."""
    t0 = time.perf_counter()
    cond, uncond = pipe._embeddings(rs, None, None)
    timings = {"text": time.perf_counter() - t0, "denoise": 0.0}
    x = pipe._initial_latents(rs, None)  # t2v only (check_pipelined): no image to impose
    solver = solver_for(plan, rs.sampler)
    state = dict(x=x, cond=cond, uncond=uncond, solver=solver.get_state(), trace=[])
    return {**state, "timings": timings, "error": ""}


def _denoise(stage: Stage, rs, plan: Plan, state: dict, callback=None) -> None:
    """Run this group's expert's steps on `state` (updated in place).

    Args:
        callback: called after each step as callback(index, num_steps, experts), as
            `Pipeline.generate`'s; raising from it stops the request there.
    """
    pipe = stage.pipe
    steps = phase_ranges(plan)[stage.expert]
    if not steps:
        return  # this expert has no step in this plan: pass the state on
    solver = solver_for(plan, rs.sampler)
    solver.set_state(state["solver"])
    caches = {n: c for n, c in pipe._step_caches(rs.step_cache).items() if n in pipe.experts}
    t0 = time.perf_counter()
    x, rows = pipe._denoise(
        state["x"],
        plan,
        rs.sampler,
        state["cond"],
        state["uncond"],
        Conditioning(),
        False,
        callback,
        caches,
        steps=steps,
        solver=solver,
    )
    state["timings"]["denoise"] += time.perf_counter() - t0
    state.update(x=x, solver=solver.get_state(), trace=state["trace"] + rows)


def _finish(pipe: Pipeline, rs, plan: Plan, state: dict) -> GenerationResult:
    """The last group: decode the latents into frames."""
    pipe.experts.idle()
    t0 = time.perf_counter()
    frames = pipe.decode(state["x"])
    timings = {**state["timings"], "decode": time.perf_counter() - t0}
    return GenerationResult(
        frames=frames,
        latents=state["x"].cpu(),
        plan=plan,
        settings=rs,
        trace=state["trace"],
        timings=timings,
    )


def _publish(
    pipe: Pipeline, job: Job, result, out_dir: Path, recipe, on_result, parallel=None
) -> None:
    from vidmoe.batch import video_path
    from vidmoe.io.video import publish_video

    if on_result is not None:
        on_result(job, result)
    record = run_record(result, pipe.source, recipe=recipe, job=job, parallel=parallel)
    publish_video(result.frames, record, video_path(out_dir, job), fps=pipe.config.fps)


def make_stage(pipe: Pipeline, groups: Groups) -> Stage:
    """A `Stage` from a pipeline built with every component: keeps only this group's expert,
    the text encoder on group 0 and the VAE on the last group (the rest is dropped)."""
    check_pipelined(pipe.config, groups.layout.expert_groups)
    name = pipe.config.moe.expert_names[groups.place.expert_group]
    stage_pipe = _stage_pipeline(
        pipe.config,
        groups,
        {name: pipe.experts[name]},
        pipe.vae,
        pipe.text_encoder,
        placement=pipe.experts.placement,
        source=pipe.source,
    )
    stage_pipe.limits = pipe.limits
    return Stage(pipe=stage_pipe, groups=groups, expert=name)


def _split_inside(pipe: Pipeline, groups: Groups) -> None:
    """Split each request over the group's ranks (Ulysses and CFG) when the layout asks."""
    if groups.layout.cfg * groups.layout.ulysses > 1:
        pipe.set_parallel(groups)


def _stage_pipeline(
    config, groups: Groups, experts: dict, vae, text, *, placement, source: dict
) -> Pipeline:
    """A pipeline of `experts` with the VAE only on the last group, the text encoder on group 0."""
    from vidmoe.models.moe import Experts

    g, last = groups.place.expert_group, groups.layout.expert_groups - 1
    held = Experts(experts, config.moe, placement=placement, require_all=False)
    pipe = Pipeline(config, held, vae if g == last else None, text if g == 0 else None)
    pipe.source = dict(source)  # as a single-process load's: records and resumes agree
    _split_inside(pipe, groups)
    return pipe


def load_stage(
    model, world: World, *, layout: Layout, device: torch.device, load: dict, shard=None
):
    """This rank's `Stage` of `model` (a checkpoint folder or a preset): only its group's
    expert is read from the checkpoint (a preset's random weights are built whole, then cut).

    Args:
        layout: expert groups (one per expert) x cfg x ulysses, times `replicas` copies; the
            world size must be its size.
        load: the generate command's loading options (device, dtype, residency, loras, ...).
        shard: a `vidmoe.parallel.fsdp.Sharding` (its `group` is ignored): the group's expert
            (and group 0's text encoder) sharded over the group's ranks; None: held whole.
    """
    from vidmoe.loading import build_random_pipeline, model_config_for, speed_up
    from vidmoe.parallel.ulysses import check_model_heads
    from vidmoe.presets import PRESETS

    refused = {
        "--lora": bool(load.get("loras")),
        "--expert/--vae/--text-encoder": bool(load.get("files")),
        "--quantize": load.get("quantize") not in (None, "auto"),
        f"--residency {load.get('residency')}": load.get("residency", "resident") != "resident",
    }
    if any(refused.values()):
        flags = ", ".join(k for k, v in refused.items() if v)
        raise ValueError(
            f"expert-pipelined groups do not support {flags} yet: each rank holds one expert "
            "resident; run without them, or without --expert-groups"
        )
    config = model_config_for(model)
    check_pipelined(config, layout.expert_groups)
    check_model_heads(config, layout.ulysses)
    if shard is not None and layout.cfg * layout.ulysses == 1:
        raise ValueError(
            "--shard-experts shards each expert group's weights over its ranks, and a group "
            "here is one rank: add --ulysses N or --cfg-parallel, or drop --shard-experts"
        )
    groups = Groups(layout, world)
    from vidmoe.devices import resolve_dtype

    dtype = resolve_dtype(load.get("dtype", "auto"), device)
    mesh = None
    if shard is not None:
        from vidmoe.parallel.fsdp import check_shardable, shard_mesh

        check_shardable(residency="resident", compile=bool(load.get("compile")))
        mesh = shard_mesh(device, groups.expert_group)
    if isinstance(model, str) and model in PRESETS:  # random weights, built whole then cut
        stage = make_stage(build_random_pipeline(model, device=device, dtype=dtype), groups)
    else:
        stage = _load_stage_files(model, groups, config, device, dtype, mesh=mesh)
    if shard is not None:
        _shard_stage(stage, mesh, text_encoder=shard.text_encoder)
    speed_up(stage.pipe, attention=load.get("attention", "auto"), compile=load.get("compile"))
    return stage


def _shard_stage(stage: Stage, mesh, *, text_encoder: bool) -> None:
    """Shard the stage's expert (and group 0's text encoder) over `mesh`, its group's ranks;
    every group's records say what the command sharded."""
    from vidmoe.parallel.fsdp import shard_pipeline

    pipe = stage.pipe
    shard_pipeline(pipe, mesh, text_encoder=text_encoder and pipe.text_encoder is not None)
    pipe.source["shard"]["text_encoder"] = "fsdp2" if text_encoder else "whole"


def _load_stage_files(model, groups: Groups, config, device, dtype, *, mesh=None) -> Stage:
    """Read only this group's expert (and the text encoder or VAE it holds) from a folder; with
    a `mesh`, only this rank's rows of the expert's tensors."""
    from vidmoe.io.checkpoints import detect_layout, load_expert, load_vae
    from vidmoe.loading import _default_model
    from vidmoe.models.moe import Placement
    from vidmoe.models.text_encoder import build_text_encoder

    path = Path(_default_model(model))
    layout = detect_layout(path)
    if layout.vae is None:
        raise ValueError(f"{path} has no VAE or text encoder: use a full checkpoint folder")
    g, last = groups.place.expert_group, groups.layout.expert_groups - 1
    name = config.moe.expert_names[g]
    if mesh is None:
        expert = load_expert(layout, name, device=device, dtype=dtype)
    else:
        from vidmoe.parallel.fsdp import load_sharded_expert

        tensors, part = layout.expert_tensors(name), layout.config.transformer_for(name)
        expert = load_sharded_expert(part, tensors, mesh, device=device, dtype=dtype)
    vae = load_vae(layout, device=device) if g == last else None
    text = None
    if g == 0:
        kind = layout.config.text_encoder
        text = build_text_encoder(
            kind,
            layout.root if kind == "umt5-xxl" else layout.text_encoder,
            device=device,
            max_length=layout.config.transformer.text_len,
        )
    pipe = _stage_pipeline(
        layout.config,
        groups,
        {name: expert},
        vae,
        text,
        placement=Placement(device=device, dtype=dtype),
        source={"path": str(path), "layout": layout.kind},
    )
    return Stage(pipe=pipe, groups=groups, expert=name)
