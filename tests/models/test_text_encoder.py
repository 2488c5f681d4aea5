"""Text encoders: the release umT5 name map, loading layouts, MiniLM and the tiny umT5."""

import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.checkpoints import save_word_tokenizer as _save_word_tokenizer
from vidmoe.models.text_encoder import (
    DEFAULT_NEGATIVE_PROMPT,
    TextEncoder,
    build_text_encoder,
    pad_text_embeddings,
)
from vidmoe.models.umt5 import (
    RELEASE_T5_FILE,
    RELEASE_TOKENIZER_DIR,
    UMT5_XXL_HPARAMS,
    clean_prompt,
    load_umt5_state_dict,
    release_umt5_to_hf,
    umt5_config,
    umt5_config_from_state_dict,
)

TINY = dict(vocab=64, dim=32, dim_attn=32, dim_ffn=48, num_heads=4, num_layers=2, num_buckets=32)


def _release_state_dict(shared_pos: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the release T5Encoder's names (TINY hyper-parameters)."""
    g = torch.Generator().manual_seed(seed)
    d, f, n, b = TINY["dim"], TINY["dim_ffn"], TINY["num_heads"], TINY["num_buckets"]
    shapes = {"token_embedding.weight": (TINY["vocab"], d), "norm.weight": (d,)}
    if shared_pos:
        shapes["pos_embedding.embedding.weight"] = (b, n)
    for i in range(TINY["num_layers"]):
        blk = {"norm1.weight": (d,), "norm2.weight": (d,), "ffn.gate.0.weight": (f, d)}
        blk |= {f"attn.{x}.weight": (d, d) for x in "qkvo"}
        blk |= {"ffn.fc1.weight": (f, d), "ffn.fc2.weight": (d, f)}
        if not shared_pos:
            blk["pos_embedding.embedding.weight"] = (b, n)
        shapes |= {f"blocks.{i}.{k}": s for k, s in blk.items()}
    return {k: torch.randn(s, generator=g) * 0.3 for k, s in shapes.items()}


def test_xxl_fixture_names_map_one_to_one_onto_hf_umt5(layout_fixture):
    from transformers import UMT5EncoderModel

    shapes = layout_fixture["umt5_xxl_encoder"]["tensors"]
    mapped = release_umt5_to_hf(shapes)
    config = umt5_config_from_state_dict(mapped)
    assert (config.vocab_size, config.d_model, config.d_ff) == (256384, 4096, 10240)
    assert (config.num_heads, config.d_kv, config.num_layers) == (64, 64, 24)
    assert config.relative_attention_num_buckets == 32
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v) for k, v in mapped.items()} == want
    # every release tensor is used exactly once (the token embedding under both tied names)
    assert len(mapped) == len(shapes) + 1
    unique = sum(p.numel() for p in model.parameters())
    assert unique == layout_fixture["umt5_xxl_encoder"]["num_params"]
    expected = umt5_config(**UMT5_XXL_HPARAMS)
    assert (expected.d_model, expected.d_kv, expected.num_layers) == (4096, 64, 24)


def test_unknown_and_missing_names_are_listed():
    sd = _release_state_dict()
    with pytest.raises(ValueError, match=r"unknown.*blocks\.0\.attn\.bias"):
        release_umt5_to_hf(sd | {"blocks.0.attn.bias": torch.zeros(1)})
    del sd["blocks.1.ffn.fc1.weight"]
    with pytest.raises(ValueError, match=r"missing.*blocks\.1\.ffn\.fc1\.weight"):
        release_umt5_to_hf(sd)


def test_load_rejects_wrong_shapes_and_missing_hf_names():
    from transformers import UMT5EncoderModel

    hf = release_umt5_to_hf(_release_state_dict())
    model = UMT5EncoderModel(umt5_config_from_state_dict(hf))
    bad = hf | {"encoder.final_layer_norm.weight": torch.ones(7)}
    with pytest.raises(ValueError, match="wrongly shaped.*final_layer_norm"):
        load_umt5_state_dict(model, bad)
    del hf["encoder.block.0.layer.0.SelfAttention.q.weight"]
    with pytest.raises(ValueError, match="missing.*SelfAttention.q.weight"):
        load_umt5_state_dict(model, hf)


def _reference_t5():
    """The release's wan/modules/t5.py, loaded alone (its package import needs CUDA)."""
    spec = importlib.util.find_spec("wan")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("reference package wan22 is not installed")
    folder = Path(list(spec.submodule_search_locations)[0]) / "modules"
    pkg = types.ModuleType("_wanref")
    pkg.__path__ = [str(folder)]
    sys.modules.setdefault("_wanref", pkg)
    mod_spec = importlib.util.spec_from_file_location("_wanref.t5", folder / "t5.py")
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules["_wanref.t5"] = module
    # T5EncoderModel's default argument calls torch.cuda.current_device() at class definition.
    original = torch.cuda.current_device
    torch.cuda.current_device = lambda: "cpu"
    try:
        mod_spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"reference t5.py could not be loaded on CPU: {e}")
    finally:
        torch.cuda.current_device = original
    return module


@pytest.mark.parametrize("shared_pos", [False, True])
def test_matches_reference_t5_encoder_beyond_max_distance(shared_pos):
    from transformers import UMT5EncoderModel

    ref = _reference_t5().T5Encoder(**TINY, shared_pos=shared_pos, dropout=0.0).eval()
    sd = ref.state_dict()
    model = UMT5EncoderModel(umt5_config(**TINY)).eval()
    load_umt5_state_dict(model, release_umt5_to_hf(sd))
    ids = torch.randint(2, TINY["vocab"], (2, 160))  # longer than max_distance 128
    mask = torch.ones_like(ids)
    mask[0, 100:] = 0
    with torch.no_grad():
        want = ref(ids, mask)
        got = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert ((got - want).norm() / want.norm()).item() < 1e-5


def test_release_and_diffusers_layouts_give_the_same_embeddings(tmp_path):
    sd = _release_state_dict(seed=1)
    release = tmp_path / "release"
    _save_word_tokenizer(release / RELEASE_TOKENIZER_DIR, ["a", "red", "circle", "moves"])
    torch.save(sd, release / RELEASE_T5_FILE)
    diffusers = tmp_path / "diffusers"
    (diffusers / "text_encoder").mkdir(parents=True)
    hf = {k: v.clone() for k, v in release_umt5_to_hf(sd).items() if k != "shared.weight"}
    save_file(hf, str(diffusers / "text_encoder" / "model.safetensors"))
    _save_word_tokenizer(diffusers / "tokenizer", ["a", "red", "circle", "moves"])

    prompts = ["a red   circle moves", "", "a"]
    kw = dict(dtype=torch.float32, max_length=16)
    out_a = build_text_encoder("umt5-xxl", release, **kw).encode(prompts)
    out_b = build_text_encoder("umt5-xxl", diffusers, **kw).encode(prompts)
    out_c = build_text_encoder("umt5-xxl", release / RELEASE_T5_FILE, **kw).encode(prompts)
    assert [e.shape for e in out_a] == [(5, 32), (1, 32), (2, 32)]  # words + EOS
    for a, b, c in zip(out_a, out_b, out_c):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, c)
    # padding to 512 or 16 does not change the true tokens' embeddings (padding is masked)
    out_d = build_text_encoder("umt5-xxl", release, dtype=torch.float32).encode(prompts)
    torch.testing.assert_close(out_a[0], out_d[0], rtol=1e-5, atol=1e-5)


def test_umt5_xxl_path_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="needs a path"):
        build_text_encoder("umt5-xxl")
    with pytest.raises(ValueError, match="text_encoder/ and tokenizer/"):
        build_text_encoder("umt5-xxl", tmp_path)
    with pytest.raises(ValueError, match="known: 'umt5-xxl'"):
        build_text_encoder("clip")


def test_release_prompt_cleaning():
    assert clean_prompt("  a\n\tred  &amp;amp; blue ") == "a red & blue"
    cleaned = clean_prompt(DEFAULT_NEGATIVE_PROMPT)
    assert cleaned.startswith("色调艳丽,过曝,") and "，" not in cleaned  # ftfy: full-width -> ASCII


def test_tiny_umt5_is_seeded_and_byte_level():
    a = build_text_encoder("umt5-tiny")
    b = build_text_encoder("umt5-tiny")
    assert isinstance(a, TextEncoder) and a.text_dim == 48
    prompts = ["a red circle", "", "é" * 40]
    out_a, out_b = a.encode(prompts), b.encode(prompts)
    assert [e.shape[0] for e in out_a] == [13, 1, 32]  # 12 bytes + EOS; EOS; truncated at 32
    assert all(e.dtype == torch.float32 for e in out_a)
    for x, y in zip(out_a, out_b):
        assert torch.equal(x, y)
    # batching does not change a prompt's embedding
    torch.testing.assert_close(a.encode(["a red circle"])[0], out_a[0])
    emb, lengths = pad_text_embeddings(out_a, 32)
    assert emb.shape == (3, 32, 48) and lengths.tolist() == [13, 1, 32]
    assert emb[0, 13:].abs().sum() == 0
    with pytest.raises(ValueError, match="text_len 8"):
        pad_text_embeddings(out_a, 8)


@pytest.fixture(scope="module")
def minilm():
    return build_text_encoder("minilm")


def test_minilm_is_deterministic_and_cut_to_length(minilm):
    prompts = ["a red circle moves left", "a blue circle moves left", ""]
    out = minilm.encode(prompts)
    assert minilm.text_dim == 384 and isinstance(minilm, TextEncoder)
    assert [e.shape for e in out] == [(7, 384), (7, 384), (2, 384)]  # [CLS] words [SEP]
    for x, y in zip(out, minilm.encode(prompts)):
        assert torch.equal(x, y)
    assert not torch.allclose(out[0], out[1], atol=1e-3)
    red, blue = minilm.encode(["red"]), minilm.encode(["blue"])
    assert (red[0] - blue[0]).abs().max() > 1e-2


def test_minilm_truncates_to_max_length():
    enc = build_text_encoder("minilm", max_length=8)
    (emb,) = enc.encode(["one two three four five six seven eight nine ten"])
    assert emb.shape == (8, 384)
