"""Golden parity of the umT5 encoder (HF UMT5 + our name map) against the release T5Encoder."""

import json

import torch
from safetensors.torch import load_file

from vidmoe.models.umt5 import load_umt5_state_dict, release_umt5_to_hf, umt5_config


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def check_umt5_encoder(path, meta):
    from transformers import UMT5EncoderModel

    tensors = load_file(str(path))
    weights = {k[len("weight.") :]: v for k, v in tensors.items() if k.startswith("weight.")}
    model = UMT5EncoderModel(umt5_config(**json.loads(meta["config"]))).eval()
    load_umt5_state_dict(model, release_umt5_to_hf(weights))  # strict: all used, none missing
    ids, mask = tensors["input.ids"], tensors["input.mask"]
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state  # B S D
    ref = tensors["output.hidden"]
    for i, n in enumerate(mask.sum(dim=1).tolist()):
        err = rel_err(hidden[i, :n], ref[i, :n])
        assert err <= 1e-4, f"{path.name}: prompt {i} (len {n}) relative error {err:.2e} > 1e-4"
    # Padded query rows attend the same unmasked keys as in the release, so they match too.
    err = rel_err(hidden, ref)
    assert err <= 1e-4, f"{path.name}: all positions relative error {err:.2e} > 1e-4"


CHECKS = {"umt5_encoder": check_umt5_encoder}
