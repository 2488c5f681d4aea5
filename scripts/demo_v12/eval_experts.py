"""usage: python eval_experts.py OUT_DIR [--base DIR] [--seeds 0,1] [--guidance 5,3]
       [--sampler euler] [--steps 25] [--shift 3] [NAME=EXPERT.safetensors ...]

A model folder (--base, default the repository's demo, src/vidmoe/assets/demo) with some
experts' weights replaced (e.g. `low_noise=runs/gpu/low_noise.safetensors`) and, optionally, other
sampling settings, copied to OUT_DIR when this starts and scored on the 128 held-out
prompts (`vidmoe.evaluation.prompt_set(128)`), one process per seed (1 thread each). Prints the
summary, what each shape is read as, and the direction misses by motion phrase; writes
OUT_DIR/eval.json (summary + every row)."""
import argparse, collections, json, os, shutil, subprocess, sys, time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "src/vidmoe/assets/demo"


def one_seed(model_dir, seed, out):
    import torch
    torch.set_num_threads(1)
    from vidmoe.evaluation import evaluate, prompt_set
    from vidmoe.loading import load_pipeline
    pipe = load_pipeline(model_dir, device="cpu", dtype="float32")
    res = evaluate(pipe, prompt_set(128), seeds=(seed,), name="demo")
    Path(out).write_text(json.dumps(res.rows))


def main():
    ap = argparse.ArgumentParser(usage=__doc__.split("\n\n")[0][len("usage: "):])
    ap.add_argument("out", type=Path)
    ap.add_argument("experts", nargs="*", metavar="NAME=EXPERT.safetensors")
    ap.add_argument("--base", type=Path, default=DEMO)
    ap.add_argument("--seeds", default=os.environ.get("SEEDS", "0,1"))
    ap.add_argument("--guidance", default=os.environ.get("GUIDANCE"))
    ap.add_argument("--sampler", choices=("euler", "unipc", "dpm++"))
    ap.add_argument("--steps", dest="num_steps", type=int)
    ap.add_argument("--shift", type=float)
    args = ap.parse_intermixed_args()
    out = args.out
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(args.base, out, ignore=shutil.ignore_patterns("*.toml"))
    for arg in args.experts:
        name, path = arg.split("=", 1)
        if not (out / "experts" / f"{name}.safetensors").is_file():
            sys.exit(f"the model has no expert {name!r}")
        shutil.copy(path, out / "experts" / f"{name}.safetensors")
    cfg = json.loads((out / "vidmoe.json").read_text())
    if args.guidance:
        cfg["moe"]["guidance"] = [float(g) for g in args.guidance.split(",")]
    scheduler = ("sampler", "num_steps", "shift")
    cfg["scheduler"].update({k: getattr(args, k) for k in scheduler if getattr(args, k) is not None})
    (out / "vidmoe.json").write_text(json.dumps(cfg, indent=2))
    settings = {"guidance": cfg["moe"]["guidance"], **{k: cfg["scheduler"][k] for k in scheduler}}
    seeds = [int(s) for s in args.seeds.split(",")]
    t = time.time()
    procs = [subprocess.Popen([sys.executable, __file__, "--seed", str(out), str(s),
                               str(out / f"rows_{s}.json")]) for s in seeds]
    if any(p.wait() for p in procs):
        sys.exit("an evaluation process failed")
    rows = [r for s in seeds for r in json.loads((out / f"rows_{s}.json").read_text())]
    from vidmoe.evaluation import EvalResult, HELD_OUT_MOTIONS, prompt_set
    res = EvalResult("demo", rows)
    summary = res.summary()
    items = {it.prompt: it for it in prompt_set(128)}
    shapes = collections.defaultdict(collections.Counter)
    phrases = collections.Counter()
    for r in rows:
        it = items[r["prompt"]]
        shapes[it.shape][r["read"][1]] += 1
        if not r["motion"]:
            phrases[next(p for p in HELD_OUT_MOTIONS[it.motion] if p in it.prompt)] += 1
    print(" ".join(args.experts) or str(args.base), json.dumps(settings), f"seeds {args.seeds}",
          json.dumps({k: round(v, 4) for k, v in summary.items()}), f"wall {time.time() - t:.0f} s")
    for shape, read in sorted(shapes.items()):
        print(f"  {shape}: {read[shape]}/{sum(read.values())} right; read as {dict(read.most_common())}")
    print("  direction misses by phrase:", dict(phrases.most_common()))
    (out / "eval.json").write_text(json.dumps({"settings": settings, "summary": summary, "rows": rows}, indent=1))


if __name__ == "__main__":
    if sys.argv[1] == "--seed":
        one_seed(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    else:
        main()
