"""Measured statistics against independent computations: brute-force per-example backward passes for the
Fisher, inputs and output gradients recorded by hand for Gram and K-FAC, padded against unpadded data,
and combining halves against measuring the whole."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mergesmith.errors import MergeError
from mergesmith.io.sidecar import StatsReader, combine_stats
from mergesmith.measure import measure

F64 = torch.float64


class TinyLM(nn.Module):
    """Embedding, LayerNorm, one attention block built from Linear layers, and an LM head."""

    def __init__(self, vocab: int = 11, width: int = 8):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.norm = nn.LayerNorm(width)
        self.query, self.key, self.value = (nn.Linear(width, width) for _ in range(3))
        self.head = nn.Linear(width, vocab, bias=False)
        self.width = width

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.embed(input_ids))
        scores = self.query(h) @ self.key(h).transpose(-1, -2) / math.sqrt(self.width)
        causal = torch.ones(scores.shape[-2:], dtype=torch.bool, device=h.device).tril()
        visible = causal & attention_mask.bool()[..., None, :]
        weights = torch.softmax(scores.masked_fill(~visible, -1e9), dim=-1)
        return self.head(self.norm(h + weights @ self.value(h)))


def lm_log_likelihood(model: nn.Module, batch: dict) -> torch.Tensor:
    """Per-sequence log-likelihood: the sum over its non-padding target tokens."""
    logits = model(batch["input_ids"], batch["attention_mask"])
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    targets = batch["input_ids"][:, 1:]
    token = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (token * batch["attention_mask"][:, 1:]).sum(dim=-1)


SEQUENCES = [[3, 5, 1, 7, 2], [4, 4, 9], [1, 2, 3, 4, 5, 6, 7], [8, 6]]


def padded_batch(sequences: list[list[int]]) -> dict:
    length = max(map(len, sequences))
    ids = torch.zeros(len(sequences), length, dtype=torch.long)
    mask = torch.zeros(len(sequences), length, dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, :len(seq)] = torch.tensor(seq)
        mask[i, :len(seq)] = 1
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture
def tiny_lm() -> TinyLM:
    torch.manual_seed(0)
    return TinyLM().to(F64)


def test_per_example_fisher_equals_a_brute_force_loop(tiny_lm):
    stats = measure(tiny_lm, [padded_batch(SEQUENCES[:3]), padded_batch(SEQUENCES[3:])],
                    log_likelihood=lm_log_likelihood, kinds=["fisher"], accumulate_dtype=F64)
    expected = {name: torch.zeros_like(p) for name, p in tiny_lm.named_parameters()}
    for seq in SEQUENCES:  # one backward pass per example
        tiny_lm.zero_grad()
        lm_log_likelihood(tiny_lm, padded_batch([seq])).sum().backward()
        for name, p in tiny_lm.named_parameters():
            expected[name] += p.grad.square()
    for name, total in expected.items():
        got = stats.tensors[f"fisher/{name}"]
        assert stats.counts[f"fisher/{name}"] == len(SEQUENCES)
        assert torch.linalg.norm(got - total / len(SEQUENCES)) <= 1e-6 * torch.linalg.norm(total / len(SEQUENCES))


def test_fisher_is_not_the_square_of_the_batch_gradient(tiny_lm):
    stats = measure(tiny_lm, [padded_batch(SEQUENCES)], log_likelihood=lm_log_likelihood, kinds=["fisher"],
                    accumulate_dtype=F64)
    tiny_lm.zero_grad()
    lm_log_likelihood(tiny_lm, padded_batch(SEQUENCES)).sum().backward()
    squared_batch = tiny_lm.query.weight.grad.square() / len(SEQUENCES)
    assert not torch.allclose(stats.tensors["fisher/query.weight"], squared_batch)


def test_padding_changes_no_statistic(tiny_lm):
    together = measure(tiny_lm, [padded_batch(SEQUENCES)], log_likelihood=lm_log_likelihood,
                       kinds=["fisher", "gram", "kfac"], accumulate_dtype=F64)
    alone = measure(tiny_lm, [padded_batch([seq]) for seq in SEQUENCES], log_likelihood=lm_log_likelihood,
                    kinds=["fisher", "gram", "kfac"], accumulate_dtype=F64)
    assert together.counts == alone.counts
    assert together.counts["gram/query"] == sum(map(len, SEQUENCES))  # tokens, padding excluded
    for key, value in alone.tensors.items():
        torch.testing.assert_close(together.tensors[key], value, rtol=1e-9, atol=1e-12, msg=key)


def _mlp_classifier(sizes=(3, 5, 4), examples=6, seed=2):
    """A float64 MLP classifier, a batch {x, labels}, and its class log-probabilities and log-likelihood."""
    torch.manual_seed(seed)
    mlp = nn.Sequential(nn.Linear(sizes[0], sizes[1]), nn.Tanh(), nn.Linear(sizes[1], sizes[2])).to(F64)
    batch = {"x": torch.randn(examples, sizes[0], dtype=F64), "labels": torch.randint(0, sizes[2], (examples,))}

    def class_log_probs(model, batch):
        return torch.log_softmax(model(batch["x"]), -1)

    def log_likelihood(model, batch):
        return class_log_probs(model, batch).gather(-1, batch["labels"][:, None]).squeeze(-1)

    return mlp, batch, class_log_probs, log_likelihood


def test_gram_and_kfac_equal_direct_computation_on_an_mlp():
    mlp, batch, _, classify = _mlp_classifier(sizes=(4, 6, 3), examples=10, seed=1)
    x, y = batch["x"], batch["labels"]
    stats = measure(mlp, [{"x": x[:6], "labels": y[:6]}, {"x": x[6:], "labels": y[6:]}], log_likelihood=classify,
                    kinds=["gram", "kfac"], accumulate_dtype=F64)
    hidden_in = x
    hidden_out = mlp[0](x)
    head_in = torch.tanh(hidden_out)
    hidden_out.retain_grad()
    logits = mlp[2](head_in)
    logits.retain_grad()
    torch.log_softmax(logits, -1).gather(-1, y[:, None]).sum().backward()
    ones = torch.ones(10, 1, dtype=F64)
    direct = {
        "gram/0": hidden_in.T @ hidden_in / 10, "gram/2": head_in.T @ head_in / 10,
        "kfac_a/0": torch.cat([hidden_in, ones], 1).T @ torch.cat([hidden_in, ones], 1) / 10,
        "kfac_a/2": torch.cat([head_in, ones], 1).T @ torch.cat([head_in, ones], 1) / 10,
        "kfac_g/0": hidden_out.grad.T @ hidden_out.grad / 10, "kfac_g/2": logits.grad.T @ logits.grad / 10,
    }
    assert set(stats.tensors) == set(direct)
    for key, value in direct.items():
        torch.testing.assert_close(stats.tensors[key], value.detach(), rtol=1e-10, atol=1e-12, msg=key)


def test_combining_halves_equals_measuring_the_whole(tiny_lm, tmp_path):
    kinds = ["fisher", "gram", "kfac"]
    whole = measure(tiny_lm, [padded_batch(SEQUENCES)], log_likelihood=lm_log_likelihood, kinds=kinds)
    measure(tiny_lm, [padded_batch(SEQUENCES[:1])], log_likelihood=lm_log_likelihood, kinds=kinds).save(tmp_path / "a")
    measure(tiny_lm, [padded_batch(SEQUENCES[1:])], log_likelihood=lm_log_likelihood, kinds=kinds).save(tmp_path / "b")
    combine_stats([tmp_path / "a", tmp_path / "b"], tmp_path / "ab")
    combined = StatsReader(tmp_path / "ab")
    assert combined.counts == whole.counts
    assert combined.fisher_variant == "empirical"
    for key, value in whole.tensors.items():
        torch.testing.assert_close(combined.get(key), value.float(), rtol=1e-5, atol=1e-9, msg=key)


def test_statistics_of_another_model_do_not_combine(tiny_lm, tmp_path):
    measure(tiny_lm, [padded_batch(SEQUENCES)], log_likelihood=lm_log_likelihood, kinds=["gram"]).save(tmp_path / "a")
    other = TinyLM(width=4).to(F64)
    measure(other, [padded_batch(SEQUENCES)], log_likelihood=lm_log_likelihood, kinds=["gram"]).save(tmp_path / "b")
    with pytest.raises(MergeError, match="another model"):
        combine_stats([tmp_path / "a", tmp_path / "b"], tmp_path / "ab")
    assert not (tmp_path / "ab").exists()


def test_bad_input_is_a_clear_error(tiny_lm):
    with pytest.raises(MergeError, match="no data"):
        measure(tiny_lm, [], log_likelihood=lm_log_likelihood, kinds=["gram"])
    with pytest.raises(MergeError, match="unknown statistic kind 'hessian'"):
        measure(tiny_lm, [padded_batch(SEQUENCES)], log_likelihood=lm_log_likelihood, kinds=["hessian"])
    no_linear = nn.Sequential(nn.Embedding(11, 4))
    with pytest.raises(MergeError, match="no Linear layers"):
        measure(no_linear, [{"x": torch.zeros(2, dtype=torch.long)}], log_likelihood=lambda m, b: m(b["x"]).sum(-1),
                kinds=["gram"])


def test_exact_fisher_is_the_expectation_over_the_model_s_labels():
    """F = (1/N) Σ_n Σ_c p(c|x_n) (∂ log p(c|x_n)/∂θ)², by brute force: one backward per (example, class)."""
    from mergesmith.measure import classifier_fisher_labels

    mlp, batch, class_log_probs, log_likelihood = _mlp_classifier()
    stats = measure(mlp, [batch], log_likelihood=log_likelihood, kinds=["fisher"], accumulate_dtype=F64,
                    fisher_labels=classifier_fisher_labels("exact", class_log_probs), fisher_variant="exact")
    expected = {name: torch.zeros_like(p) for name, p in mlp.named_parameters()}
    for n in range(6):
        logp = torch.log_softmax(mlp(batch["x"][n:n + 1]), -1)[0]
        for c in range(4):
            grads = torch.autograd.grad(logp[c], list(mlp.parameters()), retain_graph=True)
            for (name, _), g in zip(mlp.named_parameters(), grads):
                expected[name] += logp[c].exp().detach() * g.square() / 6
    assert stats.fisher_variant == "exact"
    for name, value in expected.items():
        torch.testing.assert_close(stats.tensors[f"fisher/{name}"], value, rtol=1e-9, atol=1e-12, msg=name)


def test_sampled_fisher_is_seeded_and_tends_to_the_exact_one():
    from mergesmith.measure import classifier_fisher_labels

    mlp, batch, class_log_probs, log_likelihood = _mlp_classifier()

    def fisher(variant, **options):
        labels = classifier_fisher_labels(variant, class_log_probs, **options)
        return measure(mlp, [batch], log_likelihood=log_likelihood, kinds=["fisher"], accumulate_dtype=F64,
                       fisher_labels=labels, fisher_variant=variant).tensors["fisher/2.weight"]

    torch.testing.assert_close(fisher("sampled", samples=3, seed=5), fisher("sampled", samples=3, seed=5))
    assert not torch.equal(fisher("sampled", samples=3, seed=5), fisher("sampled", samples=3, seed=6))
    exact, many = fisher("exact"), fisher("sampled", samples=4000, seed=0)
    assert torch.linalg.norm(many - exact) <= 0.05 * torch.linalg.norm(exact)


def _brute_force_fisher(model: nn.Module, batch: dict, log_likelihood) -> dict[str, torch.Tensor]:
    """Mean over examples of the squared gradient, one backward pass per example (no padding trimmed)."""
    examples = batch["input_ids"].shape[0]
    total = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    for n in range(examples):
        one = {k: v[n:n + 1] for k, v in batch.items()}
        grads = torch.autograd.grad(log_likelihood(model, one).sum(), list(model.parameters()), allow_unused=True)
        for (name, _), g in zip(model.named_parameters(), grads):
            if g is not None:
                total[name] += g.square()
    return {name: t / examples for name, t in total.items()}


def _hf_models():
    """Tiny random transformers: Llama (RMSNorm, untied head), GPT-2 (Conv1D, tied head, position embeddings
    broadcast over the batch), BERT classifier (LayerNorm, token-type and position embeddings)."""
    import transformers

    from mergesmith.measure.hf import causal_lm_log_likelihood, seq_cls_log_likelihood

    torch.manual_seed(3)
    small = dict(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2)
    return {
        "llama": (transformers.LlamaForCausalLM(transformers.LlamaConfig(**small, num_key_value_heads=1)),
                  causal_lm_log_likelihood, {}),
        "gpt2": (transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=2)),
                 causal_lm_log_likelihood, {}),
        "bert": (transformers.BertForSequenceClassification(transformers.BertConfig(**small, num_labels=3)),
                 seq_cls_log_likelihood, {"labels": torch.tensor([0, 2, 1, 1, 0])}),
    }


@pytest.mark.parametrize("architecture", ["llama", "gpt2", "bert"])
def test_per_example_fisher_of_hugging_face_models_equals_a_brute_force_loop(architecture):
    model, log_likelihood, labels = _hf_models()[architecture]
    model = model.to(F64).eval()
    ids = torch.randint(1, 40, (5, 6))
    mask = torch.ones(5, 6, dtype=torch.long)
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, **labels}
    stats = measure(model, [batch], log_likelihood=log_likelihood, kinds=["fisher"], accumulate_dtype=F64,
                    chunk_size=2)
    for name, expected in _brute_force_fisher(model, batch, log_likelihood).items():
        got = stats.tensors[f"fisher/{name}"]
        assert torch.linalg.norm(got - expected) <= 1e-6 * torch.linalg.norm(expected) + 1e-12, name


class _Scaled(nn.Module):
    """A container that owns a parameter and uses it in its own forward, and a Linear whose weight is also
    used outside the Linear's forward: neither is visible to the per-example hooks."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(3, 4)
        self.scale = nn.Parameter(torch.tensor([1.5, -0.5, 2.0, 1.0]))
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        hidden = torch.tanh(self.inner(x)) * self.scale
        return self.head(hidden) + hidden[:, :2] @ self.head.weight[:, :2].T


def test_parameters_the_hooks_cannot_see_are_measured_by_a_loop():
    from mergesmith.measure.fisher import PerExampleSquares

    torch.manual_seed(4)
    model = _Scaled().to(F64)
    batch = {"input_ids": torch.randn(5, 3, dtype=F64), "labels": torch.tensor([0, 1, 1, 0, 1])}

    def log_likelihood(model, batch):
        return torch.log_softmax(model(batch["input_ids"]), -1).gather(-1, batch["labels"][:, None]).squeeze(-1)

    squares = PerExampleSquares(model)
    squares.run(batch, log_likelihood, None)
    assert squares.uncovered == {"scale", "head.weight"}  # found by the first batch's check
    stats = measure(model, [batch], log_likelihood=log_likelihood, kinds=["fisher"], accumulate_dtype=F64)
    for name, expected in _brute_force_fisher(model, batch, log_likelihood).items():
        torch.testing.assert_close(stats.tensors[f"fisher/{name}"], expected, rtol=1e-9, atol=1e-14, msg=name)
