"""What a user waits for before anything happens: `mergesmith --help`, `mergesmith methods`, a recipe's error
and a one-tensor merge, each a fresh process, against `python -c pass` and `python -c "import torch"`.

    python benchmarks/speed/bench_startup.py [--repeats 7]

Each command runs --repeats times, alternating with the others (so that a noisy moment touches all of them);
the table gives the median wall time. Writes benchmarks/speed/startup_results.md.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGET_S = 0.3  # issue 13: --help, methods and a recipe error within 0.3 s


def commands(work: Path) -> dict[str, list[str]]:
    import torch
    from safetensors.torch import save_file

    for name, value in (("a", 1.0), ("b", 3.0)):
        (work / name).mkdir()
        save_file({"w": torch.full((4, 4), value)}, str(work / name / "model.safetensors"))
    bad = work / "bad.yaml"
    bad.write_text("merge_method: ties\nmodels:\n  - model: a\nparameters: {densty: 0.5}\n")
    good = work / "good.yaml"
    good.write_text(f"merge_method: linear\nmodels:\n  - model: {work / 'a'}\n  - model: {work / 'b'}\n")
    cli = [sys.executable, "-m", "mergesmith"]
    return {"python -c pass": [sys.executable, "-c", "pass"],
            "python -c 'import torch'": [sys.executable, "-c", "import torch"],
            "mergesmith --help": [*cli, "--help"],
            "mergesmith methods": [*cli, "methods"],
            "mergesmith merge (a recipe error)": [*cli, "merge", str(bad), str(work / "out-bad")],
            "mergesmith merge (one 4x4 tensor)": [*cli, "merge", str(good), str(work / "out"), "--overwrite",
                                                  "--quiet"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        runs = commands(Path(folder))
        times: dict[str, list[float]] = {label: [] for label in runs}
        for _ in range(args.repeats):
            for label, command in runs.items():
                start = time.perf_counter()
                subprocess.run(command, capture_output=True, check=False)
                times[label].append(time.perf_counter() - start)
    import torch

    lines = ["| command | median wall s | target |", "|---|---:|---|"]
    for label, measured in times.items():
        target = f"≤ {TARGET_S} s" if label.startswith(("mergesmith --help", "mergesmith methods",
                                                       "mergesmith merge (a recipe")) else ""
        lines.append(f"| `{label}` | {statistics.median(measured):.2f} | {target} |")
    text = (f"Median of {args.repeats} alternating runs, each a fresh process; torch {torch.__version__}, "
            f"Python {sys.version.split()[0]}.\n\n" + "\n".join(lines) + "\n")
    (HERE / "startup_results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
