"""Merge latent caches: python merge_caches.py OUT IN1 IN2 ... (moves shards)."""
import json, shutil, sys
from pathlib import Path
out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
index = {"shards": [], "captions": [], "skipped": 0}
for i, src in enumerate(map(Path, sys.argv[2:])):
    idx = json.loads((src / "index.json").read_text())
    for s in idx["shards"]:
        name = f"part{i}_{s['file']}"
        shutil.move(str(src / s["file"]), str(out / name))
        index["shards"].append({"file": name, "num_clips": s["num_clips"]})
    index["captions"] += idx["captions"]; index["skipped"] += idx["skipped"]; index["text_len"] = idx["text_len"]
    shutil.copy(src / "empty_prompt.safetensors", out / "empty_prompt.safetensors")
(out / "index.json").write_text(json.dumps(index, indent=1))
print(len(index["captions"]), "clips")
