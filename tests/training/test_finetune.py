"""Fine-tuning from an init model: LoRA per expert through peft (only adapters train, resume is
exact, the saved peft and diffusers files load in vidmoe, peft and diffusers and reproduce the
trained experts), full fine-tuning from the init weights, and the config errors."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from tests.training.conftest import (
    TINY_EXPERT,
    TINY_MOE,
    tiny_run,
    write_init_model,
    write_tiny_cache,
)
from vidmoe.io.checkpoints import detect_layout, load_expert
from vidmoe.models.transformer import WanTransformer
from vidmoe.presets import PRESETS
from vidmoe.sampling.pipeline import Pipeline
from vidmoe.training.checkpoint import export_model, load_checkpoint
from vidmoe.training.finetune import DEFAULT_LORA_TARGETS
from vidmoe.training.loop import TrainConfig, build_experts, train

pytest.importorskip("peft", reason="LoRA fine-tuning needs peft (train extra)")
NAMES = TINY_MOE.expert_names


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return write_tiny_cache(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory):
    """A vidmoe model folder with two random tiny experts (non-zero heads)."""
    return write_init_model(tmp_path_factory.mktemp("init"))


def _config(cache_dir, out_dir, **kw) -> TrainConfig:
    kw = {"lr": 3e-3, "warmup_steps": 1, "max_steps": 4, "checkpoint_every": 2, **kw}
    return TrainConfig.from_dict(tiny_run(cache_dir, out_dir, **kw))


def _init_state(init_dir, name) -> dict[str, torch.Tensor]:
    return load_expert(detect_layout(init_dir), name, dtype=torch.float32).state_dict()


@pytest.fixture(scope="module")
def lora_run(cache_dir, init_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora")
    cfg = _config(cache_dir, out, init=str(init_dir), lora={"rank": 4, "alpha": 8.0})
    return train(cfg)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 2, 4, 4, generator=g)  # (B, Z, F, H, W)
    context = torch.randn(2, 8, 16, generator=g)  # (B, S, D)
    return x, torch.tensor([0.95, 0.3]), context


@torch.no_grad()
def _out(expert, inputs):
    return expert.eval()(*inputs)


def test_lora_run_trains_only_the_adapters(lora_run, init_dir, tmp_path):
    ckpt = load_checkpoint(lora_run.out_dir / "checkpoint.pt")
    with pytest.raises(ValueError, match="is a LoRA run"):  # adapters only: no full export
        export_model(lora_run.out_dir / "checkpoint.pt", PRESETS["tiny-t2v"], {}, tmp_path)
    for name in NAMES:
        expert, init = lora_run.experts[name], _init_state(init_dir, name)
        base = {
            k.replace(".base_layer", ""): v
            for k, v in expert.state_dict().items()
            if ".lora_" not in k
        }
        assert base.keys() == init.keys()
        for k, v in init.items():
            assert torch.equal(base[k], v), (name, k)  # bit-identical frozen weights
        lora = {k: v for k, v in expert.named_parameters() if ".lora_" in k}
        assert len(lora) == 2 * len(DEFAULT_LORA_TARGETS) * TINY_EXPERT.num_layers
        assert all(p.requires_grad for p in lora.values())
        assert all(v.abs().max() > 0 for k, v in lora.items() if ".lora_B." in k)  # B starts at 0
        # the checkpoint and the EMA hold the adapters only
        assert set(ckpt["experts"][name]) == set(lora) == set(ckpt["ema"]["shadow"][name])
    trained = {id(p) for g in lora_run.opt.param_groups for p in g["params"]}
    assert all(
        (id(p) in trained) == p.requires_grad
        for e in lora_run.experts.values()
        for p in e.parameters()
    )


def _pipe(init_dir) -> Pipeline:
    layout = detect_layout(init_dir)
    experts = {n: load_expert(layout, n, dtype=torch.float32) for n in NAMES}
    return Pipeline(layout.config, experts, None, None)


def test_saved_adapters_reproduce_the_trained_experts(lora_run, init_dir):
    folder = lora_run.out_dir / "lora"
    inputs = _inputs()
    want = {n: _out(lora_run.experts[n], inputs) for n in NAMES}
    pipe = _pipe(init_dir)
    base = {n: _out(pipe.experts[n], inputs) for n in NAMES}
    for name in NAMES:
        assert (want[name] - base[name]).abs().max() > 1e-3  # the adapter matters
        cfg = json.loads((folder / name / "adapter_config.json").read_text())
        assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"]) == ("LORA", 4, 8.0)
        pipe.load_lora(folder / name / "adapter_model.safetensors", expert=name, name=name)
    for name in NAMES:
        torch.testing.assert_close(_out(pipe.experts[name], inputs), want[name], atol=1e-5, rtol=0)
    pipe.unload_lora()
    rec = pipe.load_lora(folder / "diffusers_lora.safetensors")  # both experts, one file
    assert rec.format == "diffusers" and set(rec.strengths) == set(NAMES)
    pipe.fuse_lora()  # merged into the weights
    for name in NAMES:
        torch.testing.assert_close(_out(pipe.experts[name], inputs), want[name], atol=1e-5, rtol=0)
    # the EMA adapters are written beside them, in the same layout
    assert (lora_run.out_dir / "lora_ema" / "diffusers_lora.safetensors").is_file()


def test_peft_loads_the_per_expert_adapter(lora_run, init_dir):
    from peft import PeftModel

    inputs = _inputs(1)
    for name in NAMES:
        base = WanTransformer(TINY_EXPERT)
        base.load_state_dict(_init_state(init_dir, name))
        model = PeftModel.from_pretrained(base, lora_run.out_dir / "lora" / name)
        got = _out(model.base_model.model, inputs)
        torch.testing.assert_close(got, _out(lora_run.experts[name], inputs), atol=1e-5, rtol=0)


def test_diffusers_loads_the_combined_file(lora_run, init_dir):
    diffusers = pytest.importorskip("diffusers")
    from vidmoe.io import keymaps

    kw = keymaps.transformer_config_to_diffusers(TINY_EXPERT)
    kw = {k: v for k, v in kw.items() if k != "_class_name"}
    models = []
    for name in NAMES:
        m = diffusers.WanTransformer3DModel(**kw)
        init = _init_state(init_dir, name)
        m.load_state_dict({keymaps.transformer_to_diffusers(k): v for k, v in init.items()})
        models.append(m.eval())
    dp = diffusers.WanPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=None,
        transformer=models[0],
        transformer_2=models[1],
        boundary_ratio=0.875,
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
    )
    path = lora_run.out_dir / "lora" / "diffusers_lora.safetensors"
    dp.load_lora_weights(str(path), adapter_name="ft")  # `transformer.`: the high-noise expert
    # diffusers' Wan loader reads `transformer.` keys only; the second expert's keys load with
    # the model's own loader and the prefix (use_safetensors: else it drops the alpha metadata)
    dp.transformer_2.load_lora_adapter(
        str(path), prefix="transformer_2", adapter_name="ft", use_safetensors=True
    )
    x, sigma, context = _inputs(2)
    for name, model in zip(NAMES, (dp.transformer, dp.transformer_2)):
        with torch.no_grad():
            got = model(x, timestep=sigma * 1000, encoder_hidden_states=context).sample
        torch.testing.assert_close(
            got, _out(lora_run.experts[name], (x, sigma, context)), atol=1e-4, rtol=1e-4
        )


def test_lora_resume_is_bit_exact(cache_dir, init_dir, tmp_path):
    lora = {"rank": 2, "dropout": 0.2, "targets": ["self_attn.q", "ffn.2"]}
    kw = dict(init=str(init_dir), lora=lora)
    a = train(_config(cache_dir, tmp_path / "a", **kw))
    train(_config(cache_dir, tmp_path / "b", max_steps=2, **kw))
    b = train(_config(cache_dir, tmp_path / "b", **kw))  # resumes at step 2
    sa, sb = (load_checkpoint(t.out_dir / "checkpoint.pt") for t in (a, b))
    assert sa["step"] == sb["step"] == 4
    for name in NAMES:
        assert len(sa["experts"][name]) == 4 * TINY_EXPERT.num_layers
        for k, v in sa["experts"][name].items():
            assert torch.equal(v, sb["experts"][name][k]), (name, k)
            assert torch.equal(sa["ema"]["shadow"][name][k], sb["ema"]["shadow"][name][k])
    for k, v in sa["optimizer"]["state"].items():
        assert torch.equal(v["exp_avg"], sb["optimizer"]["state"][k]["exp_avg"])
    fa, fb = (load_file(t.out_dir / "lora" / "diffusers_lora.safetensors") for t in (a, b))
    assert fa.keys() == fb.keys() and all(torch.equal(v, fb[k]) for k, v in fa.items())


def test_full_finetune_starts_at_the_init_weights(cache_dir, init_dir, tmp_path):
    cfg = _config(cache_dir, tmp_path, init=str(init_dir), max_steps=1, experts=["low_noise"])
    experts = build_experts(cfg)
    assert list(experts) == ["low_noise"]
    init = _init_state(init_dir, "low_noise")
    state = experts["low_noise"].state_dict()
    assert state.keys() == init.keys() and all(torch.equal(state[k], v) for k, v in init.items())
    assert all(p.requires_grad for p in experts["low_noise"].parameters())
    trainer = train(cfg)
    weights = load_checkpoint(tmp_path / "checkpoint.pt")["experts"]["low_noise"]
    assert weights.keys() == init.keys()  # full weights, not adapters
    assert any(not torch.equal(weights[k], v) for k, v in init.items())  # one step moved them
    assert not (trainer.out_dir / "lora").exists()


def test_config_errors_name_the_problem(cache_dir, init_dir, tmp_path):
    other = dataclasses.replace(TINY_EXPERT, dim=64, ffn_dim=128).to_dict()
    cfg = _config(cache_dir, tmp_path, init=str(init_dir), transformer=other)
    with pytest.raises(ValueError, match=r"dim=64 \(init: 32\), ffn_dim=128 \(init: 64\)"):
        build_experts(cfg)
    bad_target = {"rank": 2, "targets": ["self_attn.qq"]}
    with pytest.raises(ValueError, match=r"\[lora\] targets \['self_attn.qq'\] match no module"):
        build_experts(_config(cache_dir, tmp_path, lora=bad_target))
    with pytest.raises(ValueError, match=r"\[lora\]: rank must be >= 0"):
        _config(cache_dir, tmp_path, lora={"rank": -1})
    with pytest.raises(ValueError, match="does not exist"):
        build_experts(_config(cache_dir, tmp_path, init=str(tmp_path / "missing")))
    cfg = _config(cache_dir, tmp_path, lora={"rank": 8, "targets": ["ffn.0"]}, init=str(init_dir))
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
