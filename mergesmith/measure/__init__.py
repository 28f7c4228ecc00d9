"""Measure curvature statistics of a model on data: diagonal Fisher, RegMean Gram matrices, K-FAC factors.

``measure(model, batches, kinds=..., log_likelihood=...)`` works on any ``nn.Module``. Each batch is a
dict of tensors whose first dimension is the example; ``log_likelihood(model, batch)`` returns the
per-example log-likelihoods, shape (batch,). An ``attention_mask`` entry of shape (batch, tokens), when
present, marks the rows (tokens) that count: padding is left out of every Gram and K-FAC statistic.
Without one every row counts: a Linear layer's input (batch, ..., features) has batch·… rows, e.g. one per
pixel position for ConvNeXt's pointwise layers, fed (batch, height, width, channels).

Definitions (docs/statistics.md):

- ``fisher``: F = mean over examples n of (∂ log p(y_n | x_n) / ∂θ)², from per-example gradients (never the
  square of a batch gradient), formed by hooks from one batched backward pass (``measure.fisher``).
  Labels come from the data (the *empirical* Fisher) unless ``fisher_labels`` says otherwise.
- ``gram``: for every ``nn.Linear``, G = XᵀX / rows over its input rows X (tokens), padding excluded.
- ``kfac``: for every ``nn.Linear``, A = mean over rows of a aᵀ (a = the input row, with a trailing 1
  appended when the layer has a bias) and G = mean over rows of g gᵀ (g = ∂ Σ_n log p(y_n|x_n) / ∂ output
  row).

``exclude`` (module-name regexes) and ``max_factor_size`` (the factor budget, default ``1x``: no factor
larger than the model itself) leave statistics out before anything is allocated; ``Statistics.skipped``
records what and why, and the sidecar keeps it (``measure.select``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Collection, Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from mergesmith.errors import DataError, MergeWarning, UsageError, did_you_mean
from mergesmith.io.sidecar import model_identity, save_stats, weights_fingerprint
from mergesmith.measure.fisher import PerExampleSquares
from mergesmith.measure.select import DEFAULT_MAX_FACTOR_SIZE, FactorBudget, budget_warning, select

LogLikelihood = Callable[[nn.Module, Mapping[str, Tensor]], Tensor]
KIND_NAMES = ("fisher", "gram", "kfac")


@dataclass
class Statistics:
    """Means of measured statistics, with the count behind each (examples or rows)."""

    tensors: dict[str, Tensor] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    model: str = ""
    fisher_variant: str | None = None
    transposed: list[str] = field(default_factory=list)  # modules whose weight is (in, out): GPT-2's Conv1D
    fingerprints: dict[str, str] = field(default_factory=dict)  # parameter -> weights_fingerprint
    skipped: dict[str, dict] = field(default_factory=dict)  # module -> {"kinds": [...], "reason": "..."}
    examples: int = 0  # how many examples were measured

    def save(self, directory: str | Path, max_shard_size: str | int = "5GB") -> Path:
        return save_stats(directory, self.tensors, self.counts, model=self.model,
                          fisher_variant=self.fisher_variant, transposed=self.transposed,
                          fingerprints=self.fingerprints, skipped=self.skipped, examples=self.examples,
                          max_shard_size=max_shard_size)


class _Sums:
    """Running sums and counts, turned into means at the end."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, key: str, total: Tensor, count: int) -> None:
        total = total.detach().to(self.dtype)
        if key in self.sums:
            self.sums[key] += total
        else:
            self.sums[key] = total.clone()
        self.counts[key] = self.counts.get(key, 0) + count

    def means(self) -> tuple[dict[str, Tensor], dict[str, int]]:
        return ({k: v / max(self.counts[k], 1) for k, v in self.sums.items()},
                {k: self.counts[k] for k in self.sums})


def linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The layers Gram and K-FAC statistics are kept for: ``nn.Linear`` and GPT-2's ``Conv1D``."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
            found[name] = module
    return found


def _rows(x: Tensor, row_mask: Tensor | None) -> Tensor:
    """The rows (..., features) → (rows, features) that count: those where ``row_mask`` is true when it
    matches the leading dimensions, else all of them."""
    rows = x.reshape(-1, x.shape[-1])
    if row_mask is not None and tuple(x.shape[:-1]) == tuple(row_mask.shape):
        rows = rows[row_mask.reshape(-1).bool()]
    return rows


@contextmanager
def _layer_hooks(modules: dict[str, nn.Module], sums: _Sums, *, gram: Collection[str], kfac: Collection[str],
                 row_mask: Callable[[], Tensor | None]):
    """Forward hooks adding the Gram statistics of the layers named in ``gram`` and the K-FAC factors of
    those in ``kfac``."""
    handles = []

    # layers fed the same tensor (an attention block's query, key and value) share one product
    # (the very same tensor object, unmodified: holding it also keeps its memory from being reused)
    latest: dict[bool, tuple[Tensor, int, Tensor, int]] = {}

    def input_products(inputs: Tensor, mask: Tensor | None, with_ones: bool) -> tuple[Tensor, int]:
        cached = latest.get(with_ones)
        if cached is None or cached[0] is not inputs or cached[1] != inputs._version:
            x = _rows(inputs.detach(), mask).to(sums.dtype)
            if with_ones:
                x = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
            latest[with_ones] = cached = (inputs, inputs._version, x.T @ x, x.shape[0])
        return cached[2], cached[3]

    def on_forward(name: str, module: nn.Module):
        with_gram, with_kfac = name in gram, name in kfac

        def hook(_module, inputs, output):
            mask = row_mask()
            if with_gram:
                product, rows = input_products(inputs[0], mask, with_ones=False)
                sums.add(f"gram/{name}", product, rows)
            if with_kfac:
                product, rows = input_products(inputs[0], mask, with_ones=module.bias is not None)
                sums.add(f"kfac_a/{name}", product, rows)
                if output.requires_grad:
                    def on_grad(g: Tensor) -> None:
                        rows = _rows(g.detach(), mask).to(sums.dtype)
                        sums.add(f"kfac_g/{name}", rows.T @ rows, rows.shape[0])
                    output.register_hook(on_grad)
        return hook

    try:
        for name, module in modules.items():
            handles.append(module.register_forward_hook(on_forward(name, module)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _trainable(model: nn.Module) -> dict[str, Tensor]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _trimmed_example(batch: Mapping[str, Tensor], n: int) -> dict[str, Tensor]:
    """Example n as a batch of one, without the trailing padding its batch added (when padding is on the
    right), so the per-example backward pass does no work on padding."""
    example = {k: v[n:n + 1] if isinstance(v, Tensor) and v.dim() > 0 else v for k, v in batch.items()}
    mask = example.get("attention_mask")
    if mask is None or mask.dim() != 2:
        return example
    length = int(mask.sum())
    if length == 0 or not bool(mask[0, :length].all()):  # left padding or holes: keep as is
        return example
    width = mask.shape[1]
    return {k: v[:, :length] if isinstance(v, Tensor) and v.dim() >= 2 and v.shape[1] == width else v
            for k, v in example.items()}


def _looped_squares(model: nn.Module, names: set[str], batch: Mapping[str, Tensor], log_likelihood: LogLikelihood,
                    weights: Tensor | None) -> dict[str, Tensor]:
    """Σ_n w_n (∂ log p(y_n|x_n)/∂θ)² by one backward pass per example, for the parameters the hooks of
    ``PerExampleSquares`` cannot account for."""
    params = {name: p for name, p in _trainable(model).items() if name in names}
    totals = {name: torch.zeros_like(p) for name, p in params.items()}
    for n in range(examples_in(batch)):
        example = _trimmed_example(batch, n)
        grads = torch.autograd.grad(log_likelihood(model, example).sum(), list(params.values()), allow_unused=True)
        for (name, _), g in zip(params.items(), grads):
            if g is not None:
                totals[name].addcmul_(g, g, value=1.0 if weights is None else float(weights[n]))
    return totals


# Which labels the Fisher's gradients use: [(per-example weights, batch with those labels), ...].
FisherLabels = Callable[[nn.Module, Mapping[str, Tensor]], list[tuple[Tensor, Mapping[str, Tensor]]]]


def check_kinds(kinds: Iterable[str]) -> tuple[str, ...]:
    """The statistic kinds, once each, in order; an unknown one is a usage error with a suggestion."""
    kinds = tuple(dict.fromkeys(kinds))
    for kind in kinds:
        if kind not in KIND_NAMES:
            raise UsageError(f"unknown statistic kind '{kind}'{did_you_mean(kind, KIND_NAMES)}")
    if not kinds:
        raise UsageError(f"no statistic to measure: pass --kind ({', '.join(KIND_NAMES)})")
    return kinds


@contextmanager
def _without_gradient(model: nn.Module, names: set[str]):
    """Parameters ``names`` treated as frozen (no Fisher) for the duration; restored afterwards."""
    frozen = [p for name, p in model.named_parameters() if name in names and p.requires_grad]
    try:
        for p in frozen:
            p.requires_grad_(False)
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


def measure(model: nn.Module, batches: Iterable[Mapping[str, Tensor]], *, log_likelihood: LogLikelihood,
            kinds: Iterable[str] = ("fisher",), accumulate_dtype: torch.dtype = torch.float32,
            chunk_size: int | None = 8, fisher_labels: FisherLabels | None = None,
            fisher_variant: str = "empirical", exclude: Iterable[str] = (),
            max_factor_size: str | int | FactorBudget | None = DEFAULT_MAX_FACTOR_SIZE) -> Statistics:
    """Measure ``kinds`` (any of fisher, gram, kfac) of ``model`` over ``batches`` in one pass each batch.

    Every statistic is a mean (Fisher over examples, Gram and K-FAC over non-padding rows) and keeps its
    count, so statistics measured on disjoint data combine exactly (``combine_stats``). The Fisher uses
    the data's labels (empirical) unless ``fisher_labels`` gives weighted relabelled batches instead
    (``classifier_fisher_labels`` for the sampled and exact Fisher of a classifier); ``fisher_variant``
    names the choice in the sidecar.

    ``exclude``: regular expressions searched in module names; a matching module gets no statistic (no Gram,
    no K-FAC, no Fisher for its parameters). ``max_factor_size``: no Gram or K-FAC factor larger than this
    (``1GB``; ``1x``, the default, is the model's own size as float32; None for no budget), checked from the
    layers' shapes before anything is allocated. Both are recorded in ``Statistics.skipped``; what the budget
    skips is also a ``MergeWarning``.
    """
    kinds = check_kinds(kinds)
    layers = linear_modules(model) if {"gram", "kfac"} & set(kinds) else {}
    if {"gram", "kfac"} & set(kinds) and not layers:
        raise UsageError(f"{type(model).__name__} has no Linear layers: gram and kfac statistics need them")
    selection = select(model, kinds, layers, exclude=exclude, max_factor_size=max_factor_size)
    warning = budget_warning(selection)
    if warning:
        warnings.warn(warning, MergeWarning, stacklevel=2)
    hooked = {name: module for name, module in layers.items() if name in selection.gram or name in selection.kfac}
    sums = _Sums(accumulate_dtype)
    current_mask: list[Tensor | None] = [None]
    with _without_gradient(model, selection.no_fisher):
        squarer = PerExampleSquares(model, chunk_size) if "fisher" in kinds else None
    seen = 0
    was_training = model.training
    model.eval()  # statistics of the deterministic model: no dropout
    try:
        for batch in batches:
            current_mask[0] = batch.get("attention_mask")
            examples = examples_in(batch)
            seen += examples
            if hooked:
                with _layer_hooks(hooked, sums, gram=selection.gram, kfac=selection.kfac,
                                  row_mask=lambda: current_mask[0]):
                    if selection.kfac:
                        model.zero_grad(set_to_none=True)
                        log_likelihood(model, batch).sum().backward()
                    else:
                        with torch.no_grad():
                            log_likelihood(model, batch)
            if "fisher" in kinds:
                with _without_gradient(model, selection.no_fisher):  # excluded parameters: no Fisher
                    choices = fisher_labels(model, batch) if fisher_labels is not None else [(None, batch)]
                    for weights, labelled in choices:
                        squares = squarer.run(labelled, log_likelihood, weights)
                        if squarer.uncovered:
                            squares.update(_looped_squares(model, squarer.uncovered, labelled, log_likelihood,
                                                           weights))
                        for name, p in _trainable(model).items():  # no entry: no gradient reached it
                            sums.add(f"fisher/{name}", squares.get(name, torch.zeros_like(p)), 0)
                    for name in _trainable(model):
                        sums.counts[f"fisher/{name}"] = sums.counts.get(f"fisher/{name}", 0) + examples
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    seen = _all_reduce(sums, seen)
    if seen == 0:
        raise DataError("no data: the batches were empty, so there is nothing to measure")
    tensors, counts = sums.means()
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    transposed = [name for name, module in hooked.items() if type(module).__name__ == "Conv1D"]
    fingerprints = {name: weights_fingerprint(p) for name, p in model.named_parameters()}
    return Statistics(tensors, counts, model_identity(shapes), fisher_variant if "fisher" in kinds else None,
                      transposed, fingerprints, selection.skipped, seen)


def _all_reduce(sums: _Sums, seen: int) -> int:
    """Under torch.distributed (e.g. torchrun), add up every rank's sums and counts, so N processes on N
    shares of the data give the sidecar one process gives on all of it. Returns the total example count.
    A rank that saw no batch of some statistic contributes zeros."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return seen
    local = {key: tuple(total.shape) for key, total in sums.sums.items()}
    everyone: list[dict[str, tuple[int, ...]]] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(everyone, local)
    for key, shape in sorted({k: v for shapes in everyone for k, v in shapes.items()}.items()):
        total = sums.sums.get(key)
        if total is None:
            total = sums.sums[key] = torch.zeros(shape, dtype=sums.dtype)
        count = torch.tensor([float(sums.counts.get(key, 0))], dtype=torch.float64, device=total.device)
        dist.all_reduce(total)
        dist.all_reduce(count)
        sums.counts[key] = int(count.item())
    examples = torch.tensor([float(seen)], dtype=torch.float64)
    dist.all_reduce(examples)
    return int(examples.item())


def examples_in(batch: Mapping[str, Tensor]) -> int:
    """How many examples a batch holds: the first dimension its tensors share."""
    sizes = {v.shape[0] for v in batch.values() if isinstance(v, Tensor) and v.dim() > 0}
    if len(sizes) != 1:
        raise DataError(f"a batch's tensors must share their first (example) dimension, got sizes {sorted(sizes)}")
    return sizes.pop()


def classifier_fisher_labels(variant: str, class_log_probs: Callable[[nn.Module, Mapping[str, Tensor]], Tensor], *,
                             samples: int = 1, seed: int = 0) -> FisherLabels:
    """Labels for the Fisher of a classifier whose batches carry ``labels``; ``class_log_probs(model,
    batch)`` gives log p(c | x_n), shape (batch, classes).

    ``sampled``: ``samples`` labels drawn from the model's own predictive distribution, each weighted
    1/samples (a seeded generator: the same seed, the same Fisher). ``exact``: every class c, weighted by
    p(c | x_n) — the expectation the Fisher is defined by.
    """
    generator = torch.Generator().manual_seed(seed)
    if variant not in ("sampled", "exact"):
        raise UsageError(f"--fisher {variant}: not a Fisher variant{did_you_mean(variant, ('sampled', 'exact'))}")

    def choose(model: nn.Module, batch: Mapping[str, Tensor]) -> list[tuple[Tensor, Mapping[str, Tensor]]]:
        with torch.no_grad():
            probs = class_log_probs(model, batch).exp().cpu().double()
        device = batch["labels"].device
        if variant == "exact":
            return [(probs[:, c], {**batch, "labels": torch.full_like(batch["labels"], c)})
                    for c in range(probs.shape[1])]
        draws = torch.multinomial(probs, samples, replacement=True, generator=generator)  # (batch, samples)
        weight = torch.full((probs.shape[0],), 1.0 / samples, dtype=torch.float64)
        return [(weight, {**batch, "labels": draws[:, k].to(device)}) for k in range(samples)]

    return choose
