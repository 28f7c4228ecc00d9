"""Measure a Hugging Face checkpoint directory on a data file: the library's entry point behind
``mergesmith measure``, the demo and the benchmarks.

Every option is checked first, then the model's files, then the data — all before a weight is read — and
the same one-line errors as the CLI's come out as typed exceptions. Under torchrun each rank measures its
share and the sums are all-reduced; the caller saves on rank 0.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergesmith.checks import check_device
from mergesmith.errors import MergeWarning, UsageError, did_you_mean
from mergesmith.io.adapter import AdapterSource, adapter_files, open_adapter
from mergesmith.measure import Statistics, check_kinds, classifier_fisher_labels, examples_in, hf, measure
from mergesmith.measure.data import load_examples
from mergesmith.measure.hf import (
    CLASSIFIER_TASKS,
    TOKENIZER_FILES,
    adapter_head,
    batches,
    causal_lm_fisher_labels,
    causal_lm_log_likelihood,
    check_images,
    check_labels,
    check_task,
    check_tokens,
    class_log_probs,
    classifier_log_likelihood,
    image_batches,
    infer_task,
    load_tokenizer,
    read_config,
)
from mergesmith.measure.select import compile_excludes, parse_factor_budget

FISHER_VARIANTS = ("empirical", "sampled", "exact")


@dataclass
class MeasureRun:
    """What ``measure_checkpoint`` measured: the statistics, on how many examples (all ranks'), which kinds,
    and this process's place under torchrun (rank 0 of 1 otherwise)."""

    statistics: Statistics
    examples: int
    kinds: list[str]
    rank: int = 0
    world: int = 1


def measure_checkpoint(model: str | Path, data: str | Path | Sequence[Mapping[str, Any]], *,
                       kinds: Iterable[str] = ("fisher",), task: str | None = None, text_field: str = "text",
                       label_field: str | None = None, max_length: int = 512, batch_size: int = 8,
                       max_examples: int | None = None, seed: int = 0, device: str = "cpu",
                       fisher: str = "empirical", samples: int = 1, exclude: Iterable[str] = (),
                       max_factor_size: str | int | None = "1x", trust_remote_code: bool = False,
                       progress: Callable[[int, int], None] | None = None, base: str | Path | None = None
                       ) -> MeasureRun:
    """Measure ``kinds`` (fisher, gram, kfac) of the model directory ``model`` on ``data``: a data file
    (JSONL, CSV, text, parquet, a saved ``datasets`` directory; docs/statistics.md) or a list of examples
    ``{"text": ..., "label": ...}`` (``{"pixel_values": [channels][height][width] numbers or a tensor,
    "label": ...}`` for ``task="image-cls"``, whose data files hold a ``pixel_values`` field). ``progress(done,
    total)`` hears each batch. The options mean what ``mergesmith measure --help`` says; save with
    ``run.statistics.save(directory)``.

    ``model`` may be a PEFT LoRA adapter directory (over ``base``, else the base its config records) or
    ``BASE+ADAPTER``: the model measured is base + adapter, and the sidecar is keyed by the base's parameter
    names, as a merge of the adapter reads it."""
    adapter = _adapter(model, base)
    model = Path(model) if adapter is None else Path(adapter.base.path)
    kinds = check_kinds(list(kinds))
    if task is not None:
        check_task(task)
    if fisher not in FISHER_VARIANTS:
        close = did_you_mean(fisher, FISHER_VARIANTS)
        raise UsageError(f"--fisher {fisher}: expected empirical, sampled or exact"
                         f"{close if 'did you mean' in close else ''}")
    for option, value, meaning in (("--samples", samples, "draw at least 1 label per example"),
                                   ("--batch-size", batch_size, "at least 1 example per batch"),
                                   ("--max-length", max_length, "keep at least 1 token per example"),
                                   ("--max-examples", max_examples, "measure at least 1 example (omit it for all)")):
        if value is not None and value < 1:
            raise UsageError(f"{option} {value}: {meaning}")
    budget = parse_factor_budget(max_factor_size)
    excludes = list(exclude)
    compile_excludes(excludes)
    check_device(device)
    config = read_config(model, trust_remote_code=trust_remote_code)
    if adapter is not None:
        config = {**config, **adapter_head(adapter, config)}
    task = task or infer_task(model, config)
    if fisher == "exact" and task == "causal-lm":
        raise UsageError("--fisher exact is intractable for causal-lm (an expectation over vocabulary^length label "
                         "sequences); use --fisher sampled --samples k")
    if task == "causal-lm" and max_length < 2:
        raise UsageError(f"--max-length {max_length}: a causal LM predicts each token from the ones before it, so "
                         f"keep at least 2 tokens")
    classifier = task in CLASSIFIER_TASKS
    if isinstance(data, (str, Path)):
        if classifier and label_field is None:
            raise UsageError(f"{task} needs labels: pass --label-field with the data's label column")
        examples = load_examples(data, text_field=text_field, label_field=label_field if classifier else None,
                                 max_examples=max_examples, seed=seed,
                                 image_field="pixel_values" if task == "image-cls" else None)
        where = Path(data)
    else:
        examples, where = [dict(e) for e in data], Path("<examples>")
    check_labels(examples, config, task, where)
    rank, world = start_distributed(device)
    with warnings.catch_warnings():
        if rank != 0:  # under torchrun: one warning, not one per process
            warnings.simplefilter("ignore", MergeWarning)
        if task == "image-cls":  # pixels as given: no tokenizer
            examples, tokenizer = check_images(examples, config, where), None
        else:
            tokenizer = load_tokenizer(_tokenizer_dir(adapter, model), trust_remote_code=trust_remote_code,
                                       config_dir=model)
            length = check_tokens(examples, tokenizer, config, task=task, max_length=max_length,
                                  batch_size=batch_size, model_dir=model, data=where)
        share = examples[rank::world]  # under torchrun: each rank its share
        # through the module: the one seam where tests put a model transformers cannot build
        network, tokenizer = hf.load_model(model, task, trust_remote_code=trust_remote_code, tokenizer=tokenizer,
                                           adapter=adapter)
        if world > 1 and device.startswith("cuda"):  # under torchrun: one GPU per rank
            device = f"cuda:{rank % torch.cuda.device_count()}"
        network.to(device)
        log_likelihood = classifier_log_likelihood if classifier else causal_lm_log_likelihood
        if task == "image-cls":
            stream = image_batches(share, batch_size=batch_size, device=torch.device(device))
        else:
            stream = batches(share, tokenizer, batch_size=batch_size, max_length=length, device=torch.device(device))
        # under torchrun each rank draws from its own stream; one process draws with ``seed`` itself
        draw_seed = seed * world + rank
        if fisher == "empirical":
            labels = None
        elif task == "causal-lm":
            labels = causal_lm_fisher_labels(samples, seed=draw_seed)
        else:
            labels = classifier_fisher_labels(fisher, class_log_probs, samples=samples, seed=draw_seed)
        statistics = measure(network, _counted(stream, len(share), progress), log_likelihood=log_likelihood,
                             kinds=kinds, fisher_labels=labels, fisher_variant=fisher, exclude=excludes,
                             max_factor_size=budget)
    return MeasureRun(statistics, len(examples), list(kinds), rank, world)


def _adapter(model: str | Path, base: str | Path | None) -> AdapterSource | None:
    """base + adapter when ``model`` names an adapter (a directory, or BASE+ADAPTER), else None."""
    found = adapter_files(str(model))
    if found is None:
        if base is not None:
            raise UsageError(f"--base {base}: {model} is a full model, not a LoRA adapter; --base is for adapters")
        return None
    adapter, recorded = found
    return open_adapter(adapter, recorded or base, str(model))


def _tokenizer_dir(adapter: AdapterSource | None, model: Path) -> Path:
    """The adapter's own tokenizer when it was saved with one (a fine-tune may add tokens), else the base's."""
    if adapter is not None and any((adapter.adapter.path / name).is_file() for name in TOKENIZER_FILES):
        return adapter.adapter.path
    return model


def _counted(stream: Iterable[dict[str, Any]], total: int, progress: Callable[[int, int], None] | None):
    done = 0
    for batch in stream:
        yield batch
        done += examples_in(batch)
        if progress is not None:
            progress(done, total)


def start_distributed(device: str) -> tuple[int, int]:
    """Join the process group when launched by torchrun (gloo on CPU, nccl on GPU); (rank, world size)."""
    import torch.distributed as dist

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size()
