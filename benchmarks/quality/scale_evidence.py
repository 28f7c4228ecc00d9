"""Issue 12, item 0: are the Fisher-weighted merges held back by unequal precision scales across models?

On a kept work directory of the quality benchmark (``run.py --workdir W``), for every seed: each model's
precision scale from its sidecar — the Fisher's global L2 norm ‖F_i‖, K-FAC's Kronecker scale
mean over modules of tr(A_i)·tr(G_i) / (in·out), the Gram's mean tr(G_i)/in — and the test score of MaTS-Fisher,
gradient matching and (with --kfac) MaTS-K-FAC at the grid point the committed results chose, once as chosen
and once with each model's weight divided by its scale (scaled so that the weights' mean stays the same):
the merge the method would make if every model's precision had the same size.

    python benchmarks/quality/scale_evidence.py --workdir /tmp/qtext [--kfac] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def scales(sidecar: Path) -> dict[str, float]:
    """A model's precision scales, from its sidecar."""
    from mergesmith.io.sidecar import StatsReader

    reader = StatsReader(sidecar)
    fisher = kfac = gram = 0.0
    kfac_n = gram_n = 0
    for key in reader.keys():
        kind, _, module = key.partition("/")
        if kind == "fisher":
            fisher += float(reader.get(key).double().square().sum())
        elif kind == "kfac_g":
            a, g = reader.get(f"kfac_a/{module}").double(), reader.get(key).double()
            kfac += float(a.diagonal().mean() * g.diagonal().mean())
            kfac_n += 1
        elif kind == "gram":
            gram += float(reader.get(key).double().diagonal().mean())
            gram_n += 1
    return {"fisher": math.sqrt(fisher), "kfac": kfac / max(kfac_n, 1), "gram": gram / max(gram_n, 1),
            "examples": max((n for k, n in reader.counts.items() if k.startswith("fisher/")), default=0)}


def main(argv: list[str] | None = None) -> int:
    import mergesmith
    from mergesmith.quality import suite_module
    from mergesmith.quality.protocol import _merged_model, accuracy, load, make_heads, suite_tasks

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--suite", default="text")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--kfac", action="store_true", help="also MaTS-K-FAC (about 80 s per merge on MiniLM)")
    args = parser.parse_args(argv)
    suite = suite_module(args.suite)
    committed = json.loads((RESULTS / f"{args.suite}.json").read_text())
    rows = ["mats[fisher]", "gradient_matching"] + (["mats[kfac]"] if args.kfac else [])
    kind_of = {"mats[fisher]": "fisher", "gradient_matching": "fisher", "mats[kfac]": "kfac"}
    out: dict = {"suite": args.suite, "seeds": args.seeds, "per_seed": []}
    for seed in args.seeds:
        work = args.workdir / f"seed-{seed}"
        tasks = suite_tasks(suite, seed, quick=False)
        heads = make_heads(suite, load(args.workdir / "start"), tasks, seed)
        finetunes = {t.name: work / f"ft-{t.name}" for t in tasks}
        sidecars = {t.name: work / f"stats-{t.name}" for t in tasks}
        own = {t.name: accuracy(load(finetunes[t.name]), heads[t.name], suite, t.test) for t in tasks}
        measured = {name: scales(path) for name, path in sidecars.items()}
        chosen = committed["per_seed"][committed["seeds"].index(seed)]["chosen"]
        record = {"seed": seed, "scales": measured, "scores": {}}
        for row in rows:
            base_weight = chosen[row].get("weight", 1.0)
            params = {k: v for k, v in chosen[row].items() if k != "weight"}
            method = "mats" if row.startswith("mats") else row
            size = {n: measured[n][kind_of[row]] * (measured[n]["examples"] if row == "gradient_matching" else 1)
                    for n in finetunes}
            mean = sum(size.values()) / len(size)
            for label, factor in (("as chosen", {n: 1.0 for n in finetunes}),
                                  ("scale-normalised", {n: mean / size[n] for n in finetunes})):
                models = [{"model": str(finetunes[n]), "stats": str(sidecars[n]),
                           "parameters": {"weight": base_weight * factor[n]}} for n in finetunes]
                recipe = {"merge_method": method, "base_model": str(args.workdir / "start"), "models": models,
                          "parameters": params, "heads": "each", "dtype": "float32"}
                target = work / "scale-evidence"
                mergesmith.merge(recipe, target, overwrite=True, seed=seed)
                model = _merged_model(target, finetunes, heads)
                per_task = {t.name: accuracy(model, heads[t.name], suite, t.test) / own[t.name] for t in tasks}
                record["scores"].setdefault(row, {})[label] = per_task
                shutil.rmtree(target)
                print(f"seed {seed} {row:<18} {label:<17} {sum(per_task.values()) / len(per_task):6.1%}",
                      flush=True)
        out["per_seed"].append(record)
    (RESULTS / f"{args.suite}-scales.json").write_text(json.dumps(out, indent=1))
    print(table(out))
    return 0


def table(out: dict) -> str:
    """Mean normalised test accuracy per row and variant, and the spread of each scale across models."""
    lines = ["| row | as chosen | scale-normalised |", "|---|---:|---:|"]
    rows = list(out["per_seed"][0]["scores"])
    for row in rows:
        cells = []
        for label in ("as chosen", "scale-normalised"):
            means = [sum(s["scores"][row][label].values()) / len(s["scores"][row][label]) for s in out["per_seed"]]
            cells.append(f"{100 * sum(means) / len(means):.1f}")
        lines.append(f"| {row} | {cells[0]} | {cells[1]} |")
    lines += ["", "| seed | Fisher ‖F_i‖ max/min | K-FAC scale max/min | Gram scale max/min | largest Fisher |",
              "|---|---:|---:|---:|---|"]
    for s in out["per_seed"]:
        spread = {k: max(v[k] for v in s["scales"].values()) / max(min(v[k] for v in s["scales"].values()), 1e-30)
                  for k in ("fisher", "kfac", "gram")}
        top = max(s["scales"], key=lambda n: s["scales"][n]["fisher"])
        lines.append(f"| {s['seed']} | {spread['fisher']:.1f} | {spread['kfac']:.1f} | {spread['gram']:.2f} | {top} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
