"""A tiny t2v pipeline for multi-process tests that starts fast: random experts and VAE, and a
text encoder of seeded byte embeddings (no transformers import, which costs each spawned rank
seconds)."""

import torch
from torch import nn

from vidmoe.models.text_encoder import ByteTokenizer
from vidmoe.models.transformer import WanTransformer
from vidmoe.models.vae import WanVAE
from vidmoe.presets import get_preset
from vidmoe.sampling.pipeline import Pipeline


class ByteEmbeddingEncoder(nn.Module):
    """Each UTF-8 byte of a prompt (then EOS) as a seeded random embedding: (S_i, text_dim)."""

    def __init__(self, text_dim: int, text_len: int):
        super().__init__()
        self.tokenize = ByteTokenizer(256, text_len)
        self.table = nn.Embedding(256, text_dim)

    def encode(self, prompts: list[str]) -> list[torch.Tensor]:
        ids, mask = self.tokenize(prompts)  # B S, B S
        return [e[:n] for e, n in zip(self.table(ids), mask.sum(1).tolist())]  # [S_i D]


def tiny_pipeline(seed: int = 0) -> Pipeline:
    config = get_preset("tiny-t2v")
    torch.manual_seed(seed)
    experts = {n: WanTransformer(config.transformer_for(n)) for n in config.moe.expert_names}
    for expert in experts.values():
        nn.init.normal_(expert.head.head.weight, std=0.02)  # the release init zeroes it
    text = ByteEmbeddingEncoder(config.transformer.text_dim, config.transformer.text_len)
    pipe = Pipeline(config, experts, WanVAE(config.vae), text.requires_grad_(False))
    pipe.source = {"preset": config.name, "weights": f"random (tests, seed {seed})"}
    return pipe
