"""umT5-XXL, the release's text encoder, run by transformers' `UMT5EncoderModel`: its
hyper-parameters, the release checkpoint's names mapped to transformers' (and back), the config
read from a state dict, loading from a release .pth, a .safetensors file or a diffusers folder,
the release's prompt cleaning, where a checkpoint folder keeps weights and tokenizer, and a tiny
random umT5 for tests. `vidmoe.models.text_encoder.build_text_encoder` builds the encoder.
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from vidmoe.io.layouts import RELEASE_T5_FILE, RELEASE_T5_SAFETENSORS, RELEASE_TOKENIZER_DIR

UMT5_XXL_HPARAMS = dict(
    vocab=256384,
    dim=4096,
    dim_attn=4096,
    dim_ffn=10240,
    num_heads=64,
    num_layers=24,
    num_buckets=32,
    shared_pos=False,
)
UMT5_TINY_HPARAMS = dict(
    vocab=384,
    dim=48,
    dim_attn=48,
    dim_ffn=96,
    num_heads=4,
    num_layers=2,
    num_buckets=32,
    shared_pos=False,
)

# release name inside `blocks.{i}.` -> HF name inside `encoder.block.{i}.`
_BLOCK_NAMES = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    # parity: the release computes fc1(x) * gelu_tanh(gate(x)); HF computes act(wi_0) * wi_1.
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_TIED = ("shared.weight", "encoder.embed_tokens.weight")


def _names_error(what: str, names: list[str]) -> ValueError:
    shown = ", ".join(sorted(names)[:12]) + (" ..." if len(names) > 12 else "")
    return ValueError(f"umT5 checkpoint: {len(names)} {what} tensor name(s): {shown}")


def release_umt5_to_hf(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Rename a release T5 encoder state dict (`wan/modules/t5.py` names) to HF UMT5 names.

    Pure: values (tensors or shapes) pass through untouched. The token embedding appears under
    both tied HF names; a shared position table (shared_pos=True) goes to every block.

    Raises:
        ValueError: listing unknown names, or names a complete encoder needs and lacks.
    """
    out, unknown, blocks = {}, [], set()
    shared_pos = state_dict.get("pos_embedding.embedding.weight")
    for name, value in state_dict.items():
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
        if name == "token_embedding.weight":
            out.update(dict.fromkeys(_TIED, value))
        elif name == "norm.weight":
            out["encoder.final_layer_norm.weight"] = value
        elif name == "pos_embedding.embedding.weight":
            continue
        elif m and m.group(2) in _BLOCK_NAMES:
            blocks.add(int(m.group(1)))
            out[f"encoder.block.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}"] = value
        else:
            unknown.append(name)
    if unknown:
        raise _names_error("unknown", unknown)
    per_block = [k for k in _BLOCK_NAMES if k != "pos_embedding.embedding.weight"]
    if shared_pos is None:
        per_block.append("pos_embedding.embedding.weight")
    num_layers = max(blocks) + 1 if blocks else 0
    expected = ["token_embedding.weight", "norm.weight"] + [
        f"blocks.{i}.{k}" for i in range(num_layers) for k in per_block
    ]
    missing = [k for k in expected if k not in state_dict]
    if missing or not num_layers:
        raise _names_error("missing", missing or ["blocks.0.*"])
    if shared_pos is not None:
        for i in range(num_layers):
            out[f"encoder.block.{i}.{_BLOCK_NAMES['pos_embedding.embedding.weight']}"] = shared_pos
    return out


# Prefixes before the HF names in ComfyUI files and in checkpoints that bundle the encoder.
COMFYUI_UMT5_PREFIXES = (
    "text_encoders.umt5xxl.transformer.",
    "umt5xxl.transformer.",
    "transformer.",
)
# Not weights: ComfyUI may carry the sentencepiece model as a uint8 tensor.
COMFYUI_UMT5_EXTRAS = ("spiece_model",)


def umt5_hf_names(names: list[str]) -> dict[str, str]:
    """HF UMT5 name -> the file's name, for a release T5 state dict (`token_embedding.weight`,
    `blocks.{i}.attn.q.weight`, ...) or an HF / ComfyUI one (`shared.weight`,
    `encoder.block.{i}.layer.0.SelfAttention.q.weight`, ... as ComfyUI's `umt5_xxl_fp16` and
    `umt5_xxl_fp8_e4m3fn_scaled` ship them, maybe behind a `COMFYUI_UMT5_PREFIXES` prefix).

    Raises:
        ValueError: listing names that are neither (or missing ones, for a release file).
    """
    names = [n for n in names if n not in COMFYUI_UMT5_EXTRAS]
    if "token_embedding.weight" in names:
        return release_umt5_to_hf({n: n for n in names})
    out, unknown = {}, []
    for name in names:
        hf = next((name[len(p) :] for p in COMFYUI_UMT5_PREFIXES if name.startswith(p)), name)
        ok = hf in _TIED or hf == "encoder.final_layer_norm.weight"
        m = re.fullmatch(r"encoder\.block\.\d+\.(.+)", hf)
        if ok or (m and m.group(1) in _BLOCK_NAMES.values()):
            out[hf] = name
        else:
            unknown.append(name)
    if unknown:
        raise _names_error("unknown", unknown)
    return out


def umt5_config(
    *,
    vocab: int,
    dim: int,
    dim_attn: int,
    dim_ffn: int,
    num_heads: int,
    num_layers: int,
    num_buckets: int,
    shared_pos: bool = False,
):
    """HF `UMT5Config` for the release T5 encoder's hyper-parameters (the golden files' names).

    `shared_pos` is accepted and ignored: a shared table is copied into every layer on load.
    """
    from transformers import UMT5Config

    del shared_pos
    if dim_attn % num_heads:
        raise ValueError(f"dim_attn ({dim_attn}) must be divisible by num_heads ({num_heads})")
    return UMT5Config(
        vocab_size=vocab,
        d_model=dim,
        d_kv=dim_attn // num_heads,
        d_ff=dim_ffn,
        num_heads=num_heads,
        num_layers=num_layers,
        relative_attention_num_buckets=num_buckets,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",  # gelu_new: tanh
        layer_norm_epsilon=1e-6,
        dropout_rate=0.0,
        attn_implementation="sdpa",
    )


def umt5_config_from_state_dict(hf_state_dict: Mapping[str, Any]):
    """Derive the HF `UMT5Config` from the shapes of an HF-named state dict (tensors or shapes)."""

    def shape(name: str) -> tuple[int, ...]:
        if name not in hf_state_dict:
            raise _names_error("missing", [name])
        v = hf_state_dict[name]
        return tuple(v.shape) if hasattr(v, "shape") else tuple(v)

    emb = "shared.weight" if "shared.weight" in hf_state_dict else _TIED[1]
    vocab, dim = shape(emb)
    prefix = "encoder.block.0.layer."
    num_buckets, num_heads = shape(prefix + "0.SelfAttention.relative_attention_bias.weight")
    q = re.compile(r"encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.q\.weight")
    num_layers = sum(1 for k in hf_state_dict if q.fullmatch(k))
    return umt5_config(
        vocab=vocab,
        dim=dim,
        dim_attn=shape(prefix + "0.SelfAttention.q.weight")[0],
        dim_ffn=shape(prefix + "1.DenseReluDense.wi_0.weight")[0],
        num_heads=num_heads,
        num_layers=num_layers,
        num_buckets=num_buckets,
    )


def load_umt5_state_dict(model, hf_state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load HF-named weights into a `UMT5EncoderModel` (may be on meta), strictly, then re-tie.

    Raises:
        ValueError: listing missing, unexpected or wrongly shaped names.
    """
    sd = dict(hf_state_dict)
    for a, b in (_TIED, _TIED[::-1]):  # files often carry only one of the tied names
        if a not in sd and b in sd:
            sd[a] = sd[b]
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want]
    if missing or unexpected:
        raise _names_error("missing" if missing else "unexpected", missing or unexpected)
    bad = [f"{k} {tuple(v.shape)} != {want[k]}" for k, v in sd.items() if tuple(v.shape) != want[k]]
    if bad:
        raise _names_error("wrongly shaped", bad)
    model.load_state_dict(sd, strict=True, assign=True)
    model.encoder.embed_tokens.weight = model.shared.weight


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """One .pth, one .safetensors, or every .safetensors shard in a folder (HF / diffusers)."""
    from safetensors.torch import load_file

    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise ValueError(f"no .safetensors files in {path}")
        return {k: v for f in files for k, v in load_file(str(f)).items()}
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def load_umt5_encoder(path: str | Path, *, device="cpu", dtype=torch.bfloat16):
    """A frozen `UMT5EncoderModel` from a release .pth, a .safetensors file (release or HF
    names) or a diffusers `text_encoder/` folder; built on meta, weights assigned, then moved."""
    from transformers import UMT5EncoderModel

    sd = _read_weights(Path(path))
    if "token_embedding.weight" in sd:
        sd = release_umt5_to_hf(sd)
    config = umt5_config_from_state_dict(sd)
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    load_umt5_state_dict(model, sd)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def tiny_umt5_encoder(seed: int = 0):
    """A tiny random umT5 encoder (`UMT5_TINY_HPARAMS`), seeded, without touching global RNG."""
    from transformers import UMT5EncoderModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = UMT5EncoderModel(umt5_config(**UMT5_TINY_HPARAMS))
    return model.eval().requires_grad_(False)


def clean_prompt(text: str) -> str:
    """parity: the release's tokenizer cleaning ('whitespace'): ftfy, html-unescape twice,
    collapse whitespace. ftfy also turns full-width punctuation (`，`) into ASCII."""
    try:
        import ftfy
    except ImportError as e:
        raise ImportError("umT5 prompt cleaning needs the package 'ftfy': pip install ftfy") from e
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


def umt5_paths(path: Path) -> tuple[Path, Path]:
    """(weights, tokenizer folder) of a release folder/.pth/.safetensors or a diffusers layout."""
    candidates = [
        (path / RELEASE_T5_FILE, path / RELEASE_TOKENIZER_DIR),  # release checkpoint folder
        (path / RELEASE_T5_SAFETENSORS, path / RELEASE_TOKENIZER_DIR),  # converted to it
        (path / "text_encoder", path / "tokenizer"),  # diffusers model folder
        (path, path.parent / "tokenizer"),  # diffusers text_encoder/ folder
        (path, path.parent / RELEASE_TOKENIZER_DIR),  # release .pth / .safetensors file
    ]
    for weights, tokenizer in candidates:
        is_weights = weights.is_file() or any(weights.glob("*.safetensors"))
        if weights.exists() and is_weights and tokenizer.is_dir():
            return weights, tokenizer
    raise ValueError(
        f"no umT5 weights + tokenizer found at {path}: give the release checkpoint folder (with "
        f"{RELEASE_T5_FILE} and {RELEASE_TOKENIZER_DIR}/), the .pth/.safetensors file beside "
        f"{RELEASE_TOKENIZER_DIR}/, or a diffusers folder with text_encoder/ and tokenizer/"
    )
