"""usage: python plot_gpu_loss.py OUT.png RUN_DIR... : the velocity MSE (log.jsonl, 100-step means)
of gpu_train.py runs, one curve per run, later runs' steps placed after the earlier ones of the
same run name (so two phases of one expert read as one line with a restart)."""
import json, sys
from pathlib import Path

from vidmoe.io.plots import pyplot

plt = pyplot()
fig, ax = plt.subplots(figsize=(7, 4))
offset, lines = {}, {}
for folder in sys.argv[2:]:
    for log in sorted(Path(folder).glob("*/log.jsonl")):
        name = log.parent.name
        rows = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
        (expert,) = rows[0]["loss"]
        steps = [offset.get(name, 0) + r["step"] for r in rows]
        lines.setdefault(name, []).append((steps, [r["loss"][expert] for r in rows]))
        offset[name] = steps[-1]
for name, parts in lines.items():
    colour = None
    for steps, loss in parts:
        (line,) = ax.plot(steps, loss, color=colour, label=name if colour is None else None)
        colour = line.get_color()
        ax.axvline(steps[0], color=colour, linestyle=":", alpha=0.4)
ax.set(xlabel="GPU step (batch 128)", ylabel="velocity MSE (100-step mean)", yscale="log",
       title="demo v12: the GPU phases (dotted: each phase's start)")
ax.legend()
fig.savefig(sys.argv[1], dpi=100, bbox_inches="tight")
print("wrote", sys.argv[1])
