"""`load_pipeline` records what it loaded the same way on each of its paths (preset, folder,
disk, files): one tail writes `pipe.source`."""

import json

import pytest

from vidmoe.loading import DEMO_DIR, load_pipeline

KEYS = {
    "files",
    "residency",
    "device",
    "dtype",
    "text_encoder_device",
    "quantize",
    "attention",
    "compile",
    "lexicon",
}
HIGH, LOW = (
    DEMO_DIR / "experts" / "high_noise.safetensors",
    DEMO_DIR / "experts" / "low_noise.safetensors",
)
DEMO_FILES = {"expert.high_noise": str(HIGH), "expert.low_noise": str(LOW)}
DEMO_FILES["vae"] = str(DEMO_DIR / "vae.safetensors")

PATHS = {
    "preset": (dict(model="tiny-t2v"), {"preset": "tiny-t2v", "weights": "random (seed 0)"}, {}),
    "folder": (dict(model=None), {"path": str(DEMO_DIR), "layout": "vidmoe"}, DEMO_FILES),
    "disk": (
        dict(model=None, residency="disk"),
        {"path": str(DEMO_DIR), "layout": "vidmoe"},
        DEMO_FILES,
    ),
    "files": (dict(model=DEMO_DIR), {"path": str(DEMO_DIR), "layout": "vidmoe+files"}, DEMO_FILES),
}


@pytest.mark.parametrize("path", list(PATHS))
def test_every_load_path_records_the_same_keys(path, tmp_path):
    kwargs, own, files = PATHS[path]
    if path == "files":  # the low-noise expert from a file of its own
        copy = tmp_path / "low.safetensors"
        copy.write_bytes(LOW.read_bytes())
        kwargs = dict(kwargs, experts={"low_noise": copy})
        files = {**files, "expert.low_noise": str(copy)}
    residency = kwargs.pop("residency", "swap")
    pipe = load_pipeline(
        **kwargs,
        device="cpu",
        dtype="float32",
        residency=residency,
        quantize="fp8",
        text_encoder_device="cpu",
    )
    source = pipe.source
    assert set(source) == set(own) | KEYS, sorted(source)
    assert {k: source[k] for k in own} == own
    assert source["files"] == files
    assert source["residency"] == residency and source["quantize"] == "fp8"
    lexicon = None if path == "preset" else str(DEMO_DIR / "lexicon.json")
    assert source["lexicon"] == lexicon and (pipe.lexicon is None) == (lexicon is None)
    assert (source["device"], source["dtype"], source["text_encoder_device"]) == (
        "cpu",
        "float32",
        "cpu",
    )
    assert source["attention"] == dict.fromkeys(pipe.experts.expert_names, "sdpa")
    assert source["compile"] is None
    json.dumps(source)  # JSON-ready for the run's record


def test_the_record_follows_the_request():
    pipe = load_pipeline("tiny-t2v", device="cpu", dtype="bfloat16")
    source = pipe.source
    assert (source["residency"], source["quantize"], source["dtype"]) == (
        "resident",
        None,
        "bfloat16",
    )
    assert source["text_encoder_device"] is None and source["files"] == {}
