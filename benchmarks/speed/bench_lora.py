"""Speed benchmark: three PEFT LoRA adapters merged into a full model, mergesmith against mergekit.

Reuses bench_merge.py's generated bf16 Llama base (cached in --work-dir) and writes three LoRA adapters over it
(rank 16, alpha 32, all seven projections, random A and B in float32) exactly as peft's save_pretrained() lays them
out; one is loaded once with peft.PeftModel.from_pretrained as a check that peft accepts it. Then times, as
subprocesses with the process tree's peak RSS, `mergesmith merge` on recipes whose models are the adapter
directories and `mergekit-yaml` on the same recipes written with mergekit's BASE+ADAPTER syntax (linear and ties),
against bench_merge.py's I/O floor, and checks that the two tools' linear merges agree within bf16 rounding.

    python benchmarks/speed/bench_lora.py [--layers 2 --repeats 1] [--mergekit VENV/bin/mergekit-yaml]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_merge import REPO, WEIGHTS, fmt, generate, machine_info, run_timed, source_hash, time_read, time_write  # noqa: E402

HERE = Path(__file__).resolve().parent
ADAPTERS = ("lora1", "lora2", "lora3")
METHODS = ("linear", "ties")
MODEL_PARAMETERS = {"linear": "weight: {w}", "ties": "weight: {w}, density: 0.5"}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
A_STD, B_STD = 0.02, 0.00625  # with scaling 32/16 = 2 and r = 16: each delta entry has std 2·√16·A_STD·B_STD = 0.001
PEFT_PREFIX = "base_model.model."


def lora_shapes(cfg: dict) -> list[tuple[str, int, int]]:
    """(module, in_features, out_features) of every target module, in the base's order."""
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    dims = {"q_proj": (h, h), "k_proj": (h, h), "v_proj": (h, h), "o_proj": (h, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    return [(f"model.layers.{n}.{'self_attn' if t[0] in 'qkvo' else 'mlp'}.{t}", *dims[t])
            for n in range(cfg["num_hidden_layers"]) for t in TARGETS]


def make_adapters(cfg: dict, base: Path, args: argparse.Namespace) -> dict[str, Path]:
    """Three adapters as peft's save_pretrained() writes them: adapter_config.json from peft's own LoraConfig, and
    adapter_model.safetensors holding base_model.model.<module>.lora_A.weight (r, in) and .lora_B.weight (out, r),
    float32 (peft keeps adapter weights in float32 over a bf16 base: autocast_adapter_dtype), metadata format pt."""
    from peft import LoraConfig

    spec = {"model": cfg, "base": str(base), "r": args.rank, "alpha": args.alpha, "std": [A_STD, B_STD]}
    root = args.work_dir / f"adapters-{cfg['hidden_size']}h-{cfg['num_hidden_layers']}L"
    dirs = {name: root / name for name in ADAPTERS}
    marker = root / "complete.json"
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return dirs
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    for k, d in enumerate(dirs.values(), 1):
        LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=list(TARGETS), lora_dropout=0.0,
                   bias="none", task_type="CAUSAL_LM", base_model_name_or_path=str(base)).save_pretrained(str(d))
        gen, tensors = torch.Generator(), {}
        for n, (module, fan_in, fan_out) in enumerate(lora_shapes(cfg)):
            gen.manual_seed(k * 10**6 + n)
            tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = torch.randn(args.rank, fan_in, generator=gen) * A_STD
            tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = torch.randn(fan_out, args.rank, generator=gen) * B_STD
        save_file(tensors, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
    marker.write_text(json.dumps(spec))
    size = (dirs[ADAPTERS[0]] / "adapter_model.safetensors").stat().st_size
    print(f"wrote 3 adapters x {size / 1e6:.1f} MB in {time.perf_counter() - t0:.1f} s under {root}")
    return dirs


def peft_check(cfg: dict, adapter: Path, args: argparse.Namespace) -> dict:
    """Load one adapter with peft.PeftModel.from_pretrained on a LlamaForCausalLM built from the base's config (made
    on the meta device, then given uninitialised bf16 storage: no random init) and check that peft placed every saved
    factor, unchanged, with the scaling the config implies."""
    from peft import PeftModel
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**cfg)).to(torch.bfloat16)
    model = PeftModel.from_pretrained(model.to_empty(device="cpu"), str(adapter))
    loaded = {k.replace(".default.", "."): v.cpu() for k, v in model.state_dict().items() if ".lora_" in k}
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}
    assert sorted(loaded) == sorted(saved), "peft's LoRA parameters are not the saved ones"
    assert all(loaded[k].dtype == v.dtype and torch.equal(loaded[k], v) for k, v in saved.items()), \
        "peft loaded other values"
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    scaling = layer.scaling["default"]
    assert scaling == args.alpha / args.rank, scaling
    print(f"peft {sys.modules['peft'].__version__} loaded {adapter.name}: {len(saved) // 2} LoRA modules, "
          f"scaling {scaling}, every factor as saved")
    return {"peft": sys.modules["peft"].__version__, "modules": len(saved) // 2, "scaling": scaling}


def write_recipes(base: Path, adapters: dict[str, Path], recipe_dir: Path) -> dict[str, dict[str, Path]]:
    """One recipe per method and tool: mergesmith's names the adapter directories (their base is base_model),
    mergekit's writes each model as BASE+ADAPTER; otherwise the files are the same, except that mergekit's linear
    recipe has no base_model: mergekit 0.1.5 makes a linear merge's base_model one more input, and stops with
    "Missing required parameter weight for BASE" when it has no weight (mergesmith's linear ignores a base)."""
    recipe_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, dict[str, Path]] = {"mergesmith": {}, "mergekit": {}}
    for method in METHODS:
        for tool in paths:
            has_base = tool == "mergesmith" or method != "linear"
            lines = [f"merge_method: {method}", *([f"base_model: {base}"] if has_base else []), "models:"]
            for adapter, w in zip(adapters.values(), WEIGHTS):
                lines.append(f"  - model: {adapter if tool == 'mergesmith' else f'{base}+{adapter}'}")
                lines.append(f"    parameters: {{{MODEL_PARAMETERS[method].format(w=w)}}}")
            paths[tool][method] = recipe_dir / f"lora-{method}-{tool}.yaml"
            paths[tool][method].write_text("\n".join([*lines, "dtype: bfloat16"]) + "\n")
    return paths


def stated_bound(recipe: Path, work_dir: Path) -> float | None:
    """The peak-memory bound `mergesmith merge --dry-run` states for a recipe, in GB."""
    done = subprocess.run([sys.executable, "-m", "mergesmith.cli", "merge", str(recipe), str(work_dir / "lora-dry-run"),
                           "--dry-run"], cwd=REPO, capture_output=True, text=True)
    found = re.search(r"peak memory:\s+at most ([\d.]+) GB", done.stdout + done.stderr)
    return float(found[1]) if found else None


def cache_info(cache: Path, started: float) -> dict:
    """What mergekit's --lora-merge-cache holds after a run: the full models it wrote (base + adapter merged), their
    dtype, and when the last was written, in seconds after the run started."""
    files = sorted(cache.rglob("*.safetensors"))
    if not files:
        return {"lora_merge_s": None, "cache_bytes": 0, "cache_dtype": None}
    with safe_open(str(files[0]), "pt") as f:
        dtype = str(f.get_slice(next(iter(f.keys()))).get_dtype())
    return {"lora_merge_s": max(p.stat().st_mtime for p in files) - started,
            "cache_bytes": sum(p.stat().st_size for p in files), "cache_dtype": dtype}


def bench(tools: dict, recipes: dict[str, dict[str, Path]], args: argparse.Namespace) -> tuple[dict, dict]:
    """Each tool on each method, repeats alternating between tools; the last repeat's outputs are kept for the
    correctness check. mergekit gets a fresh --lora-merge-cache every run (it skips merges it finds there)."""
    results: dict[str, dict] = {tool: {} for tool in tools}
    kept: dict[str, dict[str, Path]] = {tool: {} for tool in tools}
    for method in METHODS:
        runs, errors = {tool: [] for tool in tools}, dict.fromkeys(tools)
        for rep in range(args.repeats):
            for tool, cmd_of in tools.items():
                out, log = args.work_dir / f"lora-out-{tool}-{method}", args.work_dir / f"lora-{tool}-{method}.log"
                cache = args.work_dir / f"lora-cache-{method}"
                if errors[tool]:
                    continue
                shutil.rmtree(out, ignore_errors=True)
                shutil.rmtree(cache, ignore_errors=True)
                started = time.time()
                run = {"source": source_hash(), **run_timed(cmd_of(recipes[tool][method], out, cache), log)}
                if tool == "mergekit":
                    run.update(cache_info(cache, started))
                shutil.rmtree(cache, ignore_errors=True)
                if run["rc"] != 0:
                    errors[tool] = "\n".join([ln for ln in log.read_text().splitlines() if ln[:1] != "\t"][-15:])
                    print(f"  {tool} {method}: FAILED (exit {run['rc']}); log {log}\n{errors[tool]}")
                    shutil.rmtree(out, ignore_errors=True)
                    continue
                if rep == args.repeats - 1:
                    kept[tool][method] = out
                else:
                    shutil.rmtree(out, ignore_errors=True)
                runs[tool].append(run)
                merged = run.get("lora_merge_s")
                extra = f", base+adapter merges written by {merged:.1f} s" if merged else ""
                print(f"  {tool} {method}: {run['wall_s']:.2f} s wall, {run['cpu_s']:.2f} s CPU, peak RSS "
                      f"{run['peak_rss_bytes'] / 1e9:.2f} GB{extra}, load before {run['loadavg_before']:.2f}")
        for tool, done in runs.items():
            ok = bool(done) and not errors[tool]
            keys = ("wall_s", "cpu_s") + (("lora_merge_s",) if tool == "mergekit" else ())
            results[tool][method] = {"runs": done, "error": errors[tool], **{
                key: statistics.median(r[key] for r in done) if ok and all(r.get(key) is not None for r in done)
                else None for key in keys}, "peak_rss_gb": max(r["peak_rss_bytes"] for r in done) / 1e9 if ok else None}
    return results, kept


def tensors_of(directory: Path) -> dict[str, Path]:
    """Tensor name -> shard file of a safetensors checkpoint directory."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        return {k: directory / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    names = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            names.update(dict.fromkeys(f.keys(), path))
    return names


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bfloat16 numbers at |x| (8 significant bits): 2^(e-8) for |x| = m·2^e, m in [0.5, 1)."""
    exponent = torch.frexp(x.abs().clamp_min(torch.finfo(torch.bfloat16).tiny)).exponent
    return torch.ldexp(torch.ones_like(x), exponent - 8)


class Inputs:
    """The merge's inputs, one tensor at a time: the base and each fine-tune base + scaling·B A, in float32."""

    def __init__(self, base: Path, adapters: dict[str, Path], cfg: dict, args: argparse.Namespace):
        self.base = tensors_of(base)
        self.files = [d / "adapter_model.safetensors" for d in adapters.values()]
        self.touched = {module + ".weight": module for module, _, _ in lora_shapes(cfg)}
        self.scaling = args.alpha / args.rank

    def get(self, name: str, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(base, [delta of each adapter]) of tensor ``name``."""
        with safe_open(str(self.base[name]), "pt") as f:
            base = f.get_tensor(name).to(dtype)
        deltas = []
        for path in self.files:
            if name not in self.touched:
                deltas.append(torch.zeros_like(base))
                continue
            with safe_open(str(path), "pt") as f:
                b, a = (f.get_tensor(f"{PEFT_PREFIX}{self.touched[name]}.lora_{x}.weight").to(dtype) for x in "BA")
            deltas.append(self.scaling * (b @ a))
        return base, deltas

    def magnitude(self, name: str) -> torch.Tensor:
        """max(|base|, |base + delta_i|) per entry: the scale at which bf16 rounds a merge's inputs."""
        base, deltas = self.get(name)
        return torch.stack([base.abs(), *((base + d).abs() for d in deltas)]).amax(0)


def compare(a_dir: Path, b_dir: Path, inputs: Inputs) -> dict:
    """Max abs difference between two outputs, also in bf16 units in the last place (ulp) of the largest magnitude
    among the two outputs and the merge's inputs at that entry (a tool that rounds each base + adapter to bf16
    before merging, as mergekit's cache does, errs at the inputs' scale, not the output's), and how many differ."""
    a_names, b_names = tensors_of(a_dir), tensors_of(b_dir)
    out = {"same_names": sorted(a_names) == sorted(b_names), "max_abs": 0.0, "max_ulps": 0.0, "differing": 0,
           "over_1_ulp": 0, "entries": 0, "worst_tensor": None}
    for name in sorted(set(a_names) & set(b_names)):
        with safe_open(str(a_names[name]), "pt") as fa, safe_open(str(b_names[name]), "pt") as fb:
            a, b = fa.get_tensor(name).float(), fb.get_tensor(name).float()
        diff = (a - b).abs()
        ulps = diff / bf16_ulp(torch.stack([a.abs(), b.abs(), inputs.magnitude(name)]).amax(0))
        if diff.max().item() > out["max_abs"]:
            out["worst_tensor"] = name
        out["max_abs"] = max(out["max_abs"], diff.max().item())
        out["max_ulps"] = max(out["max_ulps"], ulps.max().item())
        out["differing"] += int((diff > 0).sum())
        out["over_1_ulp"] += int((ulps > 1).sum())
        out["entries"] += diff.numel()
    out["differing_share"] = out["differing"] / max(out["entries"], 1)
    return out


def exact_linear(inputs: Inputs, cfg: dict, outputs: dict[str, Path]) -> dict:
    """Layer 0's seven projections merged linearly in float64 from the inputs (base + Σ wᵢ·scaling·Bᵢ Aᵢ / Σ wᵢ),
    against each tool's linear output: the largest error in ulp of the inputs' magnitude, as in ``compare`` (0.5:
    rounded once from the exact value)."""
    err = {tool: 0.0 for tool in outputs}
    for module, _, _ in lora_shapes(cfg)[:len(TARGETS)]:
        target = module + ".weight"
        base, deltas = inputs.get(target, torch.float64)
        exact = base + sum(w * d for w, d in zip(WEIGHTS, deltas)) / sum(WEIGHTS)
        scale = bf16_ulp(torch.maximum(exact.abs().float(), inputs.magnitude(target))).double()
        for tool, out in outputs.items():
            with safe_open(str(tensors_of(out)[target]), "pt") as f:
                got = f.get_tensor(target).double()
            err[tool] = max(err[tool], ((got - exact).abs() / scale).max().item())
    return err


def report(args, info, floor, results, checks, command) -> str:
    ms, mk = results["mergesmith"], results.get("mergekit", {})
    rows = ["| method | tool | wall s (median) | CPU s (median) | peak RSS GB | ratio to I/O floor | speed-up vs "
            "mergekit | mergekit's base+adapter merges written by (s after start) |", "|---" * 8 + "|"]
    for method in METHODS:
        for tool, res in (("mergesmith", ms), ("mergekit", mk)):
            r = res.get(method)
            if r is None:
                continue
            speed = mk[method]["wall_s"] / r["wall_s"] if mk.get(method, {}).get("wall_s") and r["wall_s"] else None
            cells = ["failed" if r["error"] else fmt(r["wall_s"]), fmt(r["cpu_s"], ".1f"), fmt(r["peak_rss_gb"]),
                     fmt(r["wall_s"] / floor if r["wall_s"] else None, ".1f") + "x",
                     (fmt(speed, ".2f") + "x" if speed else "—") if tool == "mergesmith" else "1.00x" if speed else "—",
                     fmt(r.get("lora_merge_s"), ".1f") if tool == "mergekit" else "—"]
            rows.append("| " + " | ".join([method, tool, *cells]) + " |")
    loads = [run["loadavg_before"] for res in results.values() for m in res.values() for run in m["runs"]]
    sources = sorted({run["source"] for m in ms.values() for run in m["runs"]})
    changed = " WARNING: mergesmith's source changed between runs." if len(sources) > 1 else ""
    lines = ["# mergesmith speed benchmark: LoRA adapters into a full model", "",
             f"Base: bench_merge.py's Llama-shaped bf16 checkpoint, {args.layers} layers, hidden {args.hidden}, "
             f"{args.model_bytes / 1e9:.2f} GB. Three PEFT LoRA adapters over it: r {args.rank}, lora_alpha "
             f"{args.alpha}, all seven projections, random float32 A and B (delta std 0.001), "
             f"{args.adapter_bytes / 1e6:.1f} MB each. Recipes: base_model the base; models the adapter directories "
             "(mergesmith) or BASE+ADAPTER (mergekit; its linear recipe without base_model, which mergekit would "
             "take as a fourth input); weights 0.4/0.3/0.3, ties density 0.5; output bf16, 200 MB shards."
             f" Median wall and CPU (user+sys) time of {args.repeats} alternating run(s), max peak RSS (child "
             "process tree); speed-up = mergekit wall / mergesmith wall.", "",
             f"I/O floor = read the base and the three adapter files once from a warm page cache + write one model's "
             f"bytes (no fsync): {floor:.2f} s. Read {args.read_gbps:.2f} GB/s, write {args.write_gbps:.2f} GB/s.", "",
             *rows, ""]
    if "linear" in checks.get("compare", {}):
        c = checks["compare"]["linear"]
        lines += [f"Linear outputs, mergesmith against mergekit: max abs difference {c['max_abs']:.3g} (worst tensor "
                  f"{c['worst_tensor']}), {c['max_ulps']:.2f} bf16 ulp of the largest magnitude among the two outputs "
                  f"and the inputs (base, base + each delta) at an entry; {100 * c['differing_share']:.3f}% of entries "
                  f"differ, {c['over_1_ulp']} by more than 1 ulp; same tensor names: {c['same_names']}. Layer 0's "
                  "projections against a float64 merge from the inputs, max error in those ulp (0.5 = rounded once): "
                  + ", ".join(f"{t} {e:.2f}" for t, e in checks["exact_linear"].items()) + ".", ""]
    if "ties" in checks.get("compare", {}):
        c = checks["compare"]["ties"]
        lines += [f"TIES outputs, mergesmith against mergekit (informative): max abs difference {c['max_abs']:.3g} "
                  f"({c['max_ulps']:.2f} ulp as above), {100 * c['differing_share']:.3f}% of entries differ, "
                  f"{c['over_1_ulp']} by more than 1 ulp.", ""]
    if checks.get("stated_bound_gb"):
        lines += ["mergesmith's stated peak-memory bound (`--dry-run`): " + ", ".join(
            f"{m} {b:.2f} GB" for m, b in checks["stated_bound_gb"].items()) + "; measured peak RSS: " + ", ".join(
            f"{m} {ms[m]['peak_rss_gb']:.2f} GB" for m in checks["stated_bound_gb"] if ms.get(m, {}).get("peak_rss_gb"))
            + ".", ""]
    cache = [run for m in mk.values() for run in m["runs"] if run.get("cache_bytes")]
    if cache:
        lines += [f"mergekit writes each base+adapter merge to --lora-merge-cache as a full model before merging: "
                  f"{cache[0]['cache_bytes'] / 1e9:.2f} GB in {cache[0]['cache_dtype']} per run (a fresh cache each "
                  "run; it reuses merges it finds there).", ""]
    lines += [f"peft check: {checks['peft']}.", "",
              f"1-minute load average before a run: {min(loads, default=0):.2f} to {max(loads, default=0):.2f} (above "
              f"{os.cpu_count()} means other work shared the CPUs). Start-up (`--help`) wall time, part of every run: "
              + ", ".join(f"{t} {s:.1f} s" for t, s in args.startup.items()) + f". mergesmith source: "
              f"{', '.join(sources)}.{changed}", "",
              "Machine: " + ", ".join(f"{k}: {v}" for k, v in info.items()), "",
              "Reproduce (from the repository root):", "", f"    {command}", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work-dir", type=lambda p: Path(p).resolve(), default=HERE / "work",
                    help="models (cached, shared with bench_merge.py), adapters, recipes, outputs")
    ap.add_argument("--layers", type=int, default=16, help="decoder layers (2 for a quick smoke run)")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mergekit", help="path to a mergekit-yaml executable (its own venv) to compare with")
    ap.add_argument("--results", type=Path, default=HERE, help="directory for lora_results.md and lora_results.json")
    args = ap.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", os.path.relpath(__file__, REPO), *sys.argv[1:]])

    info = machine_info(args)  # before the runs: records the commit being measured
    base = generate(args)["base"]
    cfg = json.loads((base / "config.json").read_text())
    adapters = make_adapters(cfg, base, args)
    checks = {"peft": peft_check(cfg, adapters[ADAPTERS[0]], args)}
    recipes = write_recipes(base, adapters, args.work_dir / "recipes")
    checks["stated_bound_gb"] = {m: stated_bound(r, args.work_dir) for m, r in recipes["mergesmith"].items()}

    base_files = sorted(base.glob("*.safetensors"))
    adapter_files = [d / "adapter_model.safetensors" for d in adapters.values()]
    model_bytes = args.model_bytes = sum(f.stat().st_size for f in base_files)
    args.adapter_bytes = adapter_files[0].stat().st_size
    buf = bytearray(64 * 2**20)
    time_read(base_files + adapter_files, buf)  # warm the page cache
    read_s = statistics.median(time_read(base_files + adapter_files, buf) for _ in range(args.repeats))
    write_s = statistics.median(time_write(model_bytes, args.work_dir / "write-floor.bin", buf)
                                for _ in range(args.repeats))
    floor = read_s + write_s
    args.read_gbps = (model_bytes + 3 * args.adapter_bytes) / 1e9 / read_s
    args.write_gbps = model_bytes / 1e9 / write_s
    print(f"I/O floor: read {args.read_gbps:.2f} GB/s, write {args.write_gbps:.2f} GB/s; {floor:.2f} s")

    tools = {"mergesmith": lambda r, o, c: [sys.executable, "-m", "mergesmith.cli", "merge", str(r), str(o),
                                            "--overwrite", "--max-shard-size", "200MB", "--quiet"]}
    if args.mergekit:  # as bench_merge.py runs it, plus the cache mergekit needs for BASE+ADAPTER
        tools["mergekit"] = lambda r, o, c: ["env", "HF_HUB_OFFLINE=1", args.mergekit, str(r), str(o),
                                             "--out-shard-size", "200M", "--lazy-unpickle", "--allow-crimes",
                                             "--no-copy-tokenizer", "--device", "cpu", "--random-seed", "0", "--quiet",
                                             "--lora-merge-cache", str(c)]
    helps = {"mergesmith": [sys.executable, "-m", "mergesmith.cli", "--help"], "mergekit": [args.mergekit, "--help"]}
    args.startup = {t: statistics.median(run_timed(helps[t], args.work_dir / "help.log")["wall_s"]
                                         for _ in range(args.repeats)) for t in tools}
    results, kept = bench(tools, recipes, args)

    inputs = Inputs(base, adapters, cfg, args)
    checks["compare"] = {m: compare(kept["mergesmith"][m], kept["mergekit"][m], inputs) for m in METHODS
                         if m in kept["mergesmith"] and m in kept.get("mergekit", {})}
    linear_outputs = {tool: kept[tool]["linear"] for tool in kept if "linear" in kept[tool]}
    checks["exact_linear"] = exact_linear(inputs, cfg, linear_outputs) if linear_outputs else {}
    for outs in kept.values():
        for out in outs.values():
            shutil.rmtree(out, ignore_errors=True)

    text = report(args, info, floor, results, checks, command)
    print("\n" + text)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "lora_results.md").write_text(text)
    record = {"command": command, "machine": info, "model_bytes": model_bytes, "adapter_bytes": args.adapter_bytes,
              "read_s": read_s, "write_s": write_s, "io_floor_s": floor, "startup_s": args.startup,
              "repeats": args.repeats, "checks": checks, **results}
    (args.results / "lora_results.json").write_text(json.dumps(record, indent=2))
    # bf16 rounding: mergesmith rounds once (0.5 ulp), mergekit rounds each base + adapter and the output (0.5 + 0.5)
    if "linear" in checks["compare"] and checks["compare"]["linear"]["max_ulps"] > 1.5:
        sys.exit("the two tools' linear outputs differ by more than bf16 rounding (1.5 ulp)")


if __name__ == "__main__":
    main()
