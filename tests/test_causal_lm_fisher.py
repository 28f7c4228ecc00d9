"""The sampled Fisher of a causal LM against brute force: per-example backward passes over the labels the
sampler drew, the sampler's draws against the model's own next-token probabilities, and the weighted
sampled Fisher against the exact expectation over every label sequence of a tiny vocabulary."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from test_measure import padded_batch  # one padding helper for the measure tests

from mergesmith.errors import MergeError
from mergesmith.measure import measure
from mergesmith.measure.hf import IGNORE, causal_lm_fisher_labels, causal_lm_log_likelihood

F64 = torch.float64
VOCAB = 6


@pytest.fixture(scope="module")
def peaked_llama():
    """A 1-layer float64 Llama over 6 tokens whose head is scaled up, so that its next-token distributions
    are far from uniform and differ from position to position (a sampler that ignored them, or read them
    at the wrong position, would show)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=8, intermediate_size=16, num_attention_heads=2, num_key_value_heads=1,
                         vocab_size=VOCAB, num_hidden_layers=1, max_position_embeddings=16)
    model = LlamaForCausalLM(config).to(F64).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    return model


def next_token_log_probs(model, sequence: list[int]) -> torch.Tensor:
    """log p(· | x_0..x_t) for t = 0..len-2, shape (len - 1, vocab), from one unpadded forward pass."""
    logits = model(input_ids=torch.tensor([sequence])).logits[0]
    return torch.log_softmax(logits[:-1], dim=-1)


def squared_gradient(model, sequence: list[int], targets: list[int]) -> dict[str, torch.Tensor]:
    """(∂ Σ_t log p(targets_t | x_≤t) / ∂θ)², one backward pass."""
    logp = next_token_log_probs(model, sequence)
    total = sum(logp[t, v] for t, v in enumerate(targets))
    grads = torch.autograd.grad(total, list(model.parameters()))
    return {name: g.square() for (name, _), g in zip(model.named_parameters(), grads)}


SEQUENCES = [[1, 4, 2, 5, 3], [2, 2], [5, 0, 1]]


def test_sampled_fisher_is_the_mean_squared_gradient_over_the_drawn_labels(peaked_llama):
    samples, seed = 3, 11
    batch = padded_batch(SEQUENCES)
    drawn = causal_lm_fisher_labels(samples, seed=seed)(peaked_llama, batch)
    stats = measure(peaked_llama, [batch], log_likelihood=causal_lm_log_likelihood, kinds=["fisher"],
                    accumulate_dtype=F64, fisher_labels=causal_lm_fisher_labels(samples, seed=seed),
                    fisher_variant="sampled")

    assert len(drawn) == samples
    expected = {name: torch.zeros_like(p) for name, p in peaked_llama.named_parameters()}
    for weights, labelled in drawn:
        torch.testing.assert_close(weights, torch.full((3,), 1 / samples, dtype=F64))
        labels = labelled["labels"]
        assert labels.shape == batch["input_ids"].shape
        for n, sequence in enumerate(SEQUENCES):
            # labels[n, t] is the token drawn for position t (predicting x_{t+1}); nothing past the sequence
            targets = labels[n, :len(sequence) - 1].tolist()
            assert all(0 <= v < VOCAB for v in targets)
            assert (labels[n, len(sequence) - 1:] == IGNORE).all()
            for name, square in squared_gradient(peaked_llama, sequence, targets).items():
                expected[name] += square / (len(SEQUENCES) * samples)
    assert stats.fisher_variant == "sampled"
    assert stats.counts["fisher/lm_head.weight"] == len(SEQUENCES)
    for name, value in expected.items():
        torch.testing.assert_close(stats.tensors[f"fisher/{name}"], value, rtol=1e-9, atol=1e-14, msg=name)


def test_draws_follow_the_model_s_next_token_distribution_at_each_position(peaked_llama):
    """Frequencies of 20000 draws against p(· | x_≤t): within 5 binomial standard deviations everywhere,
    while the distributions at neighbouring positions differ by far more than that."""
    draws = 20000
    batch = padded_batch(SEQUENCES)
    labelled = causal_lm_fisher_labels(draws, seed=0)(peaked_llama, batch)
    labels = torch.stack([b["labels"] for _, b in labelled])  # (draws, batch, tokens)
    for n, sequence in enumerate(SEQUENCES):
        with torch.no_grad():
            probs = next_token_log_probs(peaked_llama, sequence).exp()  # (len - 1, vocab)
        frequencies = torch.stack([torch.bincount(labels[:, n, t], minlength=VOCAB) for t in range(len(sequence) - 1)])
        frequencies = frequencies.double() / draws
        tolerance = 5 * (probs * (1 - probs) / draws).sqrt() + 1e-12
        assert (frequencies - probs).abs().le(tolerance).all(), (n, frequencies, probs)
        if len(sequence) > 2:
            assert (probs[1:] - probs[:-1]).abs().max() > 10 * tolerance.max()


def test_weighted_sampled_fisher_tends_to_the_exact_expectation(peaked_llama):
    """For x = (x0, x1, x2) there are two target positions, so the exact Fisher is the expectation over all
    6² label sequences (v1, v2) ~ p(·|x0) p(·|x0 x1) of the squared gradient of log p(v1|x0) + log p(v2|x0 x1),
    computed by brute force. The sampled Fisher F̂ over k independent draws (here 20 copies of x in one batch,
    25 draws each) is unbiased with E‖F̂ − F‖² = (Σ_y p(y) ‖g_y²‖² − ‖F‖²) / k; by Markov's inequality ‖F̂ − F‖
    exceeds 3 times its root-mean-square with probability at most 1/9, and the draws are seeded, so the check
    is deterministic. A sampler drawing uniformly would be further off than that bound (checked too), so the
    check can fail."""
    sequence, copies, samples = [3, 1, 4], 20, 25
    k = copies * samples
    logp = next_token_log_probs(peaked_llama, sequence).detach()
    squares, probabilities = [], []
    for v1, v2 in itertools.product(range(VOCAB), repeat=2):
        squares.append(torch.cat([s.flatten() for s in squared_gradient(peaked_llama, sequence, [v1, v2]).values()]))
        probabilities.append(math.exp(logp[0, v1] + logp[1, v2]))
    squares = torch.stack(squares)  # (label sequences, parameters)
    p = torch.tensor(probabilities, dtype=F64)
    exact = p @ squares
    rms = math.sqrt((p @ squares.square().sum(1) - exact.square().sum()) / k)
    uniform = squares.mean(0)
    assert torch.linalg.norm(uniform - exact) > 3 * rms

    stats = measure(peaked_llama, [padded_batch([sequence] * copies)], log_likelihood=causal_lm_log_likelihood,
                    kinds=["fisher"], accumulate_dtype=F64, fisher_labels=causal_lm_fisher_labels(samples, seed=1),
                    fisher_variant="sampled")
    sampled = torch.cat([stats.tensors[f"fisher/{name}"].flatten() for name, _ in peaked_llama.named_parameters()])
    assert torch.linalg.norm(sampled - exact) <= 3 * rms
    assert 3 * rms < 0.2 * torch.linalg.norm(exact)  # the bound is tight enough to mean something


def test_same_seed_same_labels_other_seed_other_labels(peaked_llama):
    batch = padded_batch(SEQUENCES)

    def labels(seed: int, rows: slice = slice(None)) -> torch.Tensor:
        part = {k: v[rows] for k, v in batch.items()}
        return torch.stack([b["labels"] for _, b in causal_lm_fisher_labels(4, seed=seed)(peaked_llama, part)])

    assert torch.equal(labels(7), labels(7))
    assert not torch.equal(labels(7), labels(8))
    # one example per batch, unpadded, draws what the padded batch of all three drew
    whole, draw = labels(7), causal_lm_fisher_labels(4, seed=7)
    for n, sequence in enumerate(SEQUENCES):
        alone = draw(peaked_llama, padded_batch([sequence]))
        assert torch.equal(torch.stack([b["labels"][0] for _, b in alone]), whole[:, n, :len(sequence)]), n
    with pytest.raises(MergeError, match=r"--samples 0: draw at least 1"):
        causal_lm_fisher_labels(0)


def test_log_likelihood_with_labels_is_aligned_with_the_logits(peaked_llama):
    """labels[:, t] is compared with logits[:, t]; without labels the targets are the next input tokens."""
    batch = padded_batch(SEQUENCES)
    with torch.no_grad():
        plain = causal_lm_log_likelihood(peaked_llama, batch)
        shifted = torch.full_like(batch["input_ids"], IGNORE)
        shifted[:, :-1] = batch["input_ids"][:, 1:]
        relabelled = causal_lm_log_likelihood(peaked_llama, {**batch, "labels": shifted})
        for n, sequence in enumerate(SEQUENCES):
            logp = next_token_log_probs(peaked_llama, sequence)
            expected = sum(logp[t, sequence[t + 1]] for t in range(len(sequence) - 1))
            torch.testing.assert_close(plain[n], expected, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(relabelled[n], expected, rtol=1e-12, atol=1e-12)
