"""Memory bound under a cap: the speed benchmark's checkpoints merged under a cgroup memory limit just above
the engine's stated bound (issue 8, item 10).

    python benchmarks/speed/bench_memory_cap.py [--methods linear ties] [--margin 1.1]

Inputs: bench_merge.py's Llama-shaped bf16 base and three fine-tunes (16 layers, hidden 1024, 265M
parameters, 0.54 GB each; generated once and cached under benchmarks/speed/work, shared with bench_merge.py)
and its recipes. Per method, a driver process — placed in its own cgroup v1 memory group before it runs a
line — imports mergesmith, plans the merge, reads its own peak RSS (the start-up term) and states the bound
``plan.size().peak_bound(start_up)``; then it runs the CLI's merge (``mergesmith.cli.main``):

1. uncapped (the group has no limit): peak RSS (VmHWM) and the group's peak charge;
2. capped at ``margin`` × the bound, less the start-up's uncharged part (shared libraries already in the page
   cache are resident but charged to whichever group read them first): it must complete.

The input files are evicted from the page cache before every run, so that what a merge reads is charged to
its group. Needs root and a cgroup v1 memory controller at /sys/fs/cgroup/memory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
import bench_merge  # noqa: E402 — the checkpoints and recipes of the speed benchmark

CGROUP_ROOT = Path("/sys/fs/cgroup/memory")

DRIVER = """
import json, sys
recipe, out = sys.argv[1:3]

def peak_rss():  # VmHWM, not getrusage: ru_maxrss survives exec (a vfork child inherits its parent's)
    status = open("/proc/self/status").read()
    return int(status.split("VmHWM:")[1].split()[0]) * 1024

import mergesmith
from mergesmith import cli
size = mergesmith.plan_merge(recipe).size()
start_up = peak_rss()
print(json.dumps({"start_up": start_up, "bound": size.peak_bound(start_up), "bytes_read": size.bytes_read,
                  "largest_read": size.largest_read, "largest_work": size.largest_work,
                  "largest_output": size.largest_output, "prefetch": size.prefetch}), flush=True)
if sys.stdin.readline().strip() != "go":
    sys.exit(3)
try:
    cli.main(["merge", recipe, out, "--max-shard-size", "200MB", "--quiet"])
except SystemExit as e:
    code = e.code
print(json.dumps({"code": code, "peak_rss": peak_rss()}), flush=True)
sys.exit(code)
"""


def own_memory_group() -> Path:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return CGROUP_ROOT / path.lstrip("/")
    return CGROUP_ROOT


def make_group(name: str) -> Path:
    for parent in dict.fromkeys([own_memory_group(), CGROUP_ROOT]):
        try:
            (parent / name).mkdir()
            return parent / name
        except OSError:
            continue
    sys.exit(f"cannot create a memory cgroup under {CGROUP_ROOT} (needs root and cgroup v1)")


def remove_group(group: Path) -> None:
    for task in (group / "cgroup.procs").read_text().split():
        os.kill(int(task), 9)
    for _ in range(100):
        try:
            group.rmdir()
            return
        except OSError:
            time.sleep(0.05)


def set_limit(group: Path, limit: int) -> None:
    (group / "memory.limit_in_bytes").write_text(str(limit))
    if (group / "memory.memsw.limit_in_bytes").exists():
        (group / "memory.memsw.limit_in_bytes").write_text(str(limit))


def evict(directories) -> None:
    for directory in directories:
        for file in Path(directory).iterdir():
            fd = os.open(file, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def run(recipe: Path, out: Path, inputs, cap, driver: Path) -> dict:
    """One driver run in a fresh group, capped at ``cap(report)`` bytes once the driver has stated the bound
    (``cap`` None: no limit)."""
    shutil.rmtree(out, ignore_errors=True)
    evict(inputs)
    group = make_group(f"mergesmith-bench-{os.getpid()}")
    try:
        command = f'echo $$ > {group / "cgroup.procs"} && exec "$0" "$@"'
        start = time.perf_counter()
        proc = subprocess.Popen(["sh", "-c", command, sys.executable, str(driver), str(recipe), str(out)],
                                cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        try:
            report = json.loads(proc.stdout.readline() or "{}")
            if "bound" not in report:
                sys.exit(f"the driver failed:\n{proc.communicate()[1]}")
            report["charged_start_up"] = int((group / "memory.usage_in_bytes").read_text())
            report["uncharged_start_up"] = max(0, report["start_up"] - report["charged_start_up"])
            if cap is not None:
                report["cap"] = int(cap(report))
                set_limit(group, report["cap"])
            stdout, stderr = proc.communicate("go\n", timeout=3600)
        finally:
            proc.kill()
        report["wall_s"] = time.perf_counter() - start
        if stdout.strip():
            report |= json.loads(stdout.splitlines()[-1])
        oom = (group / "memory.oom_control").read_text()
        report |= {"rc": proc.returncode, "stderr": stderr[-3000:],
                   "max_usage": int((group / "memory.max_usage_in_bytes").read_text()),
                   "failcnt": int((group / "memory.failcnt").read_text()),
                   "oom_kills": int(next((ln.split()[1] for ln in oom.splitlines() if ln.startswith("oom_kill ")),
                                         -1))}
    finally:
        remove_group(group)
    shutil.rmtree(out, ignore_errors=True)
    return report


def gb(n: float | None) -> str:
    return "—" if n is None else f"{n / 1e9:.2f}"


def floor_cell(floor: dict | None) -> str:
    if not floor:
        return "—"
    killed = f" (killed at + {gb(floor['killed'])})" if floor["killed"] else ""
    share = floor["completes"] / floor["term"]
    return f"charged start-up + {gb(floor['completes'])}{killed}; {share:.0%} of the merge term"


def report(args, model_bytes: int, results: dict, command: str) -> str:
    rows = ["| method | read GB | start-up RSS GB | stated bound GB | bound's merge term GB | uncapped peak RSS GB "
            "| uncapped peak charge GB | cap GB | capped run | capped peak RSS / charge GB "
            "| uncapped / capped wall s | lowest cap that completes GB |", "|---" * 12 + "|"]
    for method, r in results.items():
        free, capped = r["uncapped"], r["capped"]
        outcome = "completed" if capped["rc"] == 0 else (
            f"OOM-killed ({capped['oom_kills']} kill)" if capped["rc"] == -9 else f"failed (exit {capped['rc']})")
        cells = [gb(free["bytes_read"]), gb(free["start_up"]), gb(free["bound"]), gb(free["bound"] - free["start_up"]),
                 gb(free.get("peak_rss")), gb(free["max_usage"]), gb(capped["cap"]), outcome,
                 f"{gb(capped.get('peak_rss'))} / {gb(capped['max_usage'])}",
                 f"{free['wall_s']:.1f} / {capped['wall_s']:.1f}", floor_cell(r.get("floor"))]
        rows.append("| " + " | ".join([method, *cells]) + " |")
    terms = next(iter(results.values()))["uncapped"]
    return "\n".join([
        "# Merges under a memory cap just above the stated bound", "",
        f"Inputs: bench_merge.py's Llama-shaped bf16 checkpoints ({args.layers} layers, hidden {args.hidden}, "
        f"{model_bytes / 1e9:.2f} GB per model; linear merges the three fine-tunes, ties the base and the three); "
        "output bf16 in 200 MB shards, through `mergesmith.cli.main` in a driver process.", "",
        "Stated bound (mergesmith/plan.py, `PlanSize.peak_bound`): start-up RSS + (prefetch + 2) · largest job's "
        "input bytes + largest job's working copies + 3 · largest output tensor, with start-up = the driver's "
        f"peak RSS after importing mergesmith and planning (prefetch {terms['prefetch']}). Peak RSS = VmHWM of "
        "the merging process; peak charge = the cgroup's `memory.max_usage_in_bytes` (anonymous memory and page "
        "cache charged to the group, inputs evicted from the page cache before every run).", "",
        f"Cap = {args.margin} × bound − the start-up's uncharged part (start-up RSS minus the group's charge when "
        "the driver reports: shared libraries already cached are resident but charged to another group), set on "
        "a cgroup v1 memory group (`memory.limit_in_bytes` and `memory.memsw.limit_in_bytes`) once the driver "
        "has stated the bound, before it reads a tensor.", "",
        *rows, "",
        "Lowest cap that completes: bisection of the cap above the group's charge at the driver's report "
        f"({args.bisect} steps between 0 and the cap above): the smallest increment under which the merge "
        "completed and the largest under which it was OOM-killed, and the former as a share of the bound's "
        "merge term (the rest is slack in the bound). The runs of the search, above the charged start-up:", "",
        *(f"- {method}: " + "; ".join(r.get("bisection", [])) for method, r in results.items()), "",
        "Machine: " + ", ".join(f"{k}: {v}" for k, v in args.machine.items()), "",
        "Reproduce (from the repository root, as root):", "", f"    {command}", ""])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work-dir", type=lambda p: Path(p).resolve(), default=HERE / "work",
                    help="models (cached, shared with bench_merge.py), recipes, outputs")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--methods", nargs="+", choices=bench_merge.METHODS, default=["linear", "ties"])
    ap.add_argument("--margin", type=float, default=1.1, help="the cap as a multiple of the stated bound")
    ap.add_argument("--bisect", type=int, default=4, help="steps of the search for the lowest cap (0: none)")
    ap.add_argument("--results", type=Path, default=HERE / "memory_cap_results.md")
    args = ap.parse_args()
    if not (CGROUP_ROOT / "memory.limit_in_bytes").exists():
        sys.exit(f"no cgroup v1 memory controller at {CGROUP_ROOT}")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", os.path.relpath(__file__, REPO), *sys.argv[1:]])
    import psutil
    import torch

    args.machine = {"nproc": os.cpu_count(), "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                    "python": platform.python_version(), "kernel": platform.release(),
                    "mergesmith_commit": subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO,
                                                        capture_output=True, text=True).stdout.strip()}
    dirs = bench_merge.generate(args)
    recipes = bench_merge.write_recipes(dirs, args.work_dir / "recipes")
    model_bytes = sum(f.stat().st_size for f in dirs["base"].glob("*.safetensors"))
    driver = args.work_dir / "cap_driver.py"
    driver.write_text(DRIVER)
    results = {}
    for method in args.methods:
        out = args.work_dir / f"out-cap-{method}"
        results[method] = {}
        caps = {"uncapped": None,
                "capped": lambda r: args.margin * r["bound"] - r["uncharged_start_up"]}
        for kind, cap in caps.items():
            r = results[method][kind] = run(recipes[method], out, dirs.values(), cap, driver)
            print(f"{method} {kind}: rc {r['rc']}, start-up {gb(r['start_up'])} GB (charged "
                  f"{gb(r['charged_start_up'])}), bound {gb(r['bound'])} GB, cap {gb(r.get('cap'))} GB, peak RSS "
                  f"{gb(r.get('peak_rss'))} GB, peak charge {gb(r['max_usage'])} GB, {r['wall_s']:.1f} s", flush=True)
            if r["rc"] != 0:
                print(r["stderr"])
        capped = results[method]["capped"]
        if args.bisect and capped["rc"] == 0:
            low, high = 0, capped["cap"] - capped["charged_start_up"]
            steps = results[method]["bisection"] = []
            for _ in range(args.bisect):
                middle = (low + high) // 2
                r = run(recipes[method], out, dirs.values(), lambda r, m=middle: r["charged_start_up"] + m, driver)
                print(f"{method} at charged start-up + {gb(middle)} GB: rc {r['rc']}, {r['wall_s']:.1f} s", flush=True)
                outcome = "completed" if r["rc"] == 0 else "OOM-killed" if r["rc"] == -9 else f"exit {r['rc']}"
                steps.append(f"+ {gb(middle)} GB: {outcome} after {r['wall_s']:.1f} s")
                low, high = (low, middle) if r["rc"] == 0 else (middle, high)
            results[method]["floor"] = {"completes": high, "killed": low,
                                        "term": capped["bound"] - capped["start_up"]}
    text = report(args, model_bytes, results, command)
    print("\n" + text)
    args.results.write_text(text)
    (args.work_dir / "memory_cap_results.json").write_text(json.dumps({"command": command, "machine": args.machine,
                                                                     **results}, indent=2))


if __name__ == "__main__":
    main()
