"""Lazy readers, atomic writers and strict loading into modules."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from vidmoe.io.atomic import save_safetensors_atomic
from vidmoe.io.checkpoints import load_into
from vidmoe.io.tensors import (
    DictSource,
    RenamedSource,
    SafetensorsFile,
    ShardedSafetensors,
    TorchFile,
    open_tensors,
)
from vidmoe.io.writers import write_sharded_safetensors


def tensors(n=6):
    return {f"layer.{i}.weight": torch.randn(4, 8) for i in range(n)} | {
        "half": torch.randn(3).to(torch.bfloat16)
    }


def test_safetensors_file_reads_lazily_with_shapes_and_metadata(tmp_path):
    src = tensors()
    save_safetensors_atomic(src, tmp_path / "w.safetensors", {"note": "hi"})
    f = SafetensorsFile(tmp_path / "w.safetensors")
    assert f.metadata == {"note": "hi"}
    assert set(f) == set(src) and len(f) == len(src)
    assert f.shape("layer.0.weight") == (4, 8) and f.dtype("half") == torch.bfloat16
    assert f.nbytes("layer.0.weight") == 4 * 8 * 4
    assert all(torch.equal(f[k], v) for k, v in src.items())


def test_sharded_write_then_read_equals_input(tmp_path):
    src = tensors()
    index = write_sharded_safetensors(src, tmp_path, name="model", max_shard_bytes=300)
    assert index.name == "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"]
    assert len(set(weight_map.values())) > 1
    source = open_tensors(index)
    assert isinstance(source, ShardedSafetensors)
    assert isinstance(open_tensors(tmp_path), ShardedSafetensors)  # the folder finds its index
    assert all(torch.equal(source[k], v) for k, v in src.items())


def test_missing_shard_error_names_shard_and_index(tmp_path):
    index = write_sharded_safetensors(tensors(), tmp_path, name="m", max_shard_bytes=300)
    shard = sorted(tmp_path.glob("m-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(ValueError) as e:
        open_tensors(index)
    assert shard.name in str(e.value) and str(index) in str(e.value)


@pytest.mark.parametrize("cut", [5, 200, -3])
def test_truncated_safetensors_error_names_the_file(tmp_path, cut):
    path = tmp_path / "w.safetensors"
    save_file(tensors(), str(path))
    data = path.read_bytes()
    path.write_bytes(data[:cut])
    with pytest.raises(ValueError, match="truncated|not a safetensors") as e:
        open_tensors(path)
    assert str(path) in str(e.value)


def test_corrupt_header_is_a_clear_error(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes((20).to_bytes(8, "little") + b"{not json at all!!!}")
    with pytest.raises(ValueError, match="corrupt safetensors header"):
        open_tensors(path)


class Payload:
    """An arbitrary object: unpickling it would run code."""

    def __reduce__(self):
        return (os.getcwd, ())


def test_pth_reads_tensors_memory_mapped(tmp_path):
    src = tensors()
    torch.save(src, tmp_path / "w.pth")
    f = open_tensors(tmp_path / "w.pth")
    assert isinstance(f, TorchFile)
    assert all(torch.equal(f[k], v) for k, v in src.items())


def test_pth_with_arbitrary_object_is_refused(tmp_path):
    torch.save({"w": torch.zeros(2), "evil": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="weights_only=True") as e:
        open_tensors(tmp_path / "evil.pth")
    assert "evil.pth" in str(e.value)


def test_legacy_pth_is_a_clear_error(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError, match="cannot memory-map"):
        open_tensors(tmp_path / "old.pth")


def test_atomic_save_replaces_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "w.safetensors"
    save_safetensors_atomic({"a": torch.zeros(2)}, path)
    save_safetensors_atomic({"a": torch.ones(2)[:1], "b": torch.arange(4).view(2, 2).t()}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]
    f = SafetensorsFile(path)
    assert torch.equal(f["a"], torch.ones(1)) and torch.equal(
        f["b"], torch.tensor([[0, 2], [1, 3]])
    )
    with pytest.raises(ValueError, match="metadata values must be str"):
        save_safetensors_atomic({"a": torch.zeros(2)}, path, {"step": 3})
    assert torch.equal(SafetensorsFile(path)["a"], torch.ones(1))  # the old file survives


def test_renamed_source_maps_names_and_refuses_collisions():
    src = DictSource({"x.a": torch.zeros(1), "y.a": torch.ones(2)})
    renamed = RenamedSource(src, lambda n: n.replace("x.", "z."))
    assert set(renamed) == {"z.a", "y.a"} and renamed.shape("y.a") == (2,)
    with pytest.raises(ValueError, match="both map to 'a'"):
        RenamedSource(src, lambda n: "a")


class Tiny(nn.Module):
    """Two linears and a buffer."""

    def __init__(self, n=12):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(n))
        self.register_buffer("scale", torch.ones(4))


def test_strict_report_lists_missing_unexpected_and_misshaped_names():
    state = Tiny().state_dict()
    for i in range(11):  # 22 missing: more than the 10 listed
        del state[f"layers.{i}.weight"], state[f"layers.{i}.bias"]
    state["extra.weight"] = torch.zeros(1)
    state["layers.11.weight"] = torch.zeros(5, 4)
    with pytest.raises(ValueError) as e:
        load_into(Tiny(), state)
    msg = str(e.value)
    assert "22 missing" in msg and "and 12 more" in msg and "'layers.0.weight'" in msg
    assert "1 unexpected" in msg and "extra.weight" in msg
    assert "1 mis-shaped" in msg and "('layers.11.weight', (4, 4), (5, 4))" in msg


def test_non_strict_load_reports_skipped_names():
    state = Tiny(1).state_dict()
    del state["scale"]
    state["extra"] = torch.zeros(1)
    report = load_into(Tiny(1), state, strict=False)
    assert report.loaded == 2 and report.missing == ("scale",) and report.unexpected == ("extra",)


def test_load_into_meta_module_assigns_cast_tensors(tmp_path):
    src = Tiny(2)
    state = {k: v.to(torch.bfloat16) + 1 for k, v in src.state_dict().items()}
    save_safetensors_atomic(state, tmp_path / "w.safetensors")
    with torch.device("meta"):
        model = Tiny(2)
    report = load_into(model, open_tensors(tmp_path / "w.safetensors"))
    assert report.loaded == len(state)
    for name, t in model.state_dict().items():
        assert t.device.type == "cpu" and t.dtype == torch.float32
        assert torch.equal(t, state[name].float())
    assert all(p.requires_grad for p in model.parameters())


def test_load_into_materialised_module_copies_in_place():
    model, other = Tiny(1), Tiny(1)
    param = model.layers[0].weight
    load_into(model, {k: v.double() for k, v in other.state_dict().items()})
    assert model.layers[0].weight is param and param.dtype == torch.float32
    assert torch.equal(param, other.layers[0].weight)


def test_rows_read_only_the_rows_asked_for(tmp_path):
    """A sharded load reads each rank's rows: every source gives `t[start:stop]`, clamped."""
    tensors = {
        "a": torch.randn(7, 3, 2).bfloat16(),
        "b": torch.arange(10.0),
        "c": torch.randn(5, 4),
    }
    save_file(tensors, str(tmp_path / "x.safetensors"))
    write_sharded_safetensors(tensors, tmp_path / "sharded", max_shard_bytes=100)
    sources = [
        SafetensorsFile(tmp_path / "x.safetensors"),
        open_tensors(tmp_path / "sharded"),
        RenamedSource(SafetensorsFile(tmp_path / "x.safetensors"), str.upper),
    ]
    for source in sources:
        for name, t in tensors.items():
            key = name.upper() if isinstance(source, RenamedSource) else name
            for start, stop in [(0, 3), (3, 7), (2, 2), (4, 100)]:
                assert torch.equal(source.rows(key, start, stop), t[start:stop]), (key, start)


def test_weights_written_atomically_get_the_mode_of_any_new_file(tmp_path):
    """safetensors writes its files 0600; a model folder vidmoe writes is readable as any file
    the process writes (0o666 less the umask), so a server running as another user can read it."""
    import stat

    from vidmoe.io.atomic import new_file_mode, save_safetensors_atomic, write_text_atomic

    weights = save_safetensors_atomic({"a": torch.zeros(2)}, tmp_path / "w.safetensors")
    text = write_text_atomic("{}", tmp_path / "c.json")
    plain = tmp_path / "plain"
    plain.write_text("x")
    mode = stat.S_IMODE(os.stat(plain).st_mode)
    assert stat.S_IMODE(os.stat(weights).st_mode) == mode == new_file_mode()
    assert stat.S_IMODE(os.stat(text).st_mode) == mode
