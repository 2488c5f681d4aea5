"""usage: [VOCABULARY=extended] python recaption.py SRC_CACHE OUT_DIR K [START]: a copy of a
demo world cache (`vidmoe.world.shapes.demo_world`, clips START...) with K
phrasings per clip, drawn from the world's `vocabulary` ("base" by default; see
vidmoe.world.labels.motion_phrases).

Every clip's first phrasing must name the colour, shape and motion of the caption the source
cache holds (else the clips are not the ones this world config makes, and it stops); with the
base vocabulary it must be that very caption."""
import json, os, sys, time, torch
torch.set_num_threads(1)
from vidmoe.models.text_encoder import build_text_encoder
from vidmoe.training.data import recaption_cache
from vidmoe.world.labels import parse_prompt
from vidmoe.world.shapes import demo_world
src, out, k = sys.argv[1], sys.argv[2], int(sys.argv[3])
start = int(sys.argv[4]) if len(sys.argv) > 4 else 0
vocabulary = os.environ.get("VOCABULARY", "base")
world = demo_world(vocabulary)
cached = [c if isinstance(c, str) else c[0] for c in json.loads(open(f"{src}/index.json").read())["captions"]]
variants = [world.captions(start + i, k) for i in range(len(cached))]


def key(text):
    """What a clip's first caption must share with the cached one: the text itself, or with
    another vocabulary the colour, shape and motion it names."""
    if vocabulary == "base":
        return text
    p = parse_prompt(text)
    return p.colour, p.shape, p.motion


wrong = [i for i, (c, v) in enumerate(zip(cached, variants)) if key(c) != key(v[0])]
if wrong:
    sys.exit(f"{len(wrong)} clips do not match this world (first: {wrong[0]}); wrong START?")
t = time.time()
recaption_cache(src, out, variants, build_text_encoder("minilm", max_length=32), progress=True)
print(len(variants), "clips x", k, "captions;", round(time.time() - t), "s", flush=True)
