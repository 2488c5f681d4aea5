"""The report of `vidmoe eval`: markdown tables, the JSON of every clip, a PNG bar chart.

Works on `vidmoe.evaluation.EvalResult`s (a name and per-clip rows): adherence and the
first-frame change per variant and prompt set, what each asked shape was read as, and which
motion phrases missed their direction.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

KEYS = ("colour", "shape", "motion", "all")


def shape_readings(rows: list[dict]) -> dict[str, dict[str, int]]:
    """Per asked shape, how often each shape was read (None: no object found), most first."""
    read: dict[str, Counter] = {}
    for r in rows:
        read.setdefault(r["asked"][1], Counter())[str(r["read"][1])] += 1
    return {shape: dict(c.most_common()) for shape, c in sorted(read.items())}


def motion_misses(rows: list[dict]) -> dict[str, tuple[int, int]]:
    """Per motion phrase that missed at least once: (clips whose motion was read wrong, clips),
    most misses first."""
    clips, misses = Counter(), Counter()
    for r in rows:
        clips[r["motion_phrase"]] += 1
        misses[r["motion_phrase"]] += not r["motion"]
    return {p: (m, clips[p]) for p, m in misses.most_common() if m}


def _levels(s: dict, key: str) -> str:
    median, p90 = s[f"{key}_median"], s[f"{key}_p90"]
    return "-" if median is None else f"{median:.1f} / {p90:.1f}"


def markdown_table(results: list) -> str:
    """One line per variant and prompt set: adherence per attribute, the border's change from
    frame 0 to 1 and between later frames (median / p90 over clips), flicker, speed."""
    lines = [
        "| variant | held-out | colour | shape | motion | all three | frame 0->1 change "
        "| later change | flicker | s/clip | clips |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        for kind in r.kinds() or ["phrasings"]:
            s = r.summary(kind)
            cells = " | ".join(f"{s[k]:.0%}" for k in KEYS)
            lines.append(
                f"| {r.name} | {kind} | {cells} | {_levels(s, 'first_change')} "
                f"| {_levels(s, 'later_change')} | {s['flicker']:.2f} "
                f"| {s['seconds']:.2f} | {s['clips']} |"
            )
    return "\n".join(lines)


def markdown_details(results: list) -> str:
    """Per variant and prompt set: what each shape was read as; direction misses by phrase."""
    out = []
    for r in results:
        for kind in r.kinds():
            rows = r.select(kind)
            out += [
                f"### {r.name}, held-out {kind}",
                "",
                "| asked shape | right | read as |",
                "| --- | --- | --- |",
            ]
            for shape, read in shape_readings(rows).items():
                seen = ", ".join(f"{k} {v}" for k, v in read.items())
                out.append(f"| {shape} | {read.get(shape, 0)}/{sum(read.values())} | {seen} |")
            misses = motion_misses(rows)
            listed = ", ".join(f"'{p}' {m}/{n}" for p, (m, n) in misses.items()) or "none"
            out += ["", f"Motion misses by phrase: {listed}", ""]
    return "\n".join(out)


def as_json(results: list) -> dict:
    """Per variant: the summary over all clips, per prompt set, the readings and every row."""
    return {
        r.name: {
            "summary": r.summary(),
            "by_set": {k: r.summary(k) for k in r.kinds()},
            "shapes": {k: shape_readings(r.select(k)) for k in r.kinds()},
            "motion_misses": {k: motion_misses(r.select(k)) for k in r.kinds()},
            "rows": r.rows,
        }
        for r in results
    }


def dumps(results: list) -> str:
    """The summaries, per variant: over all clips and per prompt set."""
    out = {r.name: {**r.summary(), "by_set": {k: r.summary(k) for k in r.kinds()}} for r in results}
    return json.dumps(out, indent=2)


def write_report(results: list, out: Path, command: str) -> None:
    """Markdown tables + JSON rows + a PNG bar chart of adherence per variant and prompt set."""
    from vidmoe.io.atomic import atomic_write, write_text_atomic
    from vidmoe.io.video import write_json

    out = Path(out)
    text = f"Command: `{command}`\n\n{markdown_table(results)}\n\n{markdown_details(results)}\n"
    write_text_atomic(text, out.with_suffix(".md"))
    write_json(as_json(results), out.with_suffix(".json"))
    from vidmoe.io.plots import pyplot

    try:
        plt = pyplot()
    except ImportError:  # the tables are written; the bar chart is optional
        return
    bars = [(f"{r.name} ({k})", r.summary(k)) for r in results for k in r.kinds()]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(bars)), 3.5))
    width = 0.8 / len(KEYS)
    for i, k in enumerate(KEYS):
        ax.bar([j + i * width for j in range(len(bars))], [s[k] for _, s in bars], width, label=k)
    ticks = [j + 0.4 - width / 2 for j in range(len(bars))]
    ax.set_xticks(ticks, [name for name, _ in bars], rotation=20)
    ax.set_ylim(0, 1)
    ax.set_ylabel("adherence")
    ax.legend(ncol=4, fontsize=8)
    fig.tight_layout()
    atomic_write(out.with_suffix(".png"), lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
