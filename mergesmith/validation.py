"""Validation data for ``tune:`` with ``data:``: each model's examples, scored on a merge streamed straight
into one model in memory (no checkpoint written per trial).

Every model's data is read, checked and tokenised once, before the search, with its own tokenizer (an
adapter without one: the base's), in ``mergesmith measure``'s format and with its checks. A trial merges the
recipe with the engine into the tensors of one network built from the base (or the first model); with
``heads: each`` each model's own head is put in before its data is scored. Scores: the mean log-likelihood —
per example for a classifier, per predicted token for a causal LM — or the accuracy (the argmax class, or
the argmax next token).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from mergesmith.config import Recipe
from mergesmith.errors import UsageError

SCORES = ("loglik", "accuracy")


@dataclass
class ModelData:
    model: str  # the recipe's model entry
    batches: list[dict[str, Tensor]]
    examples: int


@dataclass
class ValidationSet:
    task: str
    network: nn.Module
    data: list[ModelData]

    def score(self, recipe: Recipe, score: str, *, device: str = "cpu", seed: int = 0) -> dict[str, float]:
        """Merge ``recipe`` into the network and score each model's data on it: model -> loglik or accuracy."""
        from mergesmith.api import _plan
        from mergesmith.execute import execute

        plan = _plan(recipe, "", damage=False)
        state = self.network.state_dict()
        unknown = []
        # with heads: each, every model's own head goes in before its data is scored, so the merge's head is
        # never scored (and the network's head is the last model's, of its label space, from the trial before)
        heads = {name for names in plan.kept_heads.values() for name in names}

        def into_network(name: str, tensor: Tensor) -> None:
            if name in heads:
                return
            target = state.get(name)
            if target is None or target.shape != tensor.shape:
                unknown.append(name)
                return
            target.copy_(tensor.to(target.dtype))

        execute(plan, into_network, device=device, seed=seed)
        if unknown:
            raise UsageError(f"tune: data: the merged tensor {unknown[0]} is not one of the network's (built from "
                             f"{recipe.base_model or recipe.models[0].model}, as transformers names its tensors in "
                             f"memory); validation tuning needs the models' own architecture, named in memory as "
                             f"in its checkpoint")
        sources = {s.name: s for s in plan.sources}
        results = {}
        for entry in self.data:
            for name in plan.kept_heads.get(entry.model, []):
                _put(self.network, name, sources[entry.model].get(name))
            results[entry.model] = _score(self.network, self.task, entry.batches, score)
        return results


def _put(network: nn.Module, name: str, tensor: Tensor) -> None:
    """One head tensor into the network: copied where the shapes agree, the parameter replaced where the head
    has another label space (a head is never tied to another tensor)."""
    state = network.state_dict()
    if name in state and state[name].shape == tensor.shape:
        state[name].copy_(tensor.to(state[name].dtype))
        return
    module_name, _, leaf = name.rpartition(".")
    try:
        module = network.get_submodule(module_name)
    except AttributeError:
        raise UsageError(f"tune: data: the head tensor {name} has no place in the network") from None
    setattr(module, leaf, nn.Parameter(tensor.float().clone(), requires_grad=False))


@torch.inference_mode()
def _score(network: nn.Module, task: str, batches: list[dict[str, Tensor]], score: str) -> float:
    from mergesmith.measure.hf import causal_lm_log_likelihood, classifier_log_likelihood

    network.eval()
    total = count = 0.0
    for batch in batches:
        if task == "causal-lm":
            if score == "loglik":
                total += float(causal_lm_log_likelihood(network, batch).sum())
            else:
                logits = network(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                counted = batch["attention_mask"][:, 1:].bool()
                total += float(((logits[:, :-1].argmax(-1) == batch["input_ids"][:, 1:]) & counted).sum())
            count += float(batch["attention_mask"][:, 1:].sum())
        else:
            if score == "loglik":
                total += float(classifier_log_likelihood(network, batch).sum())
            else:
                from mergesmith.measure.hf import class_log_probs

                total += float((class_log_probs(network, batch).argmax(-1) == batch["labels"]).sum())
            count += len(batch["labels"])
    return total / count


def load_validation(recipe: Recipe, data: Mapping[str, str], *, text_field: str = "text",
                    label_field: str | None = "label", examples: int = 64, batch_size: int = 8,
                    max_length: int = 512, seed: int = 0, device: str = "cpu") -> ValidationSet:
    """Every model's validation examples, checked and batched, and the network trials are merged into."""
    from mergesmith.measure.hf import load_network

    task, skeleton, prepared = model_batches(recipe, data, text_field=text_field, label_field=label_field,
                                             examples=examples, batch_size=batch_size, max_length=max_length,
                                             seed=seed, device=device, purpose="tune: data")
    return ValidationSet(task, load_network(skeleton, task).to(device), prepared)


def model_batches(recipe: Recipe, data: Mapping[str, str], *, text_field: str, label_field: str | None,
                  examples: int, batch_size: int, max_length: int, seed: int, device: str, purpose: str
                  ) -> tuple[str, Path, list[ModelData]]:
    """(task, the checkpoint a network is built from, each model's batches): every model's examples read,
    checked and tokenised as ``mergesmith measure`` does, with the model's own tokenizer (else the base's)."""
    from mergesmith.io.adapter import adapter_files
    from mergesmith.measure.data import load_examples
    from mergesmith.measure.hf import (
        CLASSIFIER_TASKS,
        TOKENIZER_FILES,
        batches,
        check_images,
        check_labels,
        check_tokens,
        image_batches,
        infer_task,
        load_tokenizer,
        read_config,
    )

    models = [m.model for m in recipe.models]
    skeleton = Path(recipe.base_model or models[0])
    if adapter_files(str(skeleton)) is not None:
        raise UsageError(f"{purpose}: {skeleton} is an adapter; the model is built from a full checkpoint: give "
                         f"the recipe a base_model")
    config = read_config(skeleton)
    task = infer_task(skeleton, config)
    images = task == "image-cls"
    if images and label_field is None:
        raise UsageError(f"{purpose}: image classifiers are not supported yet (calibration data is text)")
    classifier = task in CLASSIFIER_TASKS
    prepared = []
    for model in models:
        where = Path(data[model])
        own = Path(model)
        own_config = read_config(own) if (own / "config.json").is_file() else config
        wants_labels = classifier and label_field is not None  # calibration data needs no labels
        rows = load_examples(where, text_field=text_field, label_field=label_field if wants_labels else None,
                             max_examples=examples, seed=seed, image_field="pixel_values" if images else None)
        if wants_labels:
            check_labels(rows, own_config, task, where)
        if images:  # pixels as given, as measure takes them: no tokenizer
            stream = image_batches(check_images(rows, own_config, where), batch_size=batch_size,
                                   device=torch.device(device))
        else:
            tokenizer_dir = own if any((own / f).is_file() for f in TOKENIZER_FILES) else skeleton
            tokenizer = load_tokenizer(tokenizer_dir, config_dir=skeleton)
            length = check_tokens(rows, tokenizer, own_config, task=task, max_length=max_length,
                                  batch_size=batch_size, model_dir=tokenizer_dir, data=where)
            stream = batches(rows, tokenizer, batch_size=batch_size, max_length=length, device=torch.device(device))
        prepared.append(ModelData(model, list(stream), len(rows)))
    return task, skeleton, prepared

