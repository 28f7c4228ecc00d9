"""`measure --task image-cls` on tiny random image classifiers (ConvNeXt, ViT) saved with save_pretrained.

Every statistic is checked against an independent float64 computation written here from its definition:
the Fisher by one backward pass per example, Gram and K-FAC factors from forward (and gradient) hooks that
see every row, i.e. every (example, position) of a Linear layer's input — for ConvNeXt's pointwise layers,
fed (batch, height, width, channels), that is batch·height·width rows.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from mergesmith.errors import DataError
from mergesmith.io.sidecar import StatsReader
from mergesmith.measure.checkpoint import measure_checkpoint
from mergesmith.measure.hf import TOKENIZER_FILES, infer_task

CLASSES, CHANNELS, SIZE, N = 3, 1, 8, 7  # 7 examples: batches of 3 leave a partial last batch
POINTWISE = "convnext.encoder.stages.0.layers.0.pwconv1"  # input (batch, 4, 4, 8): 16 rows per image


def _convnext():
    from transformers import ConvNextConfig, ConvNextForImageClassification

    # layer_scale_init_value=0: no layer-scale parameter (a bare nn.Parameter of the layer, not of a module)
    return ConvNextForImageClassification(ConvNextConfig(
        num_channels=CHANNELS, patch_size=2, image_size=SIZE, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2,
        num_labels=CLASSES, layer_scale_init_value=0.0))


def _vit():
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(ViTConfig(
        num_channels=CHANNELS, image_size=SIZE, patch_size=4, hidden_size=16, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=32, num_labels=CLASSES))


def _save(model: nn.Module, directory: Path) -> Path:
    """Seeded weights of a useful scale (the default initialisation makes every class nearly equally likely)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = 0.3 * torch.randn(p.shape, generator=generator)
            p.copy_(1 + noise if "norm" in name else noise)
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def convnext(tmp_path_factory) -> Path:
    return _save(_convnext(), tmp_path_factory.mktemp("convnext"))


@pytest.fixture(scope="module")
def vit(tmp_path_factory) -> Path:
    return _save(_vit(), tmp_path_factory.mktemp("vit"))


def _examples(n: int = N, shape: tuple[int, ...] = (CHANNELS, SIZE, SIZE)) -> list[dict]:
    generator = torch.Generator().manual_seed(2)
    return [{"pixel_values": torch.randn(shape, generator=generator).tolist(), "label": i % CLASSES}
            for i in range(n)]


def _float64(directory: Path) -> nn.Module:
    from transformers import AutoModelForImageClassification

    return AutoModelForImageClassification.from_pretrained(directory).double().eval()


def _image(example: dict) -> torch.Tensor:
    return torch.tensor(example["pixel_values"], dtype=torch.float64)[None]  # (1, channels, height, width)


def _looped_fisher(model: nn.Module, examples: list[dict], *, exact: bool = False) -> dict[str, torch.Tensor]:
    """(1/N) Σ_n (∂ log p(y_n | x_n)/∂θ)², one backward pass per example (exact: Σ_c p(c|x_n) (∂ log p(c|x_n)/∂θ)²)."""
    params = dict(model.named_parameters())
    fisher = {name: torch.zeros_like(p) for name, p in params.items()}
    for example in examples:
        logp = torch.log_softmax(model(pixel_values=_image(example)).logits[0], dim=-1)  # (classes,)
        weighted = [(c, float(logp[c].detach().exp())) for c in range(CLASSES)] if exact else [(example["label"], 1.0)]
        for c, weight in weighted:
            grads = torch.autograd.grad(logp[c], list(params.values()), retain_graph=True)
            for name, g in zip(params, grads):
                fisher[name] += weight * g.square() / len(examples)
    return fisher


def _hooked_factors(model: nn.Module, examples: list[dict]) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """gram/kfac_a/kfac_g of every Linear layer over all of its input rows (every leading position), from
    hooks on one example at a time; and each factor's row count."""
    inputs: dict[str, list[torch.Tensor]] = {}
    grads: dict[str, list[torch.Tensor]] = {}

    def keep(name: str):
        def hook(_module, args, output):
            inputs.setdefault(name, []).append(args[0].detach().reshape(-1, args[0].shape[-1]))
            output.register_hook(lambda g: grads.setdefault(name, []).append(g.reshape(-1, g.shape[-1])))
        return hook

    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    handles = [m.register_forward_hook(keep(name)) for name, m in linears.items()]
    try:
        for example in examples:
            logp = torch.log_softmax(model(pixel_values=_image(example)).logits[0], dim=-1)
            logp[example["label"]].backward()
    finally:
        for handle in handles:
            handle.remove()
    factors, rows = {}, {}
    for name, module in linears.items():
        x, g = torch.cat(inputs[name]), torch.cat(grads[name])  # (rows, in), (rows, out)
        a = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1) if module.bias is not None else x
        factors[f"gram/{name}"], factors[f"kfac_a/{name}"], factors[f"kfac_g/{name}"] = (
            x.T @ x / len(x), a.T @ a / len(a), g.T @ g / len(g))
        for kind in ("gram", "kfac_a", "kfac_g"):
            rows[f"{kind}/{name}"] = len(x)
    return factors, rows


def _assert_close(got: torch.Tensor, expected: torch.Tensor, key: str, rtol: float = 1e-4) -> None:
    assert got.shape == expected.shape, key
    error = torch.linalg.vector_norm(got.double() - expected)
    assert error <= rtol * torch.linalg.vector_norm(expected) + 1e-12, (key, float(error))


def test_convnext_statistics_match_a_per_example_loop_and_hooks_on_every_pixel_row(convnext):
    examples = _examples()
    run = measure_checkpoint(convnext, examples, kinds=["fisher", "gram", "kfac"], task="image-cls", batch_size=3)
    stats = run.statistics
    model = _float64(convnext)
    fisher = _looped_fisher(model, examples)
    factors, rows = _hooked_factors(model, examples)
    assert run.examples == N
    assert {k for k in stats.tensors if k.startswith("fisher/")} == {f"fisher/{name}" for name in fisher}
    assert set(stats.tensors) - {f"fisher/{name}" for name in fisher} == set(factors)
    for name, expected in fisher.items():
        _assert_close(stats.tensors[f"fisher/{name}"], expected, name)
        assert stats.counts[f"fisher/{name}"] == N
    for key, expected in factors.items():
        _assert_close(stats.tensors[key], expected, key)
        assert stats.counts[key] == rows[key], key
    # the pointwise layer sees every pixel position of every image: 7 images × 4 × 4 positions after the stem
    assert stats.counts[f"gram/{POINTWISE}"] == N * 4 * 4
    assert stats.tensors[f"kfac_a/{POINTWISE}"].shape == (9, 9)  # 8 channels and the bias's 1
    assert stats.tensors[f"kfac_a/{POINTWISE}"][-1, -1] == pytest.approx(1.0)


def test_vit_fisher_and_gram_match_the_loop(vit):
    """A second architecture: ViT's Linear layers see (batch, tokens, width), its position embeddings are a
    parameter of a container module (measured by the per-example loop)."""
    examples = _examples()
    stats = measure_checkpoint(vit, examples, kinds=["fisher", "gram"], batch_size=4).statistics  # task inferred
    model = _float64(vit)
    for name, expected in _looped_fisher(model, examples).items():
        _assert_close(stats.tensors[f"fisher/{name}"], expected, name)
    factors, rows = _hooked_factors(model, examples)
    for key in (k for k in factors if k.startswith("gram/")):
        _assert_close(stats.tensors[key], factors[key], key)
        # 4 patches and the [CLS] token per image; the classifier reads the [CLS] token alone
        assert stats.counts[key] == rows[key] == N * (1 if key == "gram/classifier" else 5), key


def test_exact_fisher_weights_every_class_by_the_model_s_probability(convnext):
    examples = _examples()
    stats = measure_checkpoint(convnext, examples, kinds=["fisher"], task="image-cls", batch_size=3,
                               fisher="exact").statistics
    assert stats.fisher_variant == "exact"
    for name, expected in _looped_fisher(_float64(convnext), examples, exact=True).items():
        _assert_close(stats.tensors[f"fisher/{name}"], expected, name)


def test_sampled_fisher_is_seeded_and_estimates_the_exact_one(convnext):
    examples = _examples()

    def sampled(seed: int, samples: int) -> dict[str, torch.Tensor]:
        return measure_checkpoint(convnext, examples, kinds=["fisher"], task="image-cls", batch_size=3,
                                  fisher="sampled", samples=samples, seed=seed).statistics.tensors

    first, again, other = sampled(0, 2), sampled(0, 2), sampled(1, 2)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)
    exact = _looped_fisher(_float64(convnext), examples, exact=True)
    many = sampled(0, 64)  # Monte Carlo over 7 × 64 draws: close to the expectation
    expected = torch.cat([f.flatten() for f in exact.values()])
    got = torch.cat([many[f"fisher/{name}"].flatten().double() for name in exact])
    assert torch.linalg.vector_norm(got - expected) <= 0.2 * torch.linalg.vector_norm(expected)


def test_progress_counts_images(convnext):
    heard = []
    measure_checkpoint(convnext, _examples(), kinds=["gram"], task="image-cls", batch_size=3,
                       progress=lambda done, total: heard.append((done, total)))
    assert heard == [(3, N), (6, N), (7, N)]


def test_task_is_inferred_from_the_architecture(convnext, vit):
    assert infer_task(convnext) == infer_task(vit) == "image-cls"


def test_no_tokenizer_is_needed_or_loaded(convnext, monkeypatch):
    import mergesmith.measure.checkpoint as checkpoint
    import mergesmith.measure.hf as hf

    def never(*args, **kwargs):
        raise AssertionError("image-cls loaded a tokenizer")

    monkeypatch.setattr(hf, "load_tokenizer", never)
    monkeypatch.setattr(checkpoint, "load_tokenizer", never)
    assert not any((convnext / name).exists() for name in TOKENIZER_FILES)
    examples = [{**e, "pixel_values": torch.tensor(e["pixel_values"])} for e in _examples(2)]  # tensors too
    run = measure_checkpoint(convnext, examples, kinds=["gram"], task="image-cls")
    assert run.statistics.counts[f"gram/{POINTWISE}"] == 2 * 16


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_cli_on_jsonl_writes_the_python_call_s_sidecar(convnext, tmp_path, run_cli):
    examples = _examples()
    data = _jsonl(tmp_path / "images.jsonl", [{"pixel_values": e["pixel_values"], "y": e["label"]} for e in examples])
    result = run_cli("measure", convnext, "--data", data, "--task", "image-cls", "--label-field", "y",
                     "--kind", "fisher,gram,kfac", "--batch-size", "3", "--out", tmp_path / "cli")
    assert result.code == 0, result.stderr
    measure_checkpoint(convnext, examples, kinds=["fisher", "gram", "kfac"], task="image-cls",
                       batch_size=3).statistics.save(tmp_path / "python")
    cli, python = StatsReader(tmp_path / "cli"), StatsReader(tmp_path / "python")
    assert set(cli.keys()) == set(python.keys()) and cli.counts == python.counts
    assert cli.counts[f"gram/{POINTWISE}"] == N * 16
    for key in python.keys():
        assert torch.allclose(cli.get(key), python.get(key), rtol=1e-6, atol=0), key
    # and the statistics are the model's, not merely the two paths agreeing: one spot check against the hooks
    factors, _ = _hooked_factors(_float64(convnext), examples)
    _assert_close(cli.get(f"gram/{POINTWISE}"), factors[f"gram/{POINTWISE}"], POINTWISE)


def _image_rows(n: int = 5) -> list[dict]:
    return [{"pixel_values": e["pixel_values"], "label": e["label"]} for e in _examples(n)]


def _with(rows: list[dict], number: int, **changes) -> list[dict]:
    """``rows`` with example ``number`` (from 1) changed; a value of None removes the field."""
    row = {**rows[number - 1], **changes}
    rows[number - 1] = {k: v for k, v in row.items() if v is not None}
    return rows


BAD = {
    "wrong shape": (lambda: _with(_image_rows(), 3, pixel_values=torch.zeros(1, 8, 7).tolist()),
                    r"example 3 has pixel_values of shape \(1, 8, 7\), but example 1 has \(1, 8, 8\)"),
    "not 3-D": (lambda: _with(_image_rows(), 2, pixel_values=torch.zeros(8, 8).tolist()),
                r"example 2 has pixel_values of shape \(8, 8\), expected 3-D \[channels\]\[height\]\[width\]"),
    "ragged": (lambda: _with(_image_rows(), 4, pixel_values=[[[0.0] * 8] * 7 + [[0.0] * 5]]),
               r"example 4: pixel_values is not a \[channels\]\[height\]\[width\] array of numbers"),
    "missing pixel_values": (lambda: _with(_image_rows(), 5, pixel_values=None, image=[1.0]),
                             r"example 5 has no field 'pixel_values' \(fields: image, label\)"),
    "label out of range": (lambda: _with(_image_rows(), 2, label=3),
                           r"example 2 has label 3, outside the model's 3 classes \[0, 2\]"),
    "not finite": (lambda: _with(_image_rows(), 1, pixel_values=[[[float("nan")] * 8] * 8]),
                   r"example 1 has a pixel value that is not finite"),
    "channels": (lambda: [{**row, "pixel_values": torch.zeros(3, 8, 8).tolist()} for row in _image_rows()],
                 r"the images have 3 channels, but the model takes 1 \(num_channels in config.json\)"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_cli_bad_example_is_one_line_naming_it_before_the_model_loads(convnext, tmp_path, run_cli, monkeypatch,
                                                                      case):
    import mergesmith.measure.hf as hf

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(hf, "load_model", never)
    rows, pattern = BAD[case]
    data = _jsonl(tmp_path / "images.jsonl", rows())
    result = run_cli("measure", convnext, "--data", data, "--task", "image-cls", "--label-field", "label",
                     "-o", tmp_path / "stats")
    assert result.code == 2, result.stderr
    assert re.search(rf"^error: .*images\.jsonl: .*{pattern}", result.error_line), result.error_line
    assert not (tmp_path / "stats").exists()


@pytest.mark.parametrize("change,pattern", [
    ({"pixel_values": None}, r"<examples>: example 2 has no pixel_values"),
    ({"pixel_values": "an image"}, r"example 2: pixel_values is not a \[channels\]\[height\]\[width\] array"),
    ({"label": 1.5}, r"example 2 has label 1.5, not an integer class index"),
    ({"label": -1}, r"example 2 has label -1, outside the model's 3 classes"),
])
def test_python_call_refuses_a_bad_example_naming_it(convnext, change, pattern):
    examples = _examples(3)
    examples[1] = {**examples[1], **change}
    with pytest.raises(DataError, match=pattern):
        measure_checkpoint(convnext, examples, kinds=["fisher"], task="image-cls")
