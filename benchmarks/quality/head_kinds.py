"""Which frozen head makes the text suite measure something? Fine-tunes MiniLM-L6 on the text suite's six
tasks (seed 0) with three kinds of head and prints start, fine-tune, plain average and task arithmetic
accuracy per task, and the normalised means (docs/quality.md, "Why random heads"; about 4 min per kind on
2 cores):

    python benchmarks/quality/head_kinds.py lp:1e-4:120 ncm:1e-4:120 rand:1e-4:120 ncm:2e-4:120

Each argument is kind:learning-rate:steps; kinds: lp (linear probe), ncm (normalised class means, like
CLIP's text-embedding heads), rand (fixed random directions). Merges here are in memory, for speed: this is
an experiment on the suite's design, not the benchmark.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

from mergesmith.quality import protocol as P
from mergesmith.quality import text as suite


def scaled(directions: torch.Tensor, x: torch.Tensor) -> P.Head:
    """Unit directions centred on the mean feature, scaled so the start's logits have standard deviation 2."""
    mean = x.mean(0)
    weight = directions * (2 / ((x - mean) @ directions.T).std())
    return P.Head(weight.float(), (-(weight @ mean)).float())


def class_means(x: torch.Tensor, labels: torch.Tensor, classes: int) -> P.Head:
    mean = x.mean(0)
    directions = torch.stack([(x[labels == c] - mean).mean(0) for c in range(classes)])
    return scaled(directions / directions.norm(dim=1, keepdim=True), x)


def random_directions(x: torch.Tensor, classes: int, generator: torch.Generator) -> P.Head:
    directions = torch.randn(classes, x.shape[1], generator=generator)
    return scaled(directions / directions.norm(dim=1, keepdim=True), x)


def head_of(kind: str, x: torch.Tensor, labels: torch.Tensor, classes: int, generator: torch.Generator) -> P.Head:
    if kind == "lp":
        return P.linear_probe(x, labels, classes)
    if kind == "ncm":
        return class_means(x, labels, classes)
    return random_directions(x, classes, generator)


def normalised(accuracy: dict[str, float], own: dict[str, float]) -> float:
    return sum(accuracy[n] / own[n] for n in own) / len(own)


def merged(states: list[dict], base: dict, scale: float | None) -> dict:
    """The plain average of the fine-tunes (scale None) or task arithmetic at λ = scale."""
    out = {}
    for key, value in base.items():
        if not value.is_floating_point():
            out[key] = value
            continue
        deltas = [state[key] - value for state in states]
        out[key] = value + (sum(deltas) / len(deltas) if scale is None else scale * sum(deltas))
    return out


def main(specs: list[str], seed: int = 0) -> None:
    torch.set_num_threads(2)
    base_dir = Path(tempfile.mkdtemp(prefix="head-kinds-")) / "base"
    suite.make_base(base_dir)
    tasks = suite.make_tasks(seed)
    start = P.load(base_dir)
    features = {t.name: P.features(start, suite, t.train) for t in tasks}
    base_state = {k: v.clone() for k, v in start.state_dict().items() if not k.startswith("classifier")}
    for spec in specs:
        kind, lr, steps = spec.split(":")
        t0 = time.time()
        generator = torch.Generator().manual_seed(seed)
        heads = {t.name: head_of(kind, features[t.name], P.labels_of(t.train), t.num_labels, generator)
                 for t in tasks}
        start_acc = {t.name: P.accuracy(start, heads[t.name], suite, t.test) for t in tasks}
        states, own = [], {}
        for t in tasks:
            model = P.load(base_dir)
            P.train_body(model, suite, [t], heads, steps=int(steps), lr=float(lr), batch_size=16,
                         weight_decay=0.0, seed=seed)
            own[t.name] = P.accuracy(model, heads[t.name], suite, t.test)
            states.append({k: v.clone() for k, v in model.state_dict().items() if not k.startswith("classifier")})
        scores = {}
        for label, scale in (("avg", None), ("ta0.3", 0.3), ("ta0.5", 0.5)):
            model = P.load(base_dir)
            model.load_state_dict(merged(states, base_state, scale), strict=False)
            scores[label] = {t.name: P.accuracy(model, heads[t.name], suite, t.test) for t in tasks}
        print(f"== {spec} ({time.time() - t0:.0f}s)")
        for t in tasks:
            print(f"  {t.name:16s} start {start_acc[t.name]:.3f} ft {own[t.name]:.3f} avg "
                  f"{scores['avg'][t.name]:.3f} ta.3 {scores['ta0.3'][t.name]:.3f}")
        print(f"  normalised: start {normalised(start_acc, own):.3f} avg {normalised(scores['avg'], own):.3f} "
              f"ta0.3 {normalised(scores['ta0.3'], own):.3f} ta0.5 {normalised(scores['ta0.5'], own):.3f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["lp:1e-4:120", "ncm:1e-4:120", "rand:1e-4:120"])
