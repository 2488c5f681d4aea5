"""One resolve_device for the loader, the CLI, the server and training."""

import pytest
import torch

from vidmoe.devices import resolve_device, resolve_dtype


def test_names_resolve_and_bad_ones_are_refused():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("gpu", "mps", "", 3):
        with pytest.raises(ValueError, match=r'device must be "cpu", "cuda", "cuda:N" or "auto"'):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="'cuda:1' needs CUDA, but torch sees no CUDA device"):
            resolve_device("cuda:1")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    with pytest.raises(ValueError, match="dtype must be one of auto, float32"):
        resolve_dtype("fp8", torch.device("cpu"))
