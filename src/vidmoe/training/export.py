"""Export training runs as a model folder (`vidmoe export`): the runs' EMA expert weights, a VAE
folder and a model config (sampling defaults, text encoder) make a folder that
`vidmoe.load_pipeline` reads and that a fine-tuning run can start from (`init`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def read_model_template(path: str | Path) -> dict:
    """The dict of a model config file (a vidmoe.json; its "vae" table may be left out) or of a
    model folder's vidmoe.json."""
    from vidmoe.io.layouts import read_json

    path = Path(path)
    return read_json(path / "vidmoe.json" if path.is_dir() else path, "model config")


def export_runs(
    out_dir: str | Path,
    runs: list[str | Path],
    *,
    config: str | Path,
    vae: str | Path,
    use_ema: bool = True,
    experts_from: str | Path | None = None,
) -> Path:
    """Write the experts of `runs` (run folders or their checkpoint.pt; together every expert of
    the model once, or with `experts_from` a model folder that gives the experts no run trained),
    the VAE of the folder `vae` and the model config `config` (its VAE table taken from `vae`) as
    a vidmoe model folder at `out_dir`; experts in bf16, the VAE in fp32. A model folder given as
    `config` also gives its prompt lexicon (`lexicon.json`), which belongs to its captions."""
    import dataclasses

    from vidmoe.config import ModelConfig
    from vidmoe.io.atomic import write_text_atomic
    from vidmoe.sampling.rewrite import LEXICON_FILE
    from vidmoe.training.cache import read_vae_folder
    from vidmoe.training.checkpoint import export_model

    if not runs:
        raise ValueError("name the training runs to export (their out_dir folders)")
    checkpoints = []
    for run in map(Path, runs):
        ckpt = run / "checkpoint.pt" if run.is_dir() else run
        if not ckpt.is_file():
            raise ValueError(f"{run} holds no training checkpoint (checkpoint.pt): train it first")
        checkpoints.append(ckpt)
    vae_config, vae_state = read_vae_folder(vae)
    d = read_model_template(config)
    d["vae"] = dataclasses.asdict(vae_config)
    try:
        model_config = ModelConfig.from_json(json.dumps(d))
    except (KeyError, TypeError) as e:
        raise ValueError(f"model config {config} is not a vidmoe model config: {e!r}") from None
    out = export_model(
        checkpoints,
        model_config,
        vae_state,
        out_dir,
        use_ema=use_ema,
        dtype=torch.bfloat16,
        experts_from=experts_from,
    )
    lexicon = Path(config) / LEXICON_FILE
    if lexicon.is_file():
        write_text_atomic(lexicon.read_text(), out / LEXICON_FILE)
    return out
