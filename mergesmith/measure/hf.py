"""Hugging Face models for ``mergesmith measure``: loading, tokenising, and the per-example log-likelihood.

causal-lm: an example is a sequence; its log-likelihood is the sum over its non-padding target tokens of
log p(token | previous tokens), the tokens being the data's (empirical Fisher) or drawn from the model
(sampled Fisher, ``causal_lm_fisher_labels``). seq-cls: log p(label | text) under the classifier.
image-cls: log p(label | image) under an image classifier, whose examples carry ``pixel_values`` (channels,
height, width) already prepared as the model takes them (no tokenizer, no image processor).
"""

from __future__ import annotations

import json
import operator
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from mergesmith.architecture import HEAD_PREFIXES
from mergesmith.errors import CheckpointError, DataError, MergeWarning, UsageError, did_you_mean

if TYPE_CHECKING:
    from mergesmith.measure import FisherLabels

TASKS = ("causal-lm", "seq-cls", "image-cls")
CLASSIFIER_TASKS = ("seq-cls", "image-cls")  # log p(label | input): labels from the data, one per example
TEXT_TASKS = ("causal-lm", "seq-cls")  # tokenised with the model's own tokenizer
MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values")  # what a batch feeds the model (labels are targets)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model")
_UNSET = 10 ** 12  # transformers' model_max_length when a tokenizer states none is 1e30: "no limit"


def read_config(model_dir: Path, *, trust_remote_code: bool = False) -> dict[str, Any]:
    """``config.json`` of a local model directory, checked before anything else is read: the directory exists
    and is a Hugging Face model, and it asks to run no code of its own (``auto_map``) unless allowed."""
    if not model_dir.exists():
        raise CheckpointError(f"model {model_dir} not found: measure reads a local Hugging Face model directory "
                              f"(config.json, weights, tokenizer) and never downloads")
    if not model_dir.is_dir():
        raise CheckpointError(f"model {model_dir} is not a directory: measure reads a Hugging Face model "
                              f"directory (config.json, weights, tokenizer)")
    path = model_dir / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{model_dir} has no config.json, so it is not a Hugging Face model directory; "
                              f"point measure at the directory save_pretrained wrote")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno}); restore the "
                              f"model's config.json") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {path} ({e}); restore the model's config.json") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: a JSON {type(config).__name__}, expected an object; restore the model's "
                              f"config.json")
    if not trust_remote_code:
        for name in ("config.json", "tokenizer_config.json"):
            settings = config if name == "config.json" else _json_object(model_dir / name)
            auto_map = settings.get("auto_map")
            if auto_map:
                shown = ", ".join(sorted(auto_map)) if isinstance(auto_map, dict) else str(auto_map)
                raise CheckpointError(f"{model_dir / name} asks to run code shipped with the model (auto_map: "
                                      f"{shown}); mergesmith runs no checkpoint code: pass --trust-remote-code only "
                                      f"if you trust {model_dir}, or delete auto_map to use transformers' own "
                                      f"'{config.get('model_type', '?')}' implementation")
    return config


def _json_object(path: Path) -> dict[str, Any]:
    """A JSON object from an optional file; {} when it is absent or unreadable (transformers reports those)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def infer_task(model_dir: Path, config: dict[str, Any] | None = None) -> str:
    architectures = (config if config is not None else read_config(model_dir)).get("architectures") or []
    for name in architectures:
        if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
            return "causal-lm"
        if name.endswith("ForSequenceClassification"):
            return "seq-cls"
        if name.endswith("ForImageClassification"):
            return "image-cls"
    raise UsageError(f"{model_dir}: cannot tell the task from config.json (architectures: "
                     f"{', '.join(map(str, architectures)) or 'none'}); pass --task causal-lm, seq-cls or "
                     f"image-cls")


def check_task(task: str) -> str:
    if task not in TASKS:
        raise UsageError(f"--task {task}: not a task{did_you_mean(task, TASKS)}")
    return task


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    # the CLI's own progress bar and one-line errors are the interface: keep transformers quiet
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_tokenizer(model_dir: Path, *, trust_remote_code: bool = False, config_dir: Path | None = None) -> Any:
    """The model directory's own tokenizer (local files only), with a padding token. ``config_dir``: where the
    model's config.json is, when it is not beside the tokenizer (an adapter saved with its tokenizer)."""
    from transformers import AutoTokenizer

    _quiet_transformers()
    read_config(config_dir or model_dir, trust_remote_code=trust_remote_code)
    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(f"{model_dir} has no tokenizer (none of {', '.join(TOKENIZER_FILES[:3])}, ...): "
                              f"measure tokenises the data with the model's own tokenizer; copy the tokenizer files "
                              f"of the model it was fine-tuned from into {model_dir}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True,
                                                  trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:  # transformers' words for tokenizer files it cannot use
        reason = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise CheckpointError(f"{model_dir}: cannot load its tokenizer ({reason[:200]}); copy the tokenizer files "
                              f"of the model it was fine-tuned from into {model_dir}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def load_network(model_dir: Path, task: str, *, trust_remote_code: bool = False, adapter: Any = None) -> nn.Module:
    """The model (float32, eval mode) from local files only. Its weight files are checked first (headers,
    index entries inside the directory, pickles only with weights_only); a checkpoint that lacks a tensor the
    architecture needs, or holds one of another shape, is refused rather than filled with random values.
    With ``adapter`` (an ``AdapterSource`` over ``model_dir``), the model is base + adapter: every tensor the
    adapter changes or adds is its value, read as a merge reads it."""
    from safetensors import SafetensorError
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForImageClassification,
        AutoModelForSequenceClassification,
    )

    from mergesmith.io.checkpoint import CheckpointReader

    _quiet_transformers()
    read_config(model_dir, trust_remote_code=trust_remote_code)
    CheckpointReader(model_dir, name=str(model_dir))  # every weight file checked before transformers reads one
    auto = {"causal-lm": AutoModelForCausalLM, "seq-cls": AutoModelForSequenceClassification,
            "image-cls": AutoModelForImageClassification}[check_task(task)]
    changed = adapter_tensors(adapter)
    extra = adapter_head(adapter, read_config(model_dir, trust_remote_code=trust_remote_code)) if adapter else {}
    try:
        model, info = auto.from_pretrained(model_dir, local_files_only=True, trust_remote_code=trust_remote_code,
                                           dtype=torch.float32, output_loading_info=True,
                                           ignore_mismatched_sizes=True, **extra)
    except SafetensorError as e:  # a damaged file the header check above did not see
        raise CheckpointError(f"{model_dir}: cannot read its weights ({e}); re-download or re-convert the "
                              f"model") from None
    mismatched = sorted((e for e in info.get("mismatched_keys") or [] if e[0] not in changed),
                        key=lambda entry: str(entry[0]))
    if mismatched:
        key, stored, expected = mismatched[0]
        more = f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""
        raise CheckpointError(f"{model_dir}: '{key}' has shape {tuple(stored)} but config.json's architecture "
                              f"needs {tuple(expected)}{more}; the config and the weights are of different models")
    missing = sorted(k for k in info.get("missing_keys") or [] if k not in changed)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        hint = {"seq-cls": " (a causal LM's checkpoint has no classifier: pass --task causal-lm)",
                "image-cls": " (an image backbone's checkpoint has no classifier: measure the fine-tuned "
                             "classifier)"}.get(task, "")
        raise CheckpointError(f"{model_dir}: the weights lack '{missing[0]}'{more}, which the {task} model needs"
                              f"{hint}; measuring would use random values for it")
    if changed:
        _load_adapter(model, adapter, changed)
    return model.eval()


def adapter_head(adapter: Any, config: dict[str, Any]) -> dict[str, Any]:
    """The config entries an adapter's own head changes: ``num_labels`` when it replaces the base's classifier
    (peft's modules_to_save) by one of another size, or adds one to a base without it."""
    for key in adapter.replaced:
        if key.split(".", 1)[0] in HEAD_PREFIXES and key.endswith(".weight") and len(adapter.shape(key)) == 2:
            classes = adapter.shape(key)[0]
            if classes != (len(config.get("id2label") or {}) or config.get("num_labels") or 2):
                return {"num_labels": classes, "id2label": {str(i): f"LABEL_{i}" for i in range(classes)}}
    return {}


def adapter_tensors(adapter: Any) -> set[str]:
    """The tensors an adapter changes or adds (none without one)."""
    return set(adapter.modules) | set(adapter.replaced) if adapter is not None else set()


def _load_adapter(model: nn.Module, adapter: Any, changed: set[str]) -> None:
    """Put base + adapter into ``model``: each changed tensor as ``AdapterSource.get`` reads it, so that the
    sidecar's weight fingerprints are those a merge of the adapter checks."""
    state = model.state_dict()
    unknown = sorted(changed - set(state))
    if unknown:
        raise CheckpointError(f"adapter {adapter.name}: it changes '{unknown[0]}', which the model built from "
                              f"{adapter.base.name}'s config.json does not have; is this adapter for another model?")
    with torch.no_grad():
        for key in sorted(changed):
            value = adapter.get(key)
            if tuple(value.shape) != tuple(state[key].shape):
                raise CheckpointError(f"adapter {adapter.name}: '{key}' has shape {tuple(value.shape)}, the model "
                                      f"needs {tuple(state[key].shape)}")
            state[key].copy_(value)


def load_model(model_dir: Path, task: str, *, trust_remote_code: bool = False,
               tokenizer: Any = None, adapter: Any = None) -> tuple[nn.Module, Any]:
    """The model (float32, eval mode) and its tokenizer (``tokenizer`` when one was loaded already; None for
    image-cls, which needs none), from local files only."""
    if tokenizer is None and task in TEXT_TASKS:
        tokenizer = load_tokenizer(model_dir, trust_remote_code=trust_remote_code)
    return load_network(model_dir, task, trust_remote_code=trust_remote_code, adapter=adapter), tokenizer


def model_max_length(config: dict[str, Any], tokenizer: Any) -> tuple[int | None, str]:
    """The longest sequence the model takes, and where that limit is stated (None when nothing states one):
    the smaller of config.json's max_position_embeddings (n_positions for GPT-2) and the tokenizer's
    model_max_length."""
    limits = []
    for key in ("max_position_embeddings", "n_positions"):
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            limits.append((value, f"{key} in config.json"))
            break
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 0 < value < _UNSET:
        limits.append((value, "the tokenizer's model_max_length"))
    return min(limits) if limits else (None, "")


UNKNOWN_SHARE = 0.5  # more of a data file's tokens than this unknown: warn


def check_tokens(examples: list[dict[str, Any]], tokenizer: Any, config: dict[str, Any], *, task: str,
                 max_length: int, batch_size: int, model_dir: Path, data: Path) -> int:
    """Tokenise every example once, before the weights are loaded, and return the length batches are cut to.

    Sequences are cut to ``max_length`` tokens (``--max-length``), and never past the model's own maximum
    (``model_max_length``): examples longer than that are truncated to it, with one warning. An example
    without a single token is refused, and so is a token id outside the model's embedding (a tokenizer of
    another model). A causal LM's example of one token has nothing to predict: one warning says how many,
    and so does a data file most of whose tokens the tokenizer does not know."""
    if max_length < 1:
        raise UsageError(f"--max-length {max_length}: keep at least 1 token per example")
    limit, stated = model_max_length(config, tokenizer)
    length = max_length if limit is None else min(max_length, limit)
    texts = [e["text"] for e in examples]
    encoded = tokenizer(texts, truncation=True, max_length=length)["input_ids"]
    lengths = [len(ids) for ids in encoded]
    number = [e.get("number", i + 1) for i, e in enumerate(examples)]
    empty = [n for n, size in zip(number, lengths) if size == 0]
    if empty:
        raise DataError(f"{data}: example {empty[0]} has no tokens (its text is empty){_more(empty)}; remove it")
    if limit is not None and limit < max_length:
        full = tokenizer(texts, truncation=False)["input_ids"]
        cut = [n for n, ids in zip(number, full) if len(ids) > limit]
        if cut:
            warnings.warn(f"{len(cut)} of {len(examples)} examples (e.g. example {cut[0]} of {data}) are longer "
                          f"than the model's maximum of {limit} tokens ({stated}): they are truncated to {limit} "
                          f"tokens", MergeWarning, stacklevel=2)
    if task == "causal-lm":
        single = [n for n, size in zip(number, lengths) if size == 1]
        if single:
            warnings.warn(f"{len(single)} of {len(examples)} examples (e.g. example {single[0]} of {data}) have "
                          f"one token, so a causal LM has nothing to predict in them: they count as examples but "
                          f"add nothing to the Fisher", MergeWarning, stacklevel=2)
    unknown = tokenizer.unk_token_id
    if unknown is not None:
        total = sum(lengths)
        share = sum(ids.count(unknown) for ids in encoded) / total
        if share > UNKNOWN_SHARE:  # the statistics would measure the unknown token, not the data
            warnings.warn(f"{share:.0%} of the tokens of {data} are the tokenizer's unknown token "
                          f"{tokenizer.unk_token!r}: is this the data the model was tuned on, and its tokenizer?",
                          MergeWarning, stacklevel=2)
    rows = config.get("vocab_size")
    if isinstance(rows, int) and not isinstance(rows, bool) and rows > 0:
        largest = max((max(ids), n) for n, ids in zip(number, encoded))
        if batch_size > 1 and len(set(lengths)) > 1 and tokenizer.pad_token_id is not None:
            largest = max(largest, (tokenizer.pad_token_id, 0))
        if largest[0] >= rows:
            where = f"example {largest[1]}" if largest[1] else "padding"
            raise CheckpointError(f"{model_dir}: the tokenizer gives token id {largest[0]} ({where}), but the "
                                  f"model's embedding has {rows} rows (vocab_size in config.json): the tokenizer "
                                  f"({len(tokenizer)} tokens) is not this model's; copy the model's own tokenizer "
                                  f"into {model_dir}")
    return length


def _more(numbers: list[int]) -> str:
    return f" (and {len(numbers) - 1} more)" if len(numbers) > 1 else ""


def check_images(examples: list[dict[str, Any]], config: dict[str, Any], data: Path) -> list[dict[str, Any]]:
    """The examples with their ``pixel_values`` as float32 tensors (channels, height, width), checked before
    the weights are read: present, numbers, finite, 3-D, one shape for all (a batch is one stacked tensor),
    and as many channels as the model takes (``num_channels`` in config.json). The values are used as given:
    resizing and normalising are the model's image processor's job, done beforehand."""
    checked: list[dict[str, Any]] = []
    for position, example in enumerate(examples, 1):
        number = example.get("number", position)
        values = example.get("pixel_values")
        if values is None:
            raise DataError(f"{data}: example {number} has no pixel_values (fields: "
                            f"{', '.join(sorted(map(str, example)))}); image-cls needs each image as "
                            f"[channels][height][width] numbers")
        try:
            values = torch.as_tensor(values, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError):  # ragged lists, strings, None inside: this datum only
            raise DataError(f"{data}: example {number}: pixel_values is not a [channels][height][width] array of "
                            f"numbers (ragged or non-numeric)") from None
        if values.dim() != 3:
            raise DataError(f"{data}: example {number} has pixel_values of shape {tuple(values.shape)}, expected "
                            f"3-D [channels][height][width]")
        if checked and values.shape != checked[0]["pixel_values"].shape:
            raise DataError(f"{data}: example {number} has pixel_values of shape {tuple(values.shape)}, but "
                            f"example {checked[0]['number']} has {tuple(checked[0]['pixel_values'].shape)}: give "
                            f"every image one shape (resize them with the model's image processor)")
        if not bool(torch.isfinite(values).all()):
            raise DataError(f"{data}: example {number} has a pixel value that is not finite (NaN or inf)")
        checked.append({**example, "number": number, "pixel_values": values})
    channels = config.get("num_channels")
    if checked and isinstance(channels, int) and checked[0]["pixel_values"].shape[0] != channels:
        raise DataError(f"{data}: the images have {checked[0]['pixel_values'].shape[0]} channels, but the model "
                        f"takes {channels} (num_channels in config.json)")
    return checked


def batches(examples: list[dict[str, Any]], tokenizer: Any, *, batch_size: int, max_length: int,
            device: torch.device) -> Iterator[dict[str, Tensor]]:
    """Batches of ``input_ids`` and ``attention_mask`` (padded, cut to ``max_length``), with ``labels`` when
    the examples carry them."""
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        encoded = tokenizer([e["text"] for e in chunk], padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt")
        yield _labelled({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}, chunk,
                        device)


def image_batches(examples: list[dict[str, Any]], *, batch_size: int, device: torch.device
                  ) -> Iterator[dict[str, Tensor]]:
    """Batches of ``pixel_values``, float32 (batch, channels, height, width), from examples ``check_images``
    returned, with ``labels`` when they carry them. No attention_mask: every position of an image counts."""
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        pixels = torch.stack([torch.as_tensor(e["pixel_values"], dtype=torch.float32) for e in chunk])
        yield _labelled({"pixel_values": pixels}, chunk, device)


def _labelled(batch: dict[str, Tensor], chunk: list[dict[str, Any]], device: torch.device) -> dict[str, Tensor]:
    """The batch on ``device``, with the chunk's ``labels`` when its examples carry them."""
    if "label" in chunk[0]:
        batch["labels"] = torch.tensor([e["label"] for e in chunk])
    return {key: value.to(device) for key, value in batch.items()}


IGNORE = -100  # a label that is no target (Hugging Face's ignore index)


def causal_lm_log_likelihood(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Σ over the target positions t of log p(target_t | x_≤t), per sequence: shape (batch,).

    The target at position t is the token predicted from the prefix x_0..x_t, compared with ``logits[:, t]``:
    ``batch["labels"][:, t]`` when the batch carries labels (the sampled Fisher's drawn tokens; note that this
    is *not* Hugging Face's convention, whose ``labels`` the model shifts itself), else the next input token
    ``input_ids[:, t + 1]``. Position t counts when token t + 1 is not padding (``attention_mask[:, t + 1]``)
    and its label is not ``IGNORE``; the last position predicts past the sequence and never counts.
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # at least float32 (half-precision models), but a float64 model stays float64
    logp = torch.log_softmax(logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    targets = batch["labels"][:, :-1] if "labels" in batch else batch["input_ids"][:, 1:]
    counted = batch["attention_mask"][:, 1:].bool() & (targets != IGNORE)
    token = logp.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    return (token * counted.to(token.dtype)).sum(dim=-1)


def causal_lm_fisher_labels(samples: int = 1, seed: int = 0) -> FisherLabels:
    """Labels for the *sampled* Fisher of a causal LM (``measure(..., fisher_labels=...)``).

    For every example and every target position t (``attention_mask[:, t + 1]`` set), a token ŷ_t is drawn
    from the model's own predictive distribution p(· | x_≤t), teacher-forced on the real prefix; the
    example's log-likelihood is then Σ_t log p(ŷ_t | x_≤t). ``samples`` such label sequences are drawn per
    example, each weighted 1/samples. Returns [(weights, batch with ``labels``), ...], one batch per draw;
    ``labels`` has the shape of ``input_ids`` and the alignment of ``causal_lm_log_likelihood`` (labels[:, t]
    is the token predicted at position t), with ``IGNORE`` where nothing is predicted.

    Draws come from one seeded generator, example by example and only at target positions, so the same
    seed and data give the same labels however the examples are batched or padded (up to rounding of the
    logits; under torchrun each rank draws its own share with its own generator).
    """
    if samples < 1:
        raise UsageError(f"--samples {samples}: draw at least 1 label sequence per example")
    generator = torch.Generator().manual_seed(seed)

    def choose(model: nn.Module, batch: dict[str, Tensor]) -> list[tuple[Tensor, dict[str, Tensor]]]:
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        targets = batch["attention_mask"][:, 1:].bool().cpu()  # (batch, tokens - 1)
        size, width = batch["input_ids"].shape
        draws = torch.full((samples, size, width), IGNORE, dtype=torch.long)  # (samples, batch, tokens)
        for n in range(size):  # one example at a time: a (positions, vocab) slice of probabilities at most
            positions = targets[n].nonzero().squeeze(-1)
            if len(positions):
                probs = torch.softmax(logits[n, positions].detach().cpu().double(), dim=-1)  # (positions, vocab)
                draws[:, n, positions] = torch.multinomial(probs, samples, replacement=True, generator=generator).T
        weight = torch.full((size,), 1.0 / samples, dtype=torch.float64)
        device = batch["input_ids"].device
        return [(weight, {**batch, "labels": draws[k].to(device)}) for k in range(samples)]

    return choose


def class_log_probs(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """log p(c | x_n) of a classifier, shape (batch, classes): a sequence classifier fed ``input_ids`` and
    ``attention_mask``, or an image classifier fed ``pixel_values`` (whichever the batch holds)."""
    logits = model(**{key: batch[key] for key in MODEL_INPUTS if key in batch}).logits
    return torch.log_softmax(logits.float(), dim=-1)


def classifier_log_likelihood(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """log p(label_n | x_n), shape (batch,), for seq-cls and image-cls alike."""
    return class_log_probs(model, batch).gather(-1, batch["labels"][:, None]).squeeze(-1)


seq_cls_log_likelihood = classifier_log_likelihood  # the name callers (tests, benchmarks) know it by


def check_labels(examples: list[dict[str, Any]], config: dict[str, Any], task: str, data: Path) -> None:
    """A classifier's labels are class indices of the model (``num_labels``, or the size of ``id2label``)."""
    if task not in CLASSIFIER_TASKS:
        return
    if not examples or "label" not in examples[0]:
        raise UsageError(f"{task} needs labels: pass --label-field")
    classes = len(config.get("id2label") or {}) or config.get("num_labels") or 2  # transformers' default: 2
    for position, example in enumerate(examples, 1):
        number, label = example.get("number", position), example.get("label")
        try:  # examples handed over from Python: an int, a numpy integer or a 0-d integer tensor
            index = operator.index(label)
        except TypeError:
            raise DataError(f"{data}: example {number} has label {label!r}, not an integer class index") from None
        if not 0 <= index < classes:
            raise DataError(f"{data}: example {number} has label {index}, outside the model's {classes} classes "
                            f"[0, {classes - 1}]")
