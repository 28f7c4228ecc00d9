"""Speed benchmark: mergesmith (and optionally mergekit) on Llama-shaped bf16 checkpoints.

Generates a base and three fine-tunes once (cached in --work-dir) and one recipe per method, measures an I/O
floor, then times `mergesmith merge` (and `mergekit-yaml` with --mergekit) as subprocesses, with peak RSS.

    python benchmarks/speed/bench_merge.py [--layers 2 --repeats 1] [--mergekit VENV/bin/mergekit-yaml]

mergesmith runs with --verbose: each run's stage line (reader thread, merge arithmetic, writer thread, and the
computing thread's waits) goes into results.json and a stage table into results.md, the profile of what bounds
each merge.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import re
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "tsv", "iso_c", "iso_cts", "wudi")
DEFAULT_METHODS = METHODS[:4]
MERGEKIT_METHODS = set(METHODS[:4])  # the subspace merges are mergesmith's own: no mergekit column
# each method's parameters per model (the subspace merges take no weights) and for the whole recipe
MODEL_PARAMETERS = {"linear": "weight: {w}", "task_arithmetic": "weight: {w}", "ties": "weight: {w}, density: 0.5",
                    "dare_ties": "weight: {w}, density: 0.5"}
RECIPE_PARAMETERS = {"tsv": "alpha: 0.5", "iso_c": "alpha: 0.5", "iso_cts": "alpha: 0.5", "wudi": "alpha: 0.5"}
FINETUNES = ("ft1", "ft2", "ft3")
WEIGHTS = (0.4, 0.3, 0.3)


def llama_config(args: argparse.Namespace) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": args.hidden,
            "intermediate_size": args.intermediate, "num_hidden_layers": args.layers, "num_attention_heads": 16,
            "num_key_value_heads": 16, "vocab_size": args.vocab, "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu", "initializer_range": 0.02,
            "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2}


def tensor_specs(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    specs = [("model.embed_tokens.weight", (v, h))]
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        specs += [(p + f"self_attn.{x}_proj.weight", (h, h)) for x in "qkvo"]
        specs += [(p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                  (p + "mlp.down_proj.weight", (h, i)),
                  (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
    return specs + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def shard_plan(specs: list[tuple[str, tuple[int, ...]]], shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    shards, size = [[]], 0
    for name, shape in specs:
        nbytes = 2 * torch.Size(shape).numel()
        if shards[-1] and size + nbytes > shard_bytes:
            shards, size = [*shards, []], 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def generate(args: argparse.Namespace) -> dict[str, Path]:
    """Base + fine-tunes under work/models-<layers>L; regenerated only when the config changes."""
    cfg = llama_config(args)
    suffix = "" if args.shard_mb == 200 else f"-{args.shard_mb}MB"  # the first runs' folders keep their names
    root = args.work_dir / f"models-{args.hidden}h-{args.layers}L{suffix}"
    dirs = {name: root / name for name in ("base", *FINETUNES)}
    marker = root / "complete.json"
    if marker.exists() and json.loads(marker.read_text()) == cfg:
        return dirs
    shutil.rmtree(root, ignore_errors=True)
    shards = shard_plan(tensor_specs(cfg), args.shard_mb * 10**6)
    files = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    total = sum(2 * torch.Size(s).numel() for _, s in tensor_specs(cfg))
    weight_map = {name: file for shard, file in zip(shards, files) for name, _ in shard}
    for d in dirs.values():
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps(cfg, indent=2))
        (d / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    t0, counter = time.perf_counter(), 0
    for shard, file in zip(shards, files):
        out = {name: {} for name in dirs}
        for name, shape in shard:
            counter += 1
            gen = torch.Generator().manual_seed(counter)
            base = torch.ones(shape) if name.endswith("norm.weight") else torch.randn(shape, generator=gen) * 0.02
            out["base"][name] = base.to(torch.bfloat16)
            for k, ft in enumerate(FINETUNES, 1):
                gen.manual_seed(counter * 1000 + k)
                out[ft][name] = (base + torch.randn(shape, generator=gen) * 0.001).to(torch.bfloat16)
        for model, tensors in out.items():
            save_file(tensors, str(dirs[model] / file), metadata={"format": "pt"})
    marker.write_text(json.dumps(cfg))
    print(f"generated 4 models x {total / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s under {root}")
    return dirs


def write_recipes(dirs: dict[str, Path], recipe_dir: Path) -> dict[str, Path]:
    recipe_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for method in METHODS:
        base = [f"base_model: {dirs['base']}"] if method != "linear" else []  # linear ignores a base
        shared = [f"parameters: {{{RECIPE_PARAMETERS[method]}}}"] if method in RECIPE_PARAMETERS else []
        lines = [f"merge_method: {method}", *base, *shared, "models:"]
        for ft, w in zip(FINETUNES, WEIGHTS):
            lines.append(f"  - model: {dirs[ft]}")
            if method in MODEL_PARAMETERS:
                lines.append(f"    parameters: {{{MODEL_PARAMETERS[method].format(w=w)}}}")
        paths[method] = recipe_dir / f"{method}.yaml"
        paths[method].write_text("\n".join([*lines, "dtype: bfloat16"]) + "\n")
    return paths


def time_read(files: list[Path], buf: bytearray) -> float:
    t0 = time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return time.perf_counter() - t0


def time_write(nbytes: int, path: Path, buf: bytearray) -> float:
    t0 = time.perf_counter()
    fd, left = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), nbytes
    while left:
        left -= os.write(fd, memoryview(buf)[:min(left, len(buf))])
    os.close(fd)
    elapsed = time.perf_counter() - t0
    path.unlink()
    return elapsed


STAGE = re.compile(r"(read|merge|damage|write|waited for reads|waited for the writer|finish) ([0-9.]+) s")


def stages_of(log: str) -> dict[str, float]:
    """The stage seconds of mergesmith's --verbose summary line ({} when the log has none)."""
    line = next((ln for ln in log.splitlines() if ln.strip().startswith("stages")), "")
    return {name: float(seconds) for name, seconds in STAGE.findall(line)}


def run_timed(cmd: list[str], log: Path) -> dict:
    """Wall time, CPU time, minor page faults and peak RSS (child process tree) of one subprocess."""
    gnu_time = shutil.which("time", path="/usr/bin")
    before, load = resource.getrusage(resource.RUSAGE_CHILDREN), os.getloadavg()[0]
    with open(log, "w") as err:
        t0 = time.perf_counter()
        # a wide console: the summary's stage line stays on one line in the log
        proc = subprocess.Popen([gnu_time, "-v", *cmd] if gnu_time else cmd, cwd=REPO, stdout=err, stderr=err,
                                env={**os.environ, "COLUMNS": "400"})
        ps, peak = psutil.Process(proc.pid), 0
        while proc.poll() is None:  # without GNU time: poll the tree's RSS every 20 ms
            if not gnu_time:
                with contextlib.suppress(psutil.Error):
                    peak = max(peak, sum(p.memory_info().rss for p in [ps, *ps.children(recursive=True)]))
            time.sleep(0.02)
        wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if gnu_time:
        match = re.findall(r"Maximum resident set size \(kbytes\): (\d+)", log.read_text())
        peak = int(match[-1]) * 1024 if match else 0
    user, sys_ = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    return {"wall_s": wall, "cpu_s": user + sys_, "user_s": user, "sys_s": sys_, "peak_rss_bytes": peak,
            "minor_faults": after.ru_minflt - before.ru_minflt, "loadavg_before": load, "rc": proc.returncode,
            "stages": stages_of(log.read_text())}


def bench(tools: dict, recipes: dict[str, Path], args: argparse.Namespace) -> dict[str, dict]:
    """Each tool on each recipe; repeats alternate between tools so that background load hits all alike."""
    results: dict[str, dict] = {tool: {} for tool in tools}
    for method, recipe in recipes.items():
        runs, errors = {tool: [] for tool in tools}, dict.fromkeys(tools)
        for _ in range(args.repeats):
            for tool, cmd_of in tools.items():
                out, log = args.work_dir / f"out-{tool}-{method}", args.work_dir / f"{tool}-{method}.log"
                if errors[tool] or (tool == "mergekit" and method not in MERGEKIT_METHODS):
                    continue
                shutil.rmtree(out, ignore_errors=True)
                run = {"source": source_hash(), **run_timed(cmd_of(recipe, out), log)}
                shutil.rmtree(out, ignore_errors=True)
                if run["rc"] != 0:
                    errors[tool] = "\n".join([ln for ln in log.read_text().splitlines() if ln[:1] != "\t"][-15:])
                    print(f"  {tool} {method}: FAILED (exit {run['rc']}); log {log}\n{errors[tool]}")
                    continue
                runs[tool].append(run)
                print(f"  {tool} {method}: {run['wall_s']:.2f} s wall, {run['cpu_s']:.2f} s CPU, peak RSS "
                      f"{run['peak_rss_bytes'] / 1e9:.2f} GB, load before {run['loadavg_before']:.2f}")
        for tool, done in runs.items():
            ok = bool(done) and not errors[tool]
            results[tool][method] = {"runs": done, "error": errors[tool], **{
                key: statistics.median(r[key] for r in done) if ok else None for key in ("wall_s", "cpu_s")},
                "peak_rss_gb": max(r["peak_rss_bytes"] for r in done) / 1e9 if ok else None}
    return results


def source_hash() -> str:
    """Fingerprint of mergesmith's source as run (the working tree may change between runs)."""
    return hashlib.sha1(b"".join(p.read_bytes() for p in sorted(REPO.glob("mergesmith/**/*.py")))).hexdigest()[:10]


def machine_info(args: argparse.Namespace) -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = next((ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")), "?")
    info = {"nproc": os.cpu_count(), "ram_gb": round(psutil.virtual_memory().total / 2**30, 1), "cpu": cpu,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "python": platform.python_version()}
    info["mergesmith_commit"] = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO,
                                               capture_output=True, text=True).stdout.strip()
    if args.mergekit:
        info["mergekit"] = subprocess.run([str(Path(args.mergekit).parent / "python"), "-c", "import importlib."
                                           "metadata as m; print(m.version('mergekit'))"], capture_output=True,
                                          text=True).stdout.strip()
    return info


def fmt(x: float | None, spec: str = ".2f") -> str:
    return "—" if x is None else format(x, spec)


STAGE_COLUMNS = ("read", "merge", "write", "waited for reads", "waited for the writer", "finish")


def stage_table(ms: dict[str, dict]) -> list[str]:
    """mergesmith's stages per method, medians over the runs (seconds; the reader, computing and writer threads
    overlap, so the largest busy stage — read, merge or write — is what bounds the wall time)."""
    rows = ["mergesmith's stages (`--verbose`), median seconds: read = the reader thread's busy time, merge = the "
            "arithmetic, write = the writer thread's; the waits are the computing thread's.", "",
            "| method | " + " | ".join(STAGE_COLUMNS) + " |", "|---" * (len(STAGE_COLUMNS) + 1) + "|"]
    for method, result in ms.items():
        runs = [r["stages"] for r in result["runs"] if r.get("stages")]
        if runs:
            rows.append(f"| {method} | " + " | ".join(fmt(statistics.median(r.get(c, 0.0) for r in runs))
                                                      for c in STAGE_COLUMNS) + " |")
    return rows if len(rows) > 4 else []


def report(args, info, floors, ms, mk, command) -> str:
    rows = ["| method | mergesmith wall s | mergesmith CPU s | mergesmith peak RSS GB | ratio to I/O floor "
            "| I/O floor s | mergekit wall s | mergekit CPU s | mergekit peak RSS GB | speed-up |", "|---" * 10 + "|"]
    for method in ms:
        a, b = ms[method], (mk or {}).get(method, {})
        ratio = a["wall_s"] / floors[method] if a["wall_s"] else None
        speedup = b["wall_s"] / a["wall_s"] if b.get("wall_s") and a["wall_s"] else None
        cells = [fmt(a["wall_s"]), fmt(a["cpu_s"], ".1f"), fmt(a["peak_rss_gb"]), fmt(ratio, ".1f") + "x",
                 fmt(floors[method]), "failed" if b.get("error") else fmt(b.get("wall_s")), fmt(b.get("cpu_s"), ".1f"),
                 fmt(b.get("peak_rss_gb")), fmt(speedup, ".2f") + "x" if speedup else "—"]
        rows.append("| " + " | ".join([method, *cells]) + " |")
    loads = [r["loadavg_before"] for tool in (ms, mk or {}) for m in tool.values() for r in m["runs"]]
    sources = sorted({r["source"] for m in ms.values() for r in m["runs"]})
    changed = " WARNING: mergesmith's source changed between runs." if len(sources) > 1 else ""
    return "\n".join([
        "# mergesmith speed benchmark", "",
        f"Inputs: Llama-shaped bf16 checkpoints, {args.layers} layers, hidden {args.hidden}, "
        f"{args.model_bytes / 1e9:.2f} GB per model in {args.shard_mb} MB shards; output bf16, {args.shard_mb} MB "
        "shards. "
        f"Median wall and CPU (user+sys) time of {args.repeats} run(s), max peak RSS (child process tree); "
        "speed-up = mergekit wall / mergesmith wall.", "",
        "I/O floor = read every input shard once from a warm page cache + write one model's bytes "
        f"(no fsync). Read {args.read_gbps:.2f} GB/s, write {args.write_gbps:.2f} GB/s.", "",
        *rows, "", *stage_table(ms), "",
        f"1-minute load average before a run: {min(loads, default=0):.2f} to {max(loads, default=0):.2f} "
        f"(above {os.cpu_count()} means other work shared the CPUs and wall times are inflated). Start-up "
        "(`--help`) wall time, part of every run: " + ", ".join(f"{t} {s:.1f} s" for t, s in args.startup.items())
        + f". mergesmith source: {', '.join(sources)}.{changed}", "",
        "Machine: " + ", ".join(f"{k}: {v}" for k, v in info.items()), "",
        "Reproduce (from the repository root):", "", f"    {command}", ""])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work-dir", type=lambda p: Path(p).resolve(), default=HERE / "work",
                    help="models (cached), recipes, outputs")
    ap.add_argument("--layers", type=int, default=16, help="decoder layers (2 for a quick smoke run)")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--shard-mb", type=int, default=200, help="input and output shard size, MB")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(DEFAULT_METHODS),
                    help="default: the four mergekit shares; add tsv iso_c iso_cts wudi for the subspace merges")
    ap.add_argument("--mergekit", help="path to a mergekit-yaml executable (its own venv) to compare with")
    ap.add_argument("--results", type=Path, default=HERE, help="directory for results.md and results.json")
    args = ap.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", os.path.relpath(__file__, REPO), *sys.argv[1:]])

    info = machine_info(args)  # before the runs: records the commit being measured
    dirs = generate(args)
    recipes = {m: p for m, p in write_recipes(dirs, args.work_dir / "recipes").items() if m in args.methods}
    files = {name: sorted(d.glob("*.safetensors")) for name, d in dirs.items()}
    model_bytes = args.model_bytes = sum(f.stat().st_size for f in files["base"])

    buf = bytearray(64 * 2**20)
    time_read([f for fs in files.values() for f in fs], buf)  # warm the page cache
    reads = {name: statistics.median(time_read(fs, buf) for _ in range(args.repeats)) for name, fs in files.items()}
    write_s = statistics.median(time_write(model_bytes, args.work_dir / "write-floor.bin", buf)
                                for _ in range(args.repeats))
    args.read_gbps = 4 * model_bytes / 1e9 / sum(reads.values())
    args.write_gbps = model_bytes / 1e9 / write_s
    floors = {m: sum(reads[n] for n in FINETUNES) + (reads["base"] if m != "linear" else 0) + write_s
              for m in METHODS}
    print(f"I/O floor: read {args.read_gbps:.2f} GB/s, write {args.write_gbps:.2f} GB/s; {floors['ties']:.2f} s")

    tools = {"mergesmith": lambda r, o: [sys.executable, "-m", "mergesmith.cli", "merge", str(r), str(o),
                                         "--overwrite", "--max-shard-size", f"{args.shard_mb}MB", "--verbose"]}
    if args.mergekit:  # 0.1.5 reads --out-shard-size as bytes, whatever its --help says
        tools["mergekit"] = lambda r, o: ["env", "HF_HUB_OFFLINE=1", args.mergekit, str(r), str(o),
                                          "--out-shard-size", f"{args.shard_mb}M", "--lazy-unpickle", "--allow-crimes",
                                          "--no-copy-tokenizer", "--device", "cpu", "--random-seed", "0", "--quiet"]
    helps = {"mergesmith": [sys.executable, "-m", "mergesmith.cli", "--help"], "mergekit": [args.mergekit, "--help"]}
    args.startup = {t: statistics.median(run_timed(helps[t], args.work_dir / "help.log")["wall_s"]
                                         for _ in range(args.repeats)) for t in tools}
    results = bench(tools, recipes, args)

    text = report(args, info, floors, results["mergesmith"], results.get("mergekit"), command)
    print("\n" + text)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "results.md").write_text(text)
    record = {"command": command, "machine": info, "model_bytes": model_bytes, "read_s": reads, "write_s": write_s,
              "io_floor_s": floors, "startup_s": args.startup, "repeats": args.repeats, **results}
    (args.results / "results.json").write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
