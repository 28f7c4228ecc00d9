"""Tables and charts of a quality run, from its JSON (``results/<suite>.json``): the JSON is the record,
and the Markdown and PNG files can be rebuilt from it alone (``python benchmarks/quality/run.py --report``)."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REFERENCES = ("start", "individual", "multitask")
HEAD_WORDS = {"probe": "Every task's head is a linear probe of the start, frozen while fine-tuning.",
              "random": "Every task's head is a fixed random head, frozen while fine-tuning (the start is at "
                        "chance)."}
# FusionBench, CLIP ViT-B/32 on eight vision tasks, absolute accuracy (the reading of the literature):
# average 66.5 < task arithmetic 68.0 < Fisher 70.6 < TIES 72.2 < RegMean 82.4 < multitask 88.6 < individual 90.3
LITERATURE = (("linear", 66.5), ("task_arithmetic", 68.0), ("fisher", 70.6), ("ties", 72.2), ("regmean", 82.4),
              ("multitask", 88.6), ("individual", 90.3))
TARGET_ABOVE_TIES = 5.0  # normalised points: the project's target for the best data-aware merge
TARGET_BELOW_MULTITASK = 5.0


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def spread(values: list[float]) -> float:
    """Sample standard deviation over seeds (0 for one seed)."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def row_stats(results: dict[str, Any], row: str) -> dict[str, Any]:
    """Mean and spread over seeds of a row's average absolute and normalised test accuracy (in %)."""
    tasks = results["tasks"]
    absolute, normalised = [], []
    for seed in results["per_seed"]:
        scores, own = seed["test"][row], seed["test"]["individual"]
        absolute.append(100 * mean([scores[t] for t in tasks]))
        normalised.append(100 * mean([scores[t] / own[t] for t in tasks]))
    per_task = {t: 100 * mean([s["test"][row][t] / s["test"]["individual"][t] for s in results["per_seed"]])
                for t in tasks}
    return {"absolute": mean(absolute), "absolute_spread": spread(absolute), "normalised": mean(normalised),
            "normalised_spread": spread(normalised), "per_task": per_task}


def min_gain(results: dict[str, Any]) -> float:
    """The smallest fine-tune gain over the start on its own task, in test accuracy points."""
    return min(100 * (s["test"]["individual"][t] - s["test"]["start"][t]) for s in results["per_seed"]
               for t in results["tasks"])


def merge_rows(results: dict[str, Any]) -> list[str]:
    return [row["label"] for row in results["rows"]]


def data_aware(results: dict[str, Any]) -> set[str]:
    return {row["label"] for row in results["rows"] if row["data_aware"]}


def row_kind(results: dict[str, Any], row: str) -> str:
    """reference, tuned on damage, tuned on validation, data-aware or data-free."""
    if row in REFERENCES:
        return "reference"
    info = next(r for r in results["rows"] if r["label"] == row)
    tune = info.get("tune")
    if tune:
        return "tuned on validation" if "data" in tune else "tuned on damage"
    return "data-aware" if info["data_aware"] else "data-free"


# ---- predicted damage against measured loss ----------------------------------------------------------------

def ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks of ``values``; tied values share the mean of the ranks they span (Spearman's convention)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for k in range(start, end + 1):
            out[order[k]] = (start + end) / 2 + 1
        start = end + 1
    return out


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson's correlation; NaN for fewer than two points or a constant side (no ranking to compare)."""
    if len(x) != len(y):
        raise ValueError(f"pearson: {len(x)} x values against {len(y)} y values; give one y per x")
    n = len(x)
    if n < 2:
        return math.nan
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation: Pearson's correlation of the average ranks."""
    return pearson(ranks(x), ranks(y))


def accuracy_loss(seed: dict[str, Any], row: str, task: str) -> float:
    """1 − the row's test accuracy ÷ the task's own fine-tune's: the share of the fine-tune's accuracy lost."""
    return 1.0 - seed["test"][row][task] / seed["test"]["individual"][task]


def damage_points(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every (row, task, seed) with a predicted normalised damage, beside its measured accuracy loss."""
    points = []
    for seed_id, seed in zip(results["seeds"], results["per_seed"]):
        for row, per_task in seed.get("damage", {}).items():
            for task, damage in per_task.items():
                if damage is not None and row in seed["test"]:
                    points.append({"row": row, "task": task, "seed": seed_id, "damage": damage,
                                   "loss": accuracy_loss(seed, row, task)})
    return points


MIN_GROUP = 3  # rows a (task, seed) needs for its within-group correlation to rank anything


def damage_correlation(results: dict[str, Any]) -> dict[str, Any]:
    """How predicted normalised damage ranks measured accuracy loss: Spearman's ρ over every point; the mean ρ
    within each (task, seed) across rows (how well it orders merges of one task), per task too; and ρ between
    the rows' mean damage and mean loss (how well it orders methods)."""
    points = damage_points(results)
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for p in points:
        groups.setdefault((p["task"], p["seed"]), []).append(p)
    within = {key: spearman([p["damage"] for p in g], [p["loss"] for p in g])
              for key, g in groups.items() if len(g) >= MIN_GROUP}
    within = {key: rho for key, rho in within.items() if not math.isnan(rho)}
    per_task = {}
    for task in results["tasks"]:
        values = [rho for (t, _), rho in within.items() if t == task]
        if values:
            per_task[task] = mean(values)
    rows = sorted({p["row"] for p in points})
    row_damage = [mean([p["damage"] for p in points if p["row"] == r]) for r in rows]
    row_loss = [mean([p["loss"] for p in points if p["row"] == r]) for r in rows]
    return {"pooled": spearman([p["damage"] for p in points], [p["loss"] for p in points]), "points": len(points),
            "within": mean(list(within.values())) if within else math.nan, "groups": len(within),
            "group_sizes": sorted({len(groups[key]) for key in within}), "per_task": per_task,
            "by_row": spearman(row_damage, row_loss), "rows": len(rows),
            "row_means": dict(zip(rows, zip(row_damage, row_loss)))}


def damage_section(results: dict[str, Any]) -> list[str]:
    """The report's account of predicted damage against measured loss (nothing when no row has damage)."""
    c = damage_correlation(results)
    if not c["points"]:
        return []
    sizes = c["group_sizes"] or [0]
    size_words = str(sizes[0]) if len(sizes) == 1 else f"{sizes[0]}–{sizes[-1]}"
    out = ["", "## Predicted damage against measured loss", "",
           "Each merge row's chosen point is judged by `mergesmith.predict_damage` (every fine-tune's sidecar and "
           "the start in the recipe, whatever the method reads): per task the predicted loss increase ÷ its "
           "forgetting (the normalised damage, docs/damage.md), set against the measured accuracy loss 1 − test "
           "accuracy ÷ the task's own fine-tune's. Spearman's rank correlation (average ranks for ties):", "",
           f"- over all {c['points']} (row, task, seed) points: ρ = {c['pooled']:.2f};",
           f"- within each (task, seed), across its {size_words} rows, averaged over {c['groups']} groups: "
           f"ρ = {c['within']:.2f} (how well it orders the merges of one task);",
           f"- between the {c['rows']} rows' means over tasks and seeds: ρ = {c['by_row']:.2f} (how well it orders "
           f"methods).", "",
           "| task | ρ within the task (mean over seeds) |", "|---|---:|"]
    out += [f"| {task} | {rho:.2f} |" for task, rho in c["per_task"].items()]
    out += ["", "| merge | predicted normalised damage | accuracy loss % |", "|---|---:|---:|"]
    for row, (damage, loss) in sorted(c["row_means"].items(), key=lambda kv: kv[1][0]):
        out.append(f"| {row} | {damage:.3f} | {100 * loss:.1f} |")
    return out


def reading(results: dict[str, Any]) -> list[str]:
    """The ordering check against the literature and the project target, in sentences with the numbers."""
    rows = merge_rows(results)
    stats = {row: row_stats(results, row) for row in (*REFERENCES, *rows)}
    lines = []
    chain = [(name, stats[name]["absolute"]) for name, _ in LITERATURE if name in stats]
    held = [f"{a} {x:.1f} {'≤' if x <= y else '>'} {b} {y:.1f}" for (a, x), (b, y) in zip(chain, chain[1:])]
    broken = [h for h in held if " > " in h]
    lines.append(f"Literature's order (average < task arithmetic < Fisher < TIES < RegMean < multitask < individual, "
                 f"absolute accuracy): {'held' if not broken else f'did not hold ({len(broken)} of {len(held)} steps)'}"
                 f" — {'; '.join(held)}.")
    aware = sorted(data_aware(results) & set(rows), key=lambda r: -stats[r]["normalised"])
    free = sorted(set(rows) - data_aware(results), key=lambda r: -stats[r]["normalised"])
    if aware and free:
        best_aware, best_free = aware[0], free[0]
        ahead = stats[best_aware]["normalised"] - stats[best_free]["normalised"]
        lines.append(f"Data-aware ahead of data-free: {'yes' if ahead > 0 else 'no'} — best data-aware {best_aware} "
                     f"{stats[best_aware]['normalised']:.1f}, best data-free {best_free} "
                     f"{stats[best_free]['normalised']:.1f} normalised ({ahead:+.1f} points).")
        if "ties" in stats:
            above = stats[best_aware]["normalised"] - stats["ties"]["normalised"]
            below = stats["multitask"]["normalised"] - stats[best_aware]["normalised"]
            met = above >= TARGET_ABOVE_TIES and below <= TARGET_BELOW_MULTITASK
            lines.append(f"Project target (best data-aware ≥ {TARGET_ABOVE_TIES:.0f} points above TIES and within "
                         f"{TARGET_BELOW_MULTITASK:.0f} of multitask): {'met' if met else 'not met'} — {best_aware} is "
                         f"{above:+.1f} points from TIES and {below:.1f} below multitask.")
    gap = gap_closed(stats, rows, tuned_rows(results))
    if gap:
        lines.append(gap)
    return lines


def tuned_rows(results: dict[str, Any]) -> set[str]:
    """The rows tuned on predicted damage (not those tuned on validation data: their tune: has data)."""
    return {row["label"] for row in results["rows"] if row.get("tune") and "data" not in row["tune"]}


def gap_closed(stats: dict[str, dict[str, Any]], rows: list[str], tuned: set[str]) -> str:
    """How much of the distance from TIES to the multitask model the best row, and the best row tuned on
    damage, cover: (row − TIES) ÷ (multitask − TIES), normalised accuracy ("" without TIES or a gap)."""
    if "ties" not in stats or not rows:
        return ""
    ties, gap = stats["ties"]["normalised"], stats["multitask"]["normalised"] - stats["ties"]["normalised"]
    if gap <= 0:
        return ""

    def share(row: str) -> str:
        return f"{row} {stats[row]['normalised']:.1f} closes {(stats[row]['normalised'] - ties) / gap:.0%}"

    best = max(rows, key=lambda r: stats[r]["normalised"])
    line = f"Gap from TIES ({ties:.1f}) to multitask ({stats['multitask']['normalised']:.1f}): best row {share(best)}"
    if tuned & set(rows):
        line += f"; best row tuned on damage {share(max(tuned & set(rows), key=lambda r: stats[r]['normalised']))}"
    return line + "."


def _seeds_words(seeds: list[int]) -> str:
    """"Seed 1 was" / "Seeds 1, 2 were": the subject of a seed addition's line."""
    return f"Seed {seeds[0]} was" if len(seeds) == 1 else f"Seeds {', '.join(map(str, seeds))} were"


def markdown(results: dict[str, Any]) -> str:
    tasks, rows = results["tasks"], merge_rows(results)
    seeds = len(results["per_seed"])
    info = {row["label"]: row for row in results["rows"]}
    merge_seconds = {r: mean([s["merge_seconds"][r] for s in results["per_seed"]]) for r in rows}
    planned = results.get("planned_seeds", results["seeds"])
    partial = f" (partial: {seeds} of {len(planned)} seeds)" if seeds < len(planned) else ""
    out = [f"# Quality benchmark: {results['suite']} suite{' (quick)' if results['quick'] else ''}{partial}", "",
           f"{results['model']}; {len(tasks)} tasks, {seeds} seed{'s' * (seeds > 1)} "
           f"(seed = data split and fine-tuning seed); test accuracy, mean ± sample standard deviation over seeds. "
           f"Normalised = accuracy ÷ the task's own fine-tune's accuracy, averaged over tasks. Each merge's "
           f"hyper-parameters are the grid point with the best normalised validation accuracy. "
           f"{HEAD_WORDS[results.get('settings', {}).get('heads', 'probe')]}", "",
           f"Reproduce: `{results['command']}` ({results['wall_seconds'] / 60:.1f} min on {results['machine']}).",
           *[f"Rows {', '.join(a['rows'])} were added by `{a['command']}` on the same fine-tunes "
             f"({a['merge_and_score_seconds'] / 60:.1f} min of merging and scoring)." if "rows" in a else
             f"{_seeds_words(a['seeds'])} added by `{a['command']}` ({a['seconds'] / 60:.1f} min on "
             f"{a['machine']})."
             for a in results.get("additions", [])], "",
           "| model | kind | grid | normalised % | absolute % | merge s |", "|---|---|---:|---:|---:|---:|"]
    order = [*REFERENCES, *sorted(rows, key=lambda r: -row_stats(results, r)["normalised"])]
    for row in order:
        s = row_stats(results, row)
        kind = row_kind(results, row)
        grid = str(len(info[row]["grid"])) if row in info else ""
        seconds = f"{merge_seconds[row]:.1f}" if row in merge_seconds else ""
        out.append(f"| {row} | {kind} | {grid} | {s['normalised']:.1f} ± {s['normalised_spread']:.1f} | "
                   f"{s['absolute']:.1f} ± {s['absolute_spread']:.1f} | {seconds} |")
    no_gain = [f"{t} (seed {results['seeds'][i]})" for i, s in enumerate(results["per_seed"])
               for t in s.get("no_gain", [])]
    gains = ([f"Every fine-tune beat the start on its own task (smallest gain "
              f"{min_gain(results):.1f} points)."] if not no_gain else
             [f"Fine-tunes that did not beat the start on their own task: {', '.join(no_gain)}."])
    out += ["", "## Reading", "", *[f"- {line}" for line in gains + reading(results)], *damage_section(results), "",
            "## Per task (normalised %, mean over seeds)", "",
            "| model | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
    for row in order:
        per_task = row_stats(results, row)["per_task"]
        out.append(f"| {row} | " + " | ".join(f"{per_task[t]:.1f}" for t in tasks) + " |")
    out += ["", "## Absolute test accuracy of the references (%, mean over seeds)", "",
            "| task | classes | start | individual | multitask |", "|---|---:|---:|---:|---:|"]
    for t in tasks:
        cells = [100 * mean([s["test"][r][t] for s in results["per_seed"]]) for r in REFERENCES]
        out.append(f"| {t} | {results['classes'][t]} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
    out += ["", "## Chosen hyper-parameters (per seed)", "", "| merge | grid | chosen |", "|---|---|---|"]
    for row in rows:
        chosen = "; ".join(_point(s["chosen"][row]) for s in results["per_seed"])
        out.append(f"| {row} | {'; '.join(_point(p) for p in info[row]['grid'])} | {chosen} |")
    notes = {}
    for seed in results["per_seed"]:
        for row, counts in seed.get("warnings", {}).items():
            for text, times in counts.items():
                notes.setdefault(row, {}).setdefault(text, 0)
                notes[row][text] += times
    if notes:
        out += ["", "## Warnings during the merges (all seeds and grid points)", ""]
        for row, counts in notes.items():
            out += [f"- {row}: " + "; ".join(f"{text} (×{times})" for text, times in counts.items())]
    timing = results["seconds"]
    out += ["", "## Time", "",
            f"Fine-tuning {timing['fine_tune']:.0f} s, multitask {timing['multitask']:.0f} s, measuring statistics "
            f"{timing['measure']:.0f} s (once per fine-tune, shared by every data-aware merge), merging and scoring "
            f"{timing['merge_and_score']:.0f} s; whole run {results['wall_seconds']:.0f} s.", ""]
    for label, text in results.get("sources", {}).items():
        out.append(f"- {label}: {text}")
    return "\n".join(out) + "\n"


def _point(point: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_number(v)}" for k, v in point.items()) or "—"


def _number(value: Any) -> str:
    if isinstance(value, list):  # a tuned per-model value: one per task, in the tasks' order
        return "[" + ", ".join(f"{v:.3g}" for v in value) + "]"
    return f"{value:g}" if isinstance(value, float) else str(value).lower() if isinstance(value, bool) else str(value)


def charts(results: dict[str, Any], directory: Path) -> list[Path]:
    """``<suite>.png`` (normalised accuracy by method, with the references as lines) and
    ``<suite>-time.png`` (normalised accuracy against merge time)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(merge_rows(results), key=lambda r: -row_stats(results, r)["normalised"])
    aware = data_aware(results)
    stats = {r: row_stats(results, r) for r in (*REFERENCES, *rows)}
    suite = results["suite"]
    paths = [directory / f"{suite}.png", directory / f"{suite}-time.png"]

    figure, axes = plt.subplots(figsize=(max(6.0, 0.55 * len(rows) + 2), 4.2), dpi=110)
    colours = ["tab:orange" if r in aware else "tab:blue" for r in rows]
    axes.bar(range(len(rows)), [stats[r]["normalised"] for r in rows],
             yerr=[stats[r]["normalised_spread"] for r in rows], color=colours, capsize=3)
    for name, style in (("individual", "-"), ("multitask", "--"), ("start", ":")):
        axes.axhline(stats[name]["normalised"], color="black", linestyle=style, linewidth=1,
                     label=f"{name} {stats[name]['normalised']:.1f}")
    axes.set_xticks(range(len(rows)), rows, rotation=40, ha="right")
    axes.set_ylabel("normalised test accuracy (%)")
    low = min(stats["start"]["normalised"], *(stats[r]["normalised"] for r in rows))
    axes.set_ylim(max(0.0, math.floor(low / 10) * 10 - 5), 102)
    from matplotlib.patches import Patch

    handles = [*axes.get_legend_handles_labels()[0], Patch(color="tab:orange", label="data-aware"),
               Patch(color="tab:blue", label="data-free")]
    axes.legend(handles=handles, fontsize=7, loc="lower left")
    seeds = len(results["per_seed"])
    axes.set_title(f"{suite}: {len(results['tasks'])} tasks, {seeds} seed{'s' * (seeds > 1)} (mean ± s.d.)",
                   fontsize=10)
    figure.tight_layout()
    figure.savefig(paths[0])
    plt.close(figure)

    figure, axes = plt.subplots(figsize=(6.0, 4.2), dpi=110)
    for rank, r in enumerate(rows):
        seconds = mean([s["merge_seconds"][r] for s in results["per_seed"]])
        axes.errorbar(seconds, stats[r]["normalised"], yerr=stats[r]["normalised_spread"], fmt="o",
                      color="tab:orange" if r in aware else "tab:blue", capsize=2)
        # neighbours in quality get labels at alternating heights, so that close points stay readable
        axes.annotate(r, (seconds, stats[r]["normalised"]), fontsize=6.5, xytext=(4, (rank % 3 - 1) * 7),
                      textcoords="offset points", va="center")
    axes.axhline(stats["multitask"]["normalised"], color="black", linestyle="--", linewidth=1, label="multitask")
    axes.set_xscale("log")
    axes.set_xlabel("merge time per merge (s, log scale; statistics measured once, not included)")
    axes.set_ylabel("normalised test accuracy (%)")
    axes.legend(fontsize=7)
    axes.set_title(f"{suite}: quality against merge time", fontsize=10)
    figure.tight_layout()
    figure.savefig(paths[1])
    plt.close(figure)
    return paths


def damage_chart(results: dict[str, Any], directory: Path) -> list[Path]:
    """``<suite>-damage.png``: measured accuracy loss against predicted normalised damage, one point per (row,
    task, seed), coloured by task, the rows tuned on damage as stars (nothing when no row has damage)."""
    points = damage_points(results)
    if not points:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tuned = tuned_rows(results)
    c = damage_correlation(results)
    path = directory / f"{results['suite']}-damage.png"
    figure, axes = plt.subplots(figsize=(6.4, 4.6), dpi=110)
    colours = plt.get_cmap("tab10")
    for i, task in enumerate(results["tasks"]):
        for is_tuned, marker, size in ((False, "o", 14), (True, "*", 60)):
            mine = [p for p in points if p["task"] == task and (p["row"] in tuned) == is_tuned]
            if mine:
                axes.scatter([p["damage"] for p in mine], [100 * p["loss"] for p in mine], s=size, marker=marker,
                             color=colours(i % 10), alpha=0.75, label=task if not is_tuned else None,
                             edgecolors="black" if is_tuned else "none", linewidths=0.5)
    damages = sorted(p["damage"] for p in points)
    low, high = damages[len(damages) // 20], damages[-1 - len(damages) // 20]  # the 5th and 95th percentiles
    if damages[0] > 0 and high > 10 * low:  # most points spread over decades: a linear axis would hide them
        axes.set_xscale("log")
    axes.axhline(0, color="black", linewidth=0.6)
    axes.set_xlabel("predicted damage ÷ forgetting" + (" (log scale)" if axes.get_xscale() == "log" else ""))
    axes.set_ylabel("accuracy loss: 1 − test accuracy ÷ fine-tune's (%)")
    axes.legend(fontsize=7, title="task (★: tuned on damage)", title_fontsize=7)
    axes.set_title(f"{results['suite']}: Spearman ρ {c['pooled']:.2f} over {c['points']} points, "
                   f"{c['within']:.2f} within a task and seed", fontsize=9)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return [path]


def write(results: dict[str, Any], directory: Path, *, damage: bool = False) -> list[Path]:
    """The JSON, the Markdown and the charts; ``damage`` adds the predicted-damage scatter (the benchmark's
    runs draw it; the demo keeps to its two charts)."""
    directory.mkdir(parents=True, exist_ok=True)
    suite = results["suite"]
    json_path, md_path = directory / f"{suite}.json", directory / f"{suite}.md"
    json_path.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    md_path.write_text(markdown(results))
    return [json_path, md_path, *charts(results, directory), *(damage_chart(results, directory) if damage else [])]


def summary_table(suites: list[dict[str, Any]]) -> str:
    """The README's table: every row's normalised (and absolute) test accuracy on each suite, mean ± s.d."""
    rows = list(REFERENCES)
    for results in suites:
        rows += [r for r in sorted(merge_rows(results), key=lambda r: -row_stats(results, r)["normalised"])
                 if r not in rows]
    header = "| model | kind | " + " | ".join(f"{r['suite']} normalised % | {r['suite']} absolute %" for r in suites)
    lines = [header + " |", "|---|---|" + "---:|---:|" * len(suites)]
    for row in rows:
        kind = row_kind(next(r for r in suites if row in REFERENCES or row in merge_rows(r)), row)
        cells = []
        for results in suites:
            if row in REFERENCES or row in merge_rows(results):
                s = row_stats(results, row)
                cells += [f"{s['normalised']:.1f} ± {s['normalised_spread']:.1f}",
                          f"{s['absolute']:.1f} ± {s['absolute_spread']:.1f}"]
            else:
                cells += ["", ""]
        lines.append(f"| {row} | {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
