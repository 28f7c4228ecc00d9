"""Cost of the curvature merges against a TIES merge of the same models: MiniLM-L6 and three toy fine-tunes
(toy_demo.py: what ``mergesmith demo`` ran before it became the quality benchmark's vision suite), with their
statistics sidecars (64 examples per model).

    python benchmarks/speed/bench_curvature.py [--workdir DIR] [--repeats 3]

Runs (or reuses) toy_demo.py's fine-tuning and measuring in --workdir, then times each merge in this
process (median of --repeats, same run, so the ratios are comparable) and writes
benchmarks/speed/curvature_results.md. The MaTS rows also give conjugate gradient's iterations and worst
final residual (the solver itself, plain against preconditioned CG, is bench_solve.py's subject).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "mergesmith-bench-curvature")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    from toy_demo import prepare, recipes

    import mergesmith

    work = args.workdir
    base, finetunes, sidecars = prepare(work)  # reuses what a previous run left
    demo = recipes(base, finetunes, sidecars)
    mats = demo["mats"]
    cases = {
        "ties (density 0.5)": demo["ties"],
        "fisher": demo["fisher"],
        "regmean (alpha 0.9)": demo["regmean"],
        "gradient_matching": demo["gradient_matching"],
        "mats kfac (demo: tol 1e-4, ≤ 30 iterations)": mats,
    }
    rows = {}
    for name, recipe in cases.items():
        times, summary = [], None
        for _ in range(args.repeats if "mats" not in name else 1):  # MaTS takes minutes: once
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                summary = mergesmith.merge(recipe, work / "bench-out", overwrite=True)
            times.append(time.perf_counter() - start)
        rows[name] = (statistics.median(times), summary)
    ties = rows["ties (density 0.5)"][0]
    lines = ["| merge | seconds | × TIES | CG blocks | CG iterations (total / max) | worst final residual |",
             "|---|---|---|---|---|---|"]
    for name, (seconds, summary) in rows.items():
        solver = summary.solver
        if solver:
            iterations = [r["iterations"] for r in solver.values()]
            cg = (f"{len(solver)} | {sum(iterations)} / {max(iterations)} | "
                  f"{max(r['final_residual'] for r in solver.values()):.1e}")
        else:
            cg = "– | – | –"
        lines.append(f"| {name} | {seconds:.2f} | {seconds / ties:.2f} | {cg} |")
    header = (f"MiniLM-L6 (22.7M parameters) base and three toy fine-tunes (benchmarks/speed/toy_demo.py), "
              f"statistics of 64 "
              f"examples per model; torch {torch.__version__}, {torch.get_num_threads()} threads, "
              f"{os.cpu_count()} CPUs; median of {args.repeats} merges each (MaTS: one), one process.\n\n")
    report = header + "\n".join(lines) + "\n"
    (HERE / "curvature_results.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
