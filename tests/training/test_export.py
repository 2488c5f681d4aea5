"""Exporting a run as a vidmoe model folder that the loader reads; the small-VAE trainer."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from tests.training.conftest import HashTextEncoder, PoolVAE, fake_clips
from vidmoe.config import VAEConfig
from vidmoe.models.vae import WanVAE
from vidmoe.presets import PRESETS
from vidmoe.training.checkpoint import export_model
from vidmoe.training.data import build_latent_cache
from vidmoe.training.loop import TrainConfig, train
from vidmoe.training.vae_train import VAETrainConfig, train_vae


def test_exported_run_loads_as_a_pipeline(tmp_path):
    model = PRESETS["tiny-t2v"]
    tiny = dataclasses.replace(model.transformer, in_dim=4, out_dim=4, text_dim=16, text_len=8)
    build_latent_cache(fake_clips(4), PoolVAE(), HashTextEncoder(), tmp_path / "c", text_len=8)
    cfg = TrainConfig(
        cache=str(tmp_path / "c"),
        out_dir=str(tmp_path / "run"),
        transformer=tiny,
        batch_size=2,
        max_steps=3,
        warmup_steps=1,
        ema_decay=0.5,
        num_threads=1,
        use_progress=False,
        use_bf16=True,
        use_checkpointing=True,
    )
    trainer = train(cfg)
    assert trainer.step == 3
    vae_cfg = VAEConfig(generation="2.1", dim=4, z_dim=4, num_res_blocks=1)
    vae = WanVAE(vae_cfg)
    config = dataclasses.replace(model, transformer=tiny, vae=vae_cfg)
    out = export_model(tmp_path / "run" / "checkpoint.pt", config, vae.state_dict(), tmp_path / "m")
    assert sorted(p.name for p in (out / "experts").iterdir()) == [
        "high_noise.safetensors",
        "low_noise.safetensors",
    ]
    from vidmoe.io.checkpoints import detect_layout, load_expert

    layout = detect_layout(out)
    assert layout.kind == "vidmoe" and layout.config == config
    expert = load_expert(layout, "low_noise", dtype=torch.float32)
    ema = trainer.ema.shadow["low_noise"]
    for k, v in expert.state_dict().items():
        if k in ema:  # bf16 files: EMA weights rounded to bf16
            assert torch.equal(v, ema[k].to(torch.bfloat16).float()), k


def test_vae_trainer_writes_normalised_vae(tmp_path):
    cfg = VAETrainConfig(
        vae=VAEConfig(generation="2.1", dim=4, z_dim=4, num_res_blocks=1),
        width=32,
        height=32,
        clip_frames=9,
        window_frames=5,
        crop=16,
        batch_size=2,
        max_steps=2,
        num_stat_clips=3,
    )
    vae, config = train_vae(cfg, tmp_path, log=lambda s: None)
    saved = json.loads((tmp_path / "vae_config.json").read_text())
    assert tuple(saved["latents_std"]) == config.latents_std and len(config.latents_mean) == 4
    from safetensors.torch import load_file

    fresh = WanVAE(VAEConfig(**saved))
    fresh.load_state_dict(load_file(str(tmp_path / "vae.safetensors")))
    from vidmoe.world.shapes import ShapesWorld

    world = ShapesWorld(32, 32, 9, seed=cfg.seed)
    clips = torch.stack([world.sample(10_000_000 + i).video for i in range(3)])
    z = fresh.encode(clips)  # the statistics' own clips: normalised to mean 0, std 1
    assert z.mean(dim=(0, 2, 3, 4)).abs().max() < 1e-3
    assert (z.std(dim=(0, 2, 3, 4)) - 1).abs().max() < 1e-2


def test_a_killed_vae_run_resumes_bit_exactly(tmp_path):
    """A run stopped after its checkpoint at step 8 (here by an exception in the log callback at
    step 10) and started again equals one uninterrupted run: weights, statistics and log."""
    from safetensors.torch import load_file

    cfg = VAETrainConfig(
        vae=VAEConfig(generation="2.1", dim=4, z_dim=4, num_res_blocks=1),
        width=32,
        height=32,
        clip_frames=9,
        window_frames=5,
        crop=16,
        batch_size=1,
        max_steps=20,
        num_stat_clips=2,
        checkpoint_every=4,
        latent_noise=0.2,
    )
    train_vae(cfg, tmp_path / "once", log=lambda s: None)

    def killed_at_step_10(line: str) -> None:
        if json.loads(line).get("step") == 10 and "l1" in line:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_vae(cfg, tmp_path / "twice", log=killed_at_step_10)
    assert not (tmp_path / "twice" / "vae.safetensors").exists()
    lines = []
    train_vae(cfg, tmp_path / "twice", log=lines.append)
    assert json.loads(lines[0]) == {
        "resumed": str(tmp_path / "twice" / "vae_checkpoint.pt"),
        "step": 8,
    }
    once, twice = (load_file(str(tmp_path / d / "vae.safetensors")) for d in ("once", "twice"))
    assert once.keys() == twice.keys() and all(torch.equal(once[k], twice[k]) for k in once)
    stats = [(tmp_path / d / "vae_config.json").read_text() for d in ("once", "twice")]
    assert stats[0] == stats[1]
    logs = [
        [
            {k: v for k, v in json.loads(ln).items() if k != "seconds"}
            for ln in (tmp_path / d / "log.jsonl").read_text().splitlines()
        ]
        for d in ("once", "twice")
    ]
    assert logs[0] == logs[1] and [r["step"] for r in logs[0]] == [10, 20]
    with pytest.raises(ValueError, match=r"another VAE config \(differs in \['lr'\]"):
        train_vae(dataclasses.replace(cfg, lr=1e-3), tmp_path / "twice", log=lambda s: None)
    threads = torch.get_num_threads()
    try:  # what may change: the time limit and the threads
        again = dataclasses.replace(cfg, max_minutes=5.0, num_threads=1)
        train_vae(again, tmp_path / "twice", log=lambda s: None)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)


def test_a_vae_checkpoint_from_before_a_new_field_resumes_as_its_default(tmp_path):
    """A checkpoint written before a field existed (here: its config lacks border_weight) resumes
    when the run leaves that field at its default, and is refused when it sets it."""
    from vidmoe.training.checkpoint import load_checkpoint, save_checkpoint

    cfg = _tiny_vae_run(max_steps=3, stop_step=2, checkpoint_every=1)
    train_vae(cfg, tmp_path, log=lambda s: None)
    path = tmp_path / "vae_checkpoint.pt"
    state = load_checkpoint(path)
    del state["config"]["border_weight"]
    save_checkpoint(state, path)
    with pytest.raises(ValueError, match=r"another VAE config \(differs in \['border_weight'\]"):
        train_vae(dataclasses.replace(cfg, border_weight=1.0), tmp_path, log=lambda s: None)
    lines = []
    train_vae(dataclasses.replace(cfg, stop_step=0), tmp_path, log=lines.append)
    assert json.loads(lines[0])["step"] == 2  # resumed, not started afresh
    assert any(line.startswith('{"done": 3') for line in lines), lines


def test_vae_decoder_only_keeps_the_latent_space(tmp_path):
    from safetensors.torch import load_file

    base = VAETrainConfig(
        vae=VAEConfig(generation="2.1", dim=4, z_dim=4, num_res_blocks=1),
        width=32,
        height=32,
        clip_frames=9,
        window_frames=9,
        crop=0,
        batch_size=1,
        max_steps=1,
        num_stat_clips=2,
    )
    _, first = train_vae(base, tmp_path / "a", log=lambda s: None)
    # stars drawn half the time and outlines weighted: the statistics stay those of even shapes
    frozen = dataclasses.replace(
        base,
        freeze_encoder=True,
        max_steps=2,
        lr=1e-2,
        edge_weight=5.0,
        shapes=("circle", "square", "triangle", "star", "star", "star"),
    )
    _, second = train_vae(
        frozen, tmp_path / "b", init=tmp_path / "a" / "vae.safetensors", log=lambda s: None
    )
    a = load_file(str(tmp_path / "a" / "vae.safetensors"))
    b = load_file(str(tmp_path / "b" / "vae.safetensors"))
    enc = [k for k in a if k.startswith(("encoder.", "conv1."))]
    dec = [k for k in a if k.startswith("decoder.")]
    assert enc and all(torch.equal(a[k], b[k]) for k in enc)
    assert any(not torch.equal(a[k], b[k]) for k in dec)
    assert second.latents_mean == first.latents_mean and second.latents_std == first.latents_std


def test_outline_weight_marks_the_pixels_beside_an_objects_boundary():
    from vidmoe.training.vae_train import VAETrainConfig, outline, vae_loss

    mask = torch.zeros(1, 1, 1, 8, 8, dtype=torch.bool)
    mask[..., 2:6, 2:6] = True  # a 4x4 square
    ring = outline(mask)[0, 0, 0]
    inside, outside = torch.zeros(8, 8, dtype=torch.bool), torch.zeros(8, 8, dtype=torch.bool)
    inside[3:5, 3:5] = True  # the square's own interior, two pixels from every edge
    outside[1:7, 1:7] = True
    assert torch.equal(ring.bool(), outside & ~inside)  # one pixel either side of the boundary
    vae = WanVAE(VAEConfig(generation="2.1", dim=4, z_dim=4, num_res_blocks=1)).eval()
    from vidmoe.world.shapes import ShapesWorld

    video = ShapesWorld(32, 32, 5, shapes=("star",), seed=0).sample(0).video[None]
    plain = VAETrainConfig(vae=vae.config, latent_noise=0.0)
    edged = dataclasses.replace(plain, edge_weight=10.0)
    with torch.no_grad():
        assert vae_loss(vae, video, plain)[0] != vae_loss(vae, video, edged)[0]


def test_experts_trained_in_separate_runs_export_as_one_model(tmp_path):
    model = PRESETS["tiny-t2v"]  # pooled text conditioning too, as the demo model has
    tiny = dataclasses.replace(
        model.transformer, in_dim=4, out_dim=4, text_dim=16, text_len=8, pooled_text=True
    )
    build_latent_cache(fake_clips(4), PoolVAE(), HashTextEncoder(), tmp_path / "c", text_len=8)
    runs = {}
    for name in ("high_noise", "low_noise"):
        cfg = TrainConfig(
            cache=str(tmp_path / "c"),
            out_dir=str(tmp_path / name),
            transformer=tiny,
            experts=(name,),
            batch_size=2,
            max_steps=2,
            warmup_steps=1,
            num_threads=1,
            use_progress=False,
        )
        runs[name] = train(cfg)
        assert list(runs[name].experts) == [name]
        log = [json.loads(x) for x in (tmp_path / name / "log.jsonl").read_text().splitlines()]
        assert all(set(r["count"]) == {name} for r in log)
    config = dataclasses.replace(
        model, transformer=tiny, vae=VAEConfig(generation="2.1", dim=4, z_dim=4, num_res_blocks=1)
    )
    vae = WanVAE(config.vae)
    ckpts = [tmp_path / n / "checkpoint.pt" for n in runs]
    out = export_model(
        ckpts, config, vae.state_dict(), tmp_path / "m", use_ema=False, dtype=torch.float32
    )
    from vidmoe.io.checkpoints import detect_layout, load_expert

    layout = detect_layout(out)
    for name, trainer in runs.items():
        loaded = load_expert(layout, name, dtype=torch.float32).state_dict()
        assert (
            "text_pool.2.weight" in loaded
            and loaded.keys() == trainer.experts[name].state_dict().keys()
        )
        for k, v in trainer.experts[name].state_dict().items():
            assert torch.equal(loaded[k], v), (name, k)
    assert trainer.experts["low_noise"].text_pool[2].weight.abs().max() > 0  # it trained
    with pytest.raises(ValueError, match="more than one checkpoint"):
        export_model([ckpts[0], ckpts[0]], config, vae.state_dict(), tmp_path / "x")
    with pytest.raises(ValueError, match="differ from the checkpoints.*--experts-from"):
        export_model([ckpts[0]], config, vae.state_dict(), tmp_path / "y")
    # one expert fine-tuned, the other taken from a model folder: the same files as `out`'s
    both = export_model(
        [ckpts[0]], config, vae.state_dict(), tmp_path / "z", use_ema=False, dtype=torch.float32,
        experts_from=out,
    )  # fmt: skip
    for name in runs:
        assert (both / "experts" / f"{name}.safetensors").read_bytes() == (
            out / "experts" / f"{name}.safetensors"
        ).read_bytes()
    with pytest.raises(ValueError, match="has no expert 'low_noise'"):
        export_model([ckpts[0]], config, vae.state_dict(), tmp_path / "v", experts_from=tmp_path)
    from safetensors.torch import save_file

    from vidmoe.models.transformer import WanTransformer

    wide = WanTransformer(dataclasses.replace(tiny, dim=tiny.dim * 2, ffn_dim=tiny.ffn_dim * 2))
    (tmp_path / "wide" / "experts").mkdir(parents=True)
    save_file(wide.state_dict(), tmp_path / "wide" / "experts" / "low_noise.safetensors")
    with pytest.raises(ValueError, match="cannot load weights into expert 'low_noise'.*shape"):
        export_model(
            [ckpts[0]], config, vae.state_dict(), tmp_path / "u", experts_from=tmp_path / "wide"
        )
    assert not (tmp_path / "u").exists()  # nothing written
    # the verb: a model folder as --config gives its lexicon too (it belongs to its captions)
    from vidmoe.training.export import export_runs

    (out / "lexicon.json").write_text('{"known": []}')
    verb = export_runs(
        tmp_path / "t", [tmp_path / "high_noise"], config=out, vae=out, experts_from=out
    )
    assert (verb / "lexicon.json").read_text() == '{"known": []}'
    assert (verb / "experts" / "low_noise.safetensors").is_file()


def test_vae_trainer_crop_follows_the_spatial_stride(tmp_path):
    vae = VAEConfig(
        generation="2.1",
        dim=4,
        z_dim=4,
        num_res_blocks=1,
        dim_mult=(1, 2, 4),
        temperal_downsample=(True, True),
    )
    base = dict(
        vae=vae,
        width=32,
        height=32,
        clip_frames=5,
        window_frames=5,
        batch_size=1,
        max_steps=1,
        num_stat_clips=1,
        sizes=("large",),
        motions=("left",),
    )
    with pytest.raises(ValueError, match="multiple of 4"):
        train_vae(VAETrainConfig(crop=6, **base), tmp_path, log=lambda s: None)
    trained, config = train_vae(VAETrainConfig(crop=12, **base), tmp_path, log=lambda s: None)
    z = trained.encode(torch.zeros(1, 3, 5, 32, 32))
    assert z.shape == (1, 4, 2, 8, 8)  # stride 4 in time and space


def test_train_vae_command_trains_then_fine_tunes_the_decoder(tmp_path):
    """`vidmoe train-vae`: a first stage from a TOML config, then a decoder-only stage that names
    it as `base` and `init` and says only what changes; bad configs are refused by name."""
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from vidmoe.cli import app

    runner = CliRunner()

    def run(name: str, text: str):
        (tmp_path / name).write_text(text)
        return runner.invoke(app, ["train-vae", str(tmp_path / name)])

    def trained(name: str, text: str) -> None:
        r = run(name, text)
        assert r.exit_code == 0, r.output

    trained(
        "stage1.toml",
        f'out_dir = "{tmp_path / "s1"}"\nwidth = 32\nheight = 32\nclip_frames = 9\n'
        "window_frames = 5\ncrop = 16\nbatch_size = 1\nmax_steps = 10\nnum_stat_clips = 2\n"
        '[vae]\ngeneration = "2.1"\ndim = 4\nz_dim = 4\nnum_res_blocks = 1\n',
    )
    first = tmp_path / "s1"
    assert {"vae.safetensors", "vae_config.json", "log.jsonl", "loss.png"} <= {
        p.name for p in first.iterdir()
    }
    assert [json.loads(ln)["step"] for ln in (first / "log.jsonl").read_text().splitlines()] == [10]
    assert (first / "loss.png").read_bytes()[:4] == b"\x89PNG"
    trained(
        "stage2.toml",
        f'base = "stage1.toml"\nout_dir = "{tmp_path / "s2"}"\ninit = "{first}"\n'
        'freeze_encoder = true\nedge_weight = 5.0\nshapes = ["square", "star", "star"]\n'
        "max_steps = 2\n",
    )
    a, b = (
        load_file(str(first / "vae.safetensors")),
        load_file(str(tmp_path / "s2" / "vae.safetensors")),
    )
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith(("encoder.", "conv1.")))
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("decoder."))

    def refused(text: str) -> str:
        r = run("bad.toml", text)
        assert r.exit_code != 0
        return r.output

    assert "shapes must be non-empty names from" in refused(
        'base = "stage1.toml"\nshapes = ["hexagon"]\n'
    )
    assert "needs out_dir" in refused("max_steps = 1\n[vae]\ndim = 4\n")
    assert "unknown key 'learning_rate' in the top level" in refused(
        'base = "stage1.toml"\nlearning_rate = 1.0\n'
    )
    assert "init" in refused(f'base = "stage1.toml"\ninit = "{tmp_path / "gone"}"\n')
    wider = refused(f'base = "stage1.toml"\ninit = "{first}"\n[vae]\ndim = 8\n')
    assert "does not fit this config's VAE" in wider and "mis-shaped" in wider


def test_first_frame_weight_weighs_each_windows_first_frame():
    """With `first_frame_weight` w the reconstruction loss is the pixel mean with frame 0 counted
    w times: (w E_0 + E_1 + ... + E_{T-1}) / (w + T - 1), E_t frame t's mean L1 + MSE."""
    from vidmoe.training.vae_train import vae_loss

    torch.manual_seed(0)
    vae = WanVAE(VAEConfig(generation="2.1", dim=4, z_dim=4, num_res_blocks=1))
    video = torch.rand(2, 3, 5, 16, 16) * 2 - 1  # (B, 3, T, H, W)
    base = dict(vae=vae.config, latent_noise=0.0, latent_weight=0.0, object_weight=0.0)
    with torch.no_grad():
        recon = vae.decode(vae.encode(video, chunked=False), chunked=False, clamp=False)
        err = (recon - video).abs() + (recon - video).pow(2)  # (B, 3, T, H, W)
        per_frame = err.mean(dim=(0, 1, 3, 4))  # (T,)
        for w in (1.0, 3.0, 0.25):
            loss, _ = vae_loss(vae, video, VAETrainConfig(**base, first_frame_weight=w))
            expected = (w * per_frame[0] + per_frame[1:].sum()) / (w + len(per_frame) - 1)
            assert torch.allclose(loss, expected, rtol=1e-5), (w, loss, expected)
    assert per_frame[0] != per_frame[1:].mean()  # so the weights above change the loss


def test_first_frame_weight_must_be_positive():
    with pytest.raises(ValueError, match=r"first_frame_weight must be > 0.*got 0.0"):
        VAETrainConfig(first_frame_weight=0.0)


def test_border_weight_weighs_the_band_along_the_frames_border():
    """With `border_weight` b the reconstruction loss is the pixel mean with the pixels within
    `border_width` of the border counted 1 + b times: (b E_band + E_all) / (b f + 1), where
    E_band and E_all are the band's and the whole frame's summed error over the pixel count
    and f the band's share of the pixels."""
    from vidmoe.training.vae_train import vae_loss

    torch.manual_seed(0)
    vae = WanVAE(VAEConfig(generation="2.1", dim=4, z_dim=4, num_res_blocks=1))
    video = torch.rand(2, 3, 5, 16, 16) * 2 - 1  # (B, 3, T, H, W)
    base = dict(vae=vae.config, latent_noise=0.0, latent_weight=0.0, object_weight=0.0, crop=0)
    with torch.no_grad():
        recon = vae.decode(vae.encode(video, chunked=False), chunked=False, clamp=False)
        err = ((recon - video).abs() + (recon - video).pow(2)).mean(dim=(0, 1, 2))  # (H, W)
        for width, b in ((1, 10.0), (2, 3.0)):
            band = torch.zeros(16, 16, dtype=torch.bool)
            band[:width], band[-width:], band[:, :width], band[:, -width:] = True, True, True, True
            cfg = VAETrainConfig(**base, border_weight=b, border_width=width)
            loss, _ = vae_loss(vae, video, cfg)
            f = band.float().mean()
            expected = (b * (err * band).mean() + err.mean()) / (b * f + 1)
            assert torch.allclose(loss, expected, rtol=1e-5), (width, loss, expected)
    assert err[band].mean() != err.mean()  # so the weight above changes the loss


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(border_weight=-1.0), r"border_weight must be >= 0.*got -1.0"),
        (dict(border_weight=1.0, border_width=0), r"border_width must be in \[1, 32\].*got 0"),
        (dict(border_weight=1.0, crop=32), r"a crop \(crop = 32\) does not show: set crop = 0"),
        (dict(border_change_weight=-0.5), r"border_change_weight must be >= 0.*got -0.5"),
        (dict(border_change_weight=1.0, crop=16), r"a crop \(crop = 16\) does not show"),
    ],
)
def test_border_weight_is_checked(fields, match):
    with pytest.raises(ValueError, match=match):
        VAETrainConfig(**({"crop": 0} | fields))


def test_border_change_error_asks_the_frames_to_agree_at_the_border():
    """The term is 0 for a reconstruction off by the same colour in every frame, and d / (T - 1)
    per channel for one whose first frame alone is off by d in the band (its one changed pair
    of T - 1); pixels inside the band do not count. In `vae_loss` it adds its weight times the
    term on the decoded clip."""
    from vidmoe.training.vae_train import border_change_error, vae_loss

    torch.manual_seed(0)
    video = torch.rand(2, 3, 5, 16, 16) * 2 - 1  # (B, 3, T, H, W)
    assert border_change_error(video + 0.25, video, 2) < 1e-6  # float rounding only
    first = video.clone()
    first[:, :, 0, :2] += 0.1  # frame 0's top two rows, in the band of width 2
    first[:, :, 0, 6:10, 6:10] += 5.0  # and its middle, outside it
    band_share = (2 * 16) / (16 * 16 - 12 * 12)  # the top rows' part of the band's pixels
    expected = 0.1 * band_share / 4  # one pair of 4 off
    assert torch.allclose(border_change_error(first, video, 2), torch.tensor(expected)), expected
    vae = WanVAE(VAEConfig(generation="2.1", dim=4, z_dim=4, num_res_blocks=1))
    base = dict(vae=vae.config, latent_noise=0.0, latent_weight=0.0, object_weight=0.0, crop=0)
    with torch.no_grad():
        recon = vae.decode(vae.encode(video, chunked=False), chunked=False, clamp=False)
        plain, _ = vae_loss(vae, video, VAETrainConfig(**base, border_width=2))
        cfg = VAETrainConfig(**base, border_width=2, border_change_weight=3.0)
        weighted, parts = vae_loss(vae, video, cfg)
    term = border_change_error(recon, video, 2)
    assert term > 0 and abs(parts["change"] - term.item()) < 1e-6
    assert torch.allclose(weighted - plain, 3.0 * term, rtol=1e-4), (weighted - plain, term)


def test_anchor_holds_latent_frames_after_the_first_to_the_teachers():
    """`anchor_weight`'s term is 0 for the teacher's own latents and for latents that differ
    only in frame 0, and grows with a change of a later latent frame; vae_loss adds it."""
    from vidmoe.training.vae_train import anchor_distance, vae_loss

    torch.manual_seed(0)
    teacher = WanVAE(VAEConfig(generation="2.1", dim=4, z_dim=4, num_res_blocks=1))
    video = torch.rand(2, 3, 9, 16, 16) * 2 - 1  # (B, 3, T, H, W)
    with torch.no_grad():
        mu = teacher.encode(video, chunked=False)  # (B, Z, 3, h, w): raw, the config has no stats
        assert anchor_distance(mu, teacher, video) < 1e-10
        moved = mu.clone()
        moved[:, :, 0] += 5.0
        assert anchor_distance(moved, teacher, video) < 1e-10
        moved[:, :, 2] += 0.1
        small = anchor_distance(moved, teacher, video)
        moved[:, :, 2] += 0.9
        assert 0 < small < anchor_distance(moved, teacher, video)
    student = WanVAE(teacher.config)
    base = dict(vae=teacher.config, latent_noise=0.0)
    plain, parts = vae_loss(student, video, VAETrainConfig(**base), teacher)
    anchored, parts = vae_loss(student, video, VAETrainConfig(**base, anchor_weight=2.0), teacher)
    assert parts["anchor"] > 0
    assert torch.allclose(anchored, plain + 2.0 * parts["anchor"], rtol=1e-5)


def test_anchor_weight_is_checked(tmp_path):
    from vidmoe.training.vae_train import train_vae

    for key in ("anchor_weight", "first_latent_weight", "encoder_lr"):
        with pytest.raises(ValueError, match=f"{key} must be >= 0"):
            VAETrainConfig(**{key: -1.0})
        bank = {"first_latent_bank": "bank.safetensors"} if key == "first_latent_weight" else {}
        with pytest.raises(ValueError, match="freeze_encoder"):
            VAETrainConfig(**{key: 1.0}, **bank, freeze_encoder=True)
    cfg = VAETrainConfig(
        vae=VAEConfig(generation="2.1", dim=4, z_dim=4, num_res_blocks=1),
        anchor_weight=1.0,
        max_steps=1,
        width=16,
        height=16,
        clip_frames=5,
        window_frames=5,
        crop=0,
    )
    with pytest.raises(ValueError, match="give init"):
        train_vae(cfg, tmp_path / "out")


def _tiny_vae_config():
    return VAEConfig(generation="2.1", dim=4, z_dim=4, num_res_blocks=1)


def _encode_first(vae, frames):
    """The posterior means of single first frames: (N, 3, 1, H, W) -> (N, Z, 1, h, w)."""
    from vidmoe.training.first_latents import posterior_mean

    with torch.no_grad():
        return posterior_mean(vae, frames)


def test_inverted_first_latents_draw_the_frames_better_than_the_encoders():
    """`invert_first_latents` finds, per frame, a latent the frozen decoder draws the frame
    from with less error than from the encoder's own latent (issue 23's flash), and leaves the
    decoder's weights as they were."""
    from vidmoe.models.vae_blocks import CausalCache
    from vidmoe.training.first_latents import invert_first_latents

    torch.manual_seed(2)
    vae = WanVAE(_tiny_vae_config()).eval()
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    cache = CausalCache()
    cache.claim("decode")
    with torch.no_grad():  # frames this decoder can draw, from latents the encoder does not give
        frames = vae.decoder(vae.conv2(torch.randn(3, 4, 1, 2, 2) * 2), cache)  # (N, 3, 1, H, W)

    def error(z):
        cache = CausalCache()
        cache.claim("decode")
        with torch.no_grad():
            return (vae.decoder(vae.conv2(z), cache) - frames).abs().mean(dim=(1, 2, 3, 4))

    found = invert_first_latents(vae, frames, steps=60, lr=0.05, batch_size=2)
    assert found.shape == (3, 4, 1, 2, 2)
    assert (error(found) < 0.7 * error(_encode_first(vae, frames))).all()
    assert all(torch.equal(before[k], v) for k, v in vae.state_dict().items())


def _write_bank(path, frames, latents):
    from safetensors.torch import save_file

    save_file({"frames": frames.contiguous(), "latents": latents.contiguous()}, str(path))


def test_first_latent_bank_distance_is_zero_at_its_targets(tmp_path):
    from vidmoe.training.first_latents import FirstLatentBank

    torch.manual_seed(3)
    vae = WanVAE(_tiny_vae_config())
    frames = torch.rand(4, 3, 1, 16, 16) * 2 - 1
    mine = _encode_first(vae, frames)
    _write_bank(tmp_path / "bank.safetensors", frames, mine + torch.randn_like(mine) * 0.5)
    bank = FirstLatentBank.load(tmp_path / "bank.safetensors", vae.config, (16, 16))
    assert bank.distance(vae, np.arange(4)) > 1e-3
    exact = FirstLatentBank(frames, mine)
    assert exact.distance(vae, np.array([0, 2, 3])) < 1e-10


@pytest.mark.parametrize(
    "case, match",
    [
        ("missing", "does not exist"),
        ("not safetensors", "not a bank of first latents"),
        ("no latents", "not a bank of first latents"),
        ("wrong size", "do not fit this run"),
        ("other counts", "do not fit this run"),
    ],
)
def test_a_bad_first_latent_bank_is_refused_with_what_is_wanted(tmp_path, case, match):
    from safetensors.torch import save_file

    from vidmoe.training.first_latents import FirstLatentBank

    path = tmp_path / "bank.safetensors"
    frames, latents = torch.zeros(2, 3, 1, 16, 16), torch.zeros(2, 4, 1, 2, 2)
    if case == "not safetensors":
        path.write_bytes(b"not a safetensors file at all")
    elif case == "no latents":
        save_file({"frames": frames}, str(path))
    elif case == "wrong size":
        _write_bank(path, torch.zeros(2, 3, 1, 32, 32), torch.zeros(2, 4, 1, 4, 4))
    elif case == "other counts":
        _write_bank(path, frames, latents[:1])
    with pytest.raises(ValueError, match=match):
        FirstLatentBank.load(path, _tiny_vae_config(), (16, 16))


def _tiny_vae_run(**changes) -> VAETrainConfig:
    """A tiny VAE's training config on whole 16x16 frames, one window of 5, one step."""
    fields = dict(width=16, height=16, clip_frames=5, window_frames=5, crop=0, batch_size=1)
    fields |= dict(max_steps=1, num_stat_clips=1)
    return VAETrainConfig(vae=_tiny_vae_config(), **(fields | changes))


def _trained_tiny_vae(out_dir):
    """A one-step tiny VAE written to `out_dir` (the `init` of a stage); returns its config."""
    base = _tiny_vae_run()
    train_vae(base, out_dir, log=lambda s: None)
    return base


def test_a_first_latent_stage_moves_frame_0_toward_the_bank(tmp_path):
    """An encoder-only stage with `first_latent_weight` brings the encoder's latents of the
    bank's frames closer to the bank's targets."""
    from vidmoe.training.first_latents import FirstLatentBank

    base = _trained_tiny_vae(tmp_path / "a")
    init = tmp_path / "a" / "vae.safetensors"
    vae = WanVAE(_tiny_vae_config())
    from safetensors.torch import load_file

    vae.load_state_dict(load_file(str(init)))
    torch.manual_seed(4)
    frames = torch.rand(8, 3, 1, 16, 16) * 2 - 1
    start = _encode_first(vae, frames)
    _write_bank(tmp_path / "bank.safetensors", frames, start + 1.0)
    bank = FirstLatentBank.load(tmp_path / "bank.safetensors", vae.config, (16, 16))
    stage = dataclasses.replace(
        base,
        freeze_decoder=True,
        anchor_weight=1.0,
        first_latent_weight=10.0,
        first_latent_bank=str(tmp_path / "bank.safetensors"),
        first_latent_batch=8,
        lr=3e-3,
        max_steps=10,
    )
    lines = []
    trained, _ = train_vae(stage, tmp_path / "b", init=init, log=lines.append)
    assert any('"first"' in line for line in lines)
    assert bank.distance(trained, np.arange(8)) < 0.8 * bank.distance(vae, np.arange(8))
    with pytest.raises(ValueError, match="go together"):
        VAETrainConfig(first_latent_weight=1.0)
    with pytest.raises(ValueError, match="first_latent_batch must be >= 1"):
        VAETrainConfig(first_latent_batch=0)


def test_encoder_lr_puts_the_encoder_in_a_group_of_its_own():
    from vidmoe.training.vae_train import _param_groups

    vae = WanVAE(VAEConfig(generation="2.1", dim=4, z_dim=4, num_res_blocks=1))
    assert len(_param_groups(vae, VAETrainConfig(vae=vae.config))) == 1
    rest, enc = _param_groups(vae, VAETrainConfig(vae=vae.config, encoder_lr=3e-4))
    assert enc["lr"] == 3e-4 and "lr" not in rest
    encoder = {id(p) for m in (vae.encoder, vae.conv1) for p in m.parameters()}
    assert {id(p) for p in enc["params"]} == encoder
    assert len(rest["params"]) + len(enc["params"]) == len(list(vae.parameters()))


def test_vae_encoder_only_stage_keeps_the_decoder_and_holds_later_latents(tmp_path):
    """`freeze_decoder` with `anchor_weight` (issue 23's first-frame stage) trains the encoder
    alone from `init`: the decoder's weights stay init's, the encoder's move; and both frozen is
    refused."""
    from safetensors.torch import load_file

    base = _trained_tiny_vae(tmp_path / "a")
    stage = dataclasses.replace(
        base, freeze_decoder=True, anchor_weight=10.0, first_frame_weight=4.0, max_steps=2
    )
    lines = []
    train_vae(stage, tmp_path / "b", init=tmp_path / "a" / "vae.safetensors", log=lines.append)
    a = load_file(str(tmp_path / "a" / "vae.safetensors"))
    b = load_file(str(tmp_path / "b" / "vae.safetensors"))
    enc = [k for k in a if k.startswith(("encoder.", "conv1."))]
    dec = [k for k in a if k.startswith(("decoder.", "conv2."))]
    assert dec and all(torch.equal(a[k], b[k]) for k in dec)
    assert any(not torch.equal(a[k], b[k]) for k in enc)
    with pytest.raises(ValueError, match="leave nothing to train"):
        VAETrainConfig(freeze_encoder=True, freeze_decoder=True)


def test_a_first_frame_head_stage_trains_the_head_alone_from_an_init_without_one(tmp_path):
    """Encoder and decoder frozen with `vae.first_frame_head` (issue 23's flash): `init` has no
    head (it starts as the identity), every weight of init comes out the same bytes, the head's
    move, and the loss of frame 0 falls. A head-less VAE frozen both ways is still refused."""
    from safetensors.torch import load_file

    from vidmoe.training.vae_train import vae_loss

    base = _trained_tiny_vae(tmp_path / "a")
    config = dataclasses.replace(base.vae, first_frame_head=8)
    stage = dataclasses.replace(
        base, vae=config, freeze_encoder=True, freeze_decoder=True, lr=3e-3, max_steps=12,
        batch_size=2, first_frame_weight=4.0,
    )  # fmt: skip
    trained, out = train_vae(stage, tmp_path / "b", init=tmp_path / "a" / "vae.safetensors")
    a = load_file(str(tmp_path / "a" / "vae.safetensors"))
    b = load_file(str(tmp_path / "b" / "vae.safetensors"))
    head = [k for k in b if k.startswith("first_frame_head.")]
    assert head and set(b) - set(head) == set(a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert out.first_frame_head == 8
    torch.manual_seed(6)
    video = torch.rand(4, 3, 5, 16, 16) * 2 - 1
    start = WanVAE(config)
    start.load_state_dict(b | {k: torch.zeros_like(b[k]) for k in head})  # the head at its init
    with torch.no_grad():
        before, _ = vae_loss(start.eval(), video, stage)
        after, _ = vae_loss(trained, video, stage)
    assert float(after) < float(before)
    with pytest.raises(ValueError, match="leave nothing to train"):
        VAETrainConfig(freeze_encoder=True, freeze_decoder=True)


def test_a_stage_without_reconstruction_learns_from_its_targets_alone():
    """`reconstruction = false` leaves the decoder out of the loss (no l1, no mse: the latent
    penalty and the anchor only), and is refused where nothing would steer the encoder."""
    from vidmoe.training.vae_train import anchor_distance, vae_loss

    torch.manual_seed(5)
    teacher = WanVAE(_tiny_vae_config()).eval().requires_grad_(False)
    student = WanVAE(_tiny_vae_config())
    video = torch.rand(2, 3, 5, 16, 16) * 2 - 1
    cfg = VAETrainConfig(
        vae=teacher.config, freeze_decoder=True, anchor_weight=2.0, reconstruction=False
    )
    loss, parts = vae_loss(student, video, cfg, teacher)
    assert set(parts) == {"mu2", "anchor"}
    with torch.no_grad():
        mu = student.encode(video, chunked=False)  # raw: the config has no latent stats
        expected = cfg.latent_weight * mu.pow(2).mean() + 2.0 * anchor_distance(mu, teacher, video)
    assert torch.allclose(loss, expected, rtol=1e-5)
    loss.backward()
    assert all(p.grad is None for p in student.decoder.parameters())
    for bad in ({}, {"freeze_decoder": True}, {"anchor_weight": 1.0}):
        with pytest.raises(ValueError, match="reconstruction = false"):
            VAETrainConfig(reconstruction=False, **bad)
