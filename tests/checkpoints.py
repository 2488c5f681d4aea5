"""Tiny random checkpoints written in the released layouts (official and diffusers), for tests."""

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from vidmoe.io.writers import write_diffusers_layout, write_official_layout
from vidmoe.loading import build_random_pipeline
from vidmoe.models.umt5 import (
    RELEASE_T5_FILE,
    RELEASE_TOKENIZER_DIR,
    UMT5_TINY_HPARAMS,
    release_umt5_to_hf,
    umt5_config,
)
from vidmoe.presets import PRESETS

WORDS = ["a", "red", "blue", "circle", "square", "moving", "to", "the", "right", "left", "cat"]


def save_word_tokenizer(folder: Path, words: list[str] = WORDS) -> None:
    """A tiny T5-style word-level tokenizer (pad 0, eos 1, unk 2) saved for AutoTokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2} | {w: i + 3 for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 1)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(str(folder))


def tiny_umt5_release_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random umT5 encoder (tiny hyper-parameters) under the release's T5 names."""
    from transformers import UMT5EncoderModel

    torch.manual_seed(seed)
    hf = UMT5EncoderModel(umt5_config(**UMT5_TINY_HPARAMS)).state_dict()
    release_names = {}
    probe = {}
    # invert the release -> HF map by mapping every candidate release name
    n = UMT5_TINY_HPARAMS["num_layers"]
    names = ["token_embedding.weight", "norm.weight"]
    for i in range(n):
        names += [
            f"blocks.{i}.{k}.weight"
            for k in (
                "norm1",
                "norm2",
                "attn.q",
                "attn.k",
                "attn.v",
                "attn.o",
                "ffn.gate.0",
                "ffn.fc1",
                "ffn.fc2",
                "pos_embedding.embedding",
            )
        ]
    probe = release_umt5_to_hf({name: name for name in names})
    for hf_name, release_name in probe.items():
        release_names[release_name] = hf[hf_name].clone()
    return release_names


def tiny_pipeline_weights(preset: str = "tiny-t2v", seed: int = 0):
    config = PRESETS[preset]
    # diffusers' transformer config has no text length: it is the release's 512 there
    config = dataclasses.replace(
        config, transformer=dataclasses.replace(config.transformer, text_len=512)
    )
    pipe = build_random_pipeline(config, seed=seed)
    experts = {
        n: {k: v.clone() for k, v in e.state_dict().items()} for n, e in pipe.experts.items()
    }
    vae = {k: v.clone() for k, v in pipe.vae.state_dict().items()}
    return pipe.config, experts, vae


def write_tiny_official(root: Path, preset: str = "tiny-t2v", seed: int = 0) -> Path:
    """A tiny model in the release folder layout, with a tiny umT5 and tokenizer."""
    config, experts, vae = tiny_pipeline_weights(preset, seed)
    write_official_layout(
        root,
        experts=experts,
        transformer=config.transformer,
        vae=vae,
        vae_generation=config.vae.generation,
        max_shard_bytes=400_000,
    )
    torch.save(tiny_umt5_release_weights(seed), root / RELEASE_T5_FILE)
    save_word_tokenizer(root / RELEASE_TOKENIZER_DIR)
    return root


def write_tiny_diffusers(
    root: Path, preset: str = "tiny-t2v", seed: int = 0, shift: float = 12.0
) -> Path:
    """The same tiny model in the diffusers folder layout, text encoder and scheduler included."""
    config, experts, vae = tiny_pipeline_weights(preset, seed)
    write_diffusers_layout(
        root,
        experts=experts,
        transformer=config.transformer,
        vae=vae,
        vae_config=config.vae,
        boundary_ratio=config.moe.boundaries[0],
    )
    hf = release_umt5_to_hf(tiny_umt5_release_weights(seed))
    (root / "text_encoder").mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in hf.items() if k != "shared.weight"},
        str(root / "text_encoder" / "model.safetensors"),
    )
    umt5_config(**UMT5_TINY_HPARAMS).save_pretrained(str(root / "text_encoder"))
    save_word_tokenizer(root / "tokenizer")
    (root / "scheduler").mkdir(exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(
            {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": shift, "flow_shift": shift}
        )
    )
    index = json.loads((root / "model_index.json").read_text())
    index.update(
        text_encoder=["transformers", "UMT5EncoderModel"],
        tokenizer=["transformers", "PreTrainedTokenizerFast"],
        scheduler=["diffusers", "FlowMatchEulerDiscreteScheduler"],
    )
    (root / "model_index.json").write_text(json.dumps(index))
    return root
