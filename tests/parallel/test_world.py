import pytest
import torch
import torch.distributed as dist

from tests.parallel.spawn import run_ranks
from vidmoe.parallel.world import Groups, Layout, World, world_from_env


def test_world_from_env_reads_torchrun_variables():
    assert world_from_env({}) == World()
    w = world_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (w.rank, w.size, w.local_rank, w.is_main, w.distributed) == (3, 4, 1, False, True)


@pytest.mark.parametrize(
    "env, message",
    [
        ({"RANK": "0"}, "WORLD_SIZE, LOCAL_RANK missing"),
        ({"RANK": "x", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "RANK must be an integer"),
        ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "rank 2 of world size 2"),
    ],
)
def test_world_from_env_refuses_broken_sets(env, message):
    with pytest.raises(ValueError, match=message):
        world_from_env(env)


def test_layout_checks_the_world_size_and_orders_ranks():
    layout = Layout(ulysses=2, cfg=2, expert_groups=2)
    with pytest.raises(ValueError, match="needs 8 processes .* world has 4"):
        layout.check(World(rank=0, size=4))
    assert [layout.coords(r) for r in range(8)] == [
        (g, c, u) for g in range(2) for c in range(2) for u in range(2)
    ]
    assert all(layout.rank_of(*layout.coords(r)) == r for r in range(8))
    copies = Layout(ulysses=2, expert_groups=2).filling(World(rank=0, size=8))
    assert (copies.replicas, copies.size, copies.replica_size) == (2, 8, 4)
    assert [(copies.replica_of(r), *copies.coords(r)) for r in range(8)] == [
        (r, g, 0, u) for r in range(2) for g in range(2) for u in range(2)
    ]
    assert all(copies.rank_of(*copies.coords(r), copies.replica_of(r)) == r for r in range(8))
    with pytest.raises(ValueError, match="takes 4 processes .* world has 6, not a multiple"):
        Layout(ulysses=2, expert_groups=2).filling(World(rank=0, size=6))
    with pytest.raises(ValueError, match="cfg is 1 or 2"):
        Layout(cfg=3)
    with pytest.raises(ValueError, match="ulysses must be a positive integer"):
        Layout(ulysses=0)


def _members(groups: Groups, names: tuple[str, ...]) -> dict[str, list[int]]:
    """Each named group's members, found by summing one-hot rank vectors inside it."""
    rank, size = groups.world.rank, groups.world.size
    members = {}
    for name in names:
        t = torch.zeros(size)
        t[rank] = 1
        dist.all_reduce(t, group=getattr(groups, name))
        members[name] = t.nonzero().flatten().tolist()
    return members


def _group_members(rank, size):
    world = World(rank=rank, size=size, local_rank=rank)
    split = _members(Groups(Layout(ulysses=2, cfg=2), world), ("ulysses", "cfg"))
    copies = Groups(Layout(ulysses=2).filling(world), world)
    names = ("ulysses", "expert_group", "replica")
    return split, _members(copies, names), copies.replica_main, copies.place.replica


def test_groups_on_four_gloo_processes(tmp_path):
    got = run_ranks(_group_members, 4, tmp_path)
    assert [m["ulysses"] for m, *_ in got] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [m["cfg"] for m, *_ in got] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    # two replicas of ulysses 2: each replica's groups hold only its own ranks
    for name in ("ulysses", "expert_group", "replica"):
        assert [m[name] for _, m, _, _ in got] == [[0, 1], [0, 1], [2, 3], [2, 3]], name
    assert [(main, r) for _, _, main, r in got] == [(0, 0), (0, 0), (2, 1), (2, 1)]


@pytest.mark.parametrize(
    "env, layout, shard, message",
    [
        (
            {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"},
            Layout(),
            False,
            "this run has 2 processes but nothing splits the work",
        ),
        ({}, Layout(ulysses=2), False, "--ulysses 2 runs on 2 processes and this is one"),
        ({}, Layout(), True, "--shard-experts runs on 2 or more processes and this is one"),
        (
            {"RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "0"},
            Layout(cfg=2),
            False,
            "needs 2 processes .* world has 4",
        ),
    ],
)
def test_parallel_run_refuses_launches_that_do_not_fit(env, layout, shard, message):
    from vidmoe.parallel.launch import parallel_run

    with pytest.raises(ValueError, match=message):
        with parallel_run(env, "cpu", layout, shard_experts=shard):
            pass
    assert not dist.is_initialized()


def test_parallel_run_alone_is_one_untouched_process():
    from vidmoe.parallel.launch import parallel_run

    with parallel_run({}, "cpu", Layout()) as run:
        run.join()
        assert (run.world, run.groups, run.sharding, run.device) == (World(), None, None, "cpu")
    assert not dist.is_initialized()
