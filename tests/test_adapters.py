"""LoRA adapters in and out, checked against PEFT itself and against formulas written here.

Adapters are made with ``peft`` on tiny random models; their factors are filled with seeded random values (PEFT
starts B at zero, which would make every delta zero). The references: PEFT's ``merge_and_unload`` (what an
adapter *is* as a full model), the formula base + Σ w_i·scaling_i·B_i A_i in float64 from the saved factors,
PEFT's ``add_weighted_adapter(combination_type="cat")``, and the same merge of the adapters pre-merged into full
checkpoints.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

from conftest import _save_tokenizer, llama_config  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import mergesmith  # noqa: E402
from mergesmith.errors import CheckpointError, MergeError  # noqa: E402
from mergesmith.io.adapter import open_adapter  # noqa: E402
from mergesmith.methods.registry import get_method, method_names  # noqa: E402

FACTOR_SCALE = 0.3  # large against the base's 0.02 weights, so that float32 rounding stays far below any cut


def _fill(peft_model: torch.nn.Module, seed: int) -> None:
    """Seeded values for every trainable adapter tensor (factors, trained biases, modules_to_save copies)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(peft_model.named_parameters()):
            if p.requires_grad:
                p.copy_(FACTOR_SCALE * torch.randn(p.shape, generator=generator))


def _make_adapter(base: Path, out: Path, model_class, config, seed: int) -> Path:
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model_class.from_pretrained(base), config)
        _fill(peft_model, seed)
        peft_model.save_pretrained(out)
    return out


def _peft_merged(base: Path, adapter: Path, model_class) -> dict[str, torch.Tensor]:
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(model_class.from_pretrained(base), adapter).merge_and_unload()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def lora(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama base (attention biases, a tokenizer), three LoRA adapters over it exercising PEFT's options,
    and each adapter pre-merged into a full checkpoint by PEFT (pre-0, pre-1, pre-2)."""
    from peft import LoraConfig
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("lora")
    config = llama_config()
    config.attention_bias = True
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(root / "base")
    _save_tokenizer(root / "base")
    configs = [
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                   rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3}),
        LoraConfig(r=3, lora_alpha=5, use_rslora=True, target_modules=["q_proj", "k_proj", "up_proj", "embed_tokens"],
                   bias="lora_only"),
        LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "o_proj", "v_proj"], lora_bias=True),
    ]
    paths = {"base": root / "base"}
    for i, lora_config in enumerate(configs):
        paths[f"a{i}"] = _make_adapter(root / "base", root / f"a{i}", LlamaForCausalLM, lora_config, seed=10 + i)
        merged = _peft_merged(root / "base", paths[f"a{i}"], LlamaForCausalLM)
        model = LlamaForCausalLM(config)
        model.load_state_dict(merged)
        model.save_pretrained(root / f"pre-{i}")
        _save_tokenizer(root / f"pre-{i}")
        paths[f"pre-{i}"] = root / f"pre-{i}"
    return paths


def _adapter_factors(adapter: Path) -> dict[str, torch.Tensor]:
    """module -> scaling·B·A in float64, from the saved file and config by PEFT's documented rule (written out
    here, independently of mergesmith's reader): scaling = alpha / r, or alpha / √r with use_rslora, with r
    and alpha from rank_pattern / alpha_pattern when a pattern names the module's last component."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    deltas = {}
    for key, a in tensors.items():
        if not key.endswith("lora_A.weight"):
            continue
        module = key[len("base_model.model."):-len(".lora_A.weight")]
        leaf = module.rsplit(".", 1)[1]
        r = config["rank_pattern"].get(leaf, config["r"])
        alpha = config["alpha_pattern"].get(leaf, config["lora_alpha"])
        scaling = alpha / (math.sqrt(r) if config["use_rslora"] else r)
        b = tensors[key.replace("lora_A", "lora_B")]
        deltas[module + ".weight"] = scaling * (b.double() @ a.double())
    return deltas


def _merge(recipe: dict, out: Path, **options) -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mergesmith.merge(recipe, out, overwrite=True, **options)
    return load_file(str(out / "model.safetensors"))


# ---- reading an adapter is what PEFT's merge_and_unload makes of it ----------------------------------------

@pytest.mark.parametrize("index", [0, 1, 2])
def test_adapter_source_equals_peft_merge_and_unload(lora, index):
    from transformers import LlamaForCausalLM

    expected = _peft_merged(lora["base"], lora[f"a{index}"], LlamaForCausalLM)
    source = open_adapter(lora[f"a{index}"], lora["base"], "adapter")
    assert set(source.keys()) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(source.get(key).float(), value, rtol=1e-6, atol=1e-7, msg=key)
    assert source.modules, "the adapter changed nothing"


def test_heads_each_keeps_an_adapters_head_with_a_config_of_its_size(tmp_path):
    """Two classifier adapters (3 and 5 classes, heads in modules_to_save) over a 2-class base: each kept head
    loads with the config beside it."""
    from peft import LoraConfig
    from safetensors.torch import load_file as load
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(2)
    config = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=24, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(tmp_path / "base")
    adapters = []
    for classes in (3, 5):
        BertForSequenceClassification(BertConfig(**{**config.to_dict(), "num_labels": classes})).save_pretrained(
            tmp_path / f"start-{classes}")
        adapters.append(_make_adapter(tmp_path / f"start-{classes}", tmp_path / f"lora-{classes}",
                                      BertForSequenceClassification,
                                      LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query"]), seed=classes))
    recipe = {"merge_method": "task_arithmetic", "base_model": str(tmp_path / "base"), "heads": "each",
              "models": [{"model": str(a)} for a in adapters]}
    _merge(recipe, tmp_path / "out")
    for classes, adapter in zip((3, 5), adapters):
        folder = tmp_path / "out" / "heads" / adapter.name
        assert json.loads((folder / "config.json").read_text())["num_labels"] == classes
        head = load(str(folder / "model.safetensors"))
        model = BertForSequenceClassification.from_pretrained(tmp_path / "out", num_labels=classes,
                                                              ignore_mismatched_sizes=True)
        model.classifier.load_state_dict({k.removeprefix("classifier."): v for k, v in head.items()})
        assert model.classifier.weight.shape == (classes, 16)


def test_bert_sequence_classifier_adapter_with_embeddings_biases_and_head(tmp_path):
    """Embedding LoRA (lora_embedding_A/B, a transposed delta), bias: all, and modules_to_save (the head)."""
    from peft import LoraConfig
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(1)
    config = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=24, num_labels=3)
    BertForSequenceClassification(config).save_pretrained(tmp_path / "base")
    adapter = _make_adapter(tmp_path / "base", tmp_path / "adapter", BertForSequenceClassification,
                            LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=6, bias="all",
                                       target_modules=["query", "value", "word_embeddings"]), seed=3)
    expected = _peft_merged(tmp_path / "base", adapter, BertForSequenceClassification)
    source = open_adapter(adapter, tmp_path / "base", "adapter")
    for key, value in expected.items():
        torch.testing.assert_close(source.get(key).float(), value, rtol=1e-6, atol=1e-7, msg=key)
    assert "bert.embeddings.word_embeddings.weight" in source.modules
    # the same adapter over the base saved without its task wrapper (BertModel: 'encoder...', not 'bert.encoder...')
    BertForSequenceClassification.from_pretrained(tmp_path / "base").bert.save_pretrained(tmp_path / "body")
    over_body = open_adapter(adapter, tmp_path / "body", "adapter")
    for key in over_body.modules:
        torch.testing.assert_close(over_body.get(key).float(), expected["bert." + key], rtol=1e-6, atol=1e-7, msg=key)
    assert "embeddings.word_embeddings.weight" in over_body.modules


def test_gpt2_conv1d_adapter_with_fan_in_fan_out(gpt2, tmp_path):
    from peft import LoraConfig
    from transformers import GPT2LMHeadModel

    adapter = _make_adapter(gpt2["base"], tmp_path / "adapter", GPT2LMHeadModel,
                            LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
                            seed=4)
    expected = _peft_merged(gpt2["base"], adapter, GPT2LMHeadModel)
    source = open_adapter(adapter, gpt2["base"], "adapter")
    for key in source.modules:
        torch.testing.assert_close(source.get(key).float(), expected[key], rtol=1e-6, atol=1e-7, msg=key)


# ---- merges of adapters ---------------------------------------------------------------------------------------

def test_merge_is_base_plus_weighted_scaled_deltas_in_float64(lora, tmp_path):
    weights = [0.5, -0.25, 0.75]
    recipe = {"merge_method": "task_arithmetic", "base_model": str(lora["base"]), "dtype": "float32",
              "models": [{"model": str(lora[f"a{i}"]), "parameters": {"weight": w}} for i, w in enumerate(weights)]}
    merged = _merge(recipe, tmp_path / "out")
    base = load_file(str(lora["base"] / "model.safetensors"))
    expected = {k: v.double() for k, v in base.items()}
    for i, w in enumerate(weights):
        for key, delta in _adapter_factors(lora[f"a{i}"]).items():
            expected[key] += w * delta
    replaced = {"model.embed_tokens.weight"} | {k for k in base if k.endswith(".bias")}  # also trained biases
    for key, value in expected.items():
        if key in replaced:
            continue
        torch.testing.assert_close(merged[key].double(), value, rtol=0, atol=2e-6, msg=key)


def test_peft_cat_combination_equals_the_linear_merge(lora, tmp_path):
    """PEFT's add_weighted_adapter(cat) stacks the factors, so its merged model is base + Σ w_i s_i B_i A_i: the
    linear merge with weights summing to 1 over two adapters that touch the same kinds of modules."""
    from peft import LoraConfig, PeftModel
    from transformers import LlamaForCausalLM

    adapters = [_make_adapter(lora["base"], tmp_path / f"c{i}", LlamaForCausalLM,
                              LoraConfig(r=2 + i, lora_alpha=4, target_modules=["q_proj", "v_proj"]), seed=20 + i)
                for i in range(2)]
    weights = [0.3, 0.7]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(lora["base"]), adapters[0],
                                          adapter_name="c0")
        model.load_adapter(adapters[1], adapter_name="c1")
        model.add_weighted_adapter(["c0", "c1"], weights, "cat", combination_type="cat")
        model.set_adapter("cat")
        expected = model.merge_and_unload(adapter_names=["cat"]).state_dict()
    recipe = {"merge_method": "linear", "base_model": str(lora["base"]), "dtype": "float32",
              "models": [{"model": str(a), "parameters": {"weight": w}} for a, w in zip(adapters, weights)]}
    merged = _merge(recipe, tmp_path / "out")
    for key, value in expected.items():
        torch.testing.assert_close(merged[key], value, rtol=1e-5, atol=1e-6, msg=key)


def _methods() -> list[str]:
    """Every method that can merge three models into a base (passthrough takes one; nearswap and arcee_fusion two),
    but WUDI (its own test follows) and the layer-wise regmean_plusplus (which takes full checkpoints only)."""
    return [m for m in method_names()
            if (get_method(m).max_models or 3) >= 3 and get_method(m).min_models <= 3 and m != "wudi"
            and not get_method(m).layerwise]


@pytest.fixture(scope="module")
def sidecars(lora, tmp_path_factory) -> dict[str, Path]:
    """Fisher, Gram and K-FAC of every adapter (measured on base + adapter) and of its pre-merged checkpoint."""
    root = tmp_path_factory.mktemp("lora-stats")
    data = [{"text": " ".join(f"w{(7 * i + j) % 90}" for j in range(6))} for i in range(8)]
    paths = {}
    for name in [f"a{i}" for i in range(3)] + [f"pre-{i}" for i in range(3)]:
        options = {"base": lora["base"]} if name.startswith("a") else {}
        run = mergesmith.measure_checkpoint(lora[name], data, kinds=["fisher", "gram", "kfac"], task="causal-lm",
                                            batch_size=4, max_length=8, **options)
        paths[name] = run.statistics.save(root / name)
    return paths


def test_statistics_of_an_adapter_are_those_of_its_premerged_checkpoint(sidecars):
    from mergesmith.io.sidecar import StatsReader

    for i in range(3):
        adapter, full = StatsReader(sidecars[f"a{i}"]), StatsReader(sidecars[f"pre-{i}"])
        assert sorted(adapter.keys()) == sorted(full.keys())
        for key in full.keys():  # peft rounds (B A)·s + W, mergesmith W + (B·s) A: float32 apart
            scale = full.get(key).abs().max().clamp_min(1e-12)
            torch.testing.assert_close(adapter.get(key) / scale, full.get(key) / scale, rtol=0, atol=1e-5, msg=key)


@pytest.mark.parametrize("method", _methods())
def test_every_method_merges_adapters_as_their_premerged_checkpoints(lora, sidecars, method, tmp_path):
    """The same merge of the adapters and of the checkpoints PEFT pre-merged from them. The subspace methods
    decompose the adapters' factors exactly, the pre-merged deltas densely: equal to float32 precision. WUDI's
    exact solve is the exception, tested against its formula below: on pre-merged low-rank deltas float32
    rounding fills Σ G_i's null space, which the dense solve then amplifies."""
    spec = get_method(method)
    merged = {}
    for kind in ("a", "pre-"):
        models = []
        for i in range(3):
            entry = {"model": str(lora[f"{kind}{i}"])}
            if spec.needs is not None:
                entry["stats"] = str(sidecars[f"{kind}{i}"])
            models.append(entry)
        recipe = {"merge_method": method, "models": models, "dtype": "float32"}
        if method == "mats":  # K-FAC by CG: a few iterations are the same computation on both sides, and cheap
            recipe["parameters"] = {"max_iters": 10}
        if spec.base != "ignored":
            recipe["base_model"] = str(lora["base"])
        merged[kind] = _merge(recipe, tmp_path / kind)
        if kind == "a":  # the decompositions take the adapters' factors, not the dense deltas
            jobs = mergesmith.plan_merge(recipe).jobs
            matrices = {job.name for job in jobs if len(job.shape) == 2}
            factored = {job.name for job in jobs if job.factored}
            assert (matrices <= factored) if spec.low_rank else not factored
    for key, value in merged["pre-"].items():
        scale = value.abs().max().clamp_min(1e-6)
        torch.testing.assert_close(merged["a"][key] / scale, value / scale, rtol=0, atol=2e-5, msg=f"{method} {key}")


def test_wudi_on_adapters_is_the_minimum_norm_solution(lora, tmp_path):
    """τ Σ G_i = Σ Δ_i G_i with G_i = Δ_iᵀΔ_i / ‖Δ_i‖², Σ G_i singular (low rank): the minimum-norm solution by
    float64 pseudo-inverse of the exact deltas, computed here."""
    recipe = {"merge_method": "wudi", "base_model": str(lora["base"]), "dtype": "float32",
              "models": [{"model": str(lora[f"a{i}"])} for i in range(3)]}
    merged = _merge(recipe, tmp_path / "out")
    base = load_file(str(lora["base"] / "model.safetensors"))
    factors = [_adapter_factors(lora[f"a{i}"]) for i in range(3)]
    for key in sorted(set().union(*factors)):
        deltas = [f[key] for f in factors if key in f]
        grams = [d.T @ d / d.pow(2).sum() for d in deltas]
        gram_sum = sum(grams)
        tau = sum(d @ g for d, g in zip(deltas, grams)) @ torch.linalg.pinv(gram_sum, rtol=1e-10, hermitian=True)
        torch.testing.assert_close(merged[key].double() - base[key].double(), tau, rtol=0, atol=5e-5, msg=key)


def test_factored_svd_is_the_svd_of_the_product():
    from mergesmith.methods.subspace import factored_svd

    generator = torch.Generator().manual_seed(0)
    left, right = torch.randn(30, 5, generator=generator), torch.randn(5, 20, generator=generator)
    u, s, vt = factored_svd(left, right, 3)
    u_ref, s_ref, vt_ref = torch.linalg.svd(left.double() @ right.double(), full_matrices=False)
    torch.testing.assert_close(s.double(), s_ref[:3], rtol=1e-6, atol=0)
    torch.testing.assert_close(((u * s) @ vt).double(), (u_ref[:, :3] * s_ref[:3]) @ vt_ref[:3], rtol=0, atol=1e-5)
    torch.testing.assert_close(u.T @ u, torch.eye(3), atol=1e-6, rtol=0)
    assert factored_svd(left[:, :0], right[:0], 3)[1].numel() == 0  # an untouched matrix: no triplets


def test_base_plus_adapter_syntax_and_the_recorded_base(lora, tmp_path):
    """mergekit's BASE+ADAPTER, and an adapter alone whose adapter_config records a local base, merge like an
    adapter under base_model."""
    plain = {"merge_method": "linear", "dtype": "float32", "models": [{"model": str(lora["a0"])}, {"model":
             str(lora["a1"])}], "base_model": str(lora["base"])}
    expected = _merge(plain, tmp_path / "plain")
    joined = {"merge_method": "linear", "dtype": "float32",
              "models": [{"model": f"{lora['base']}+{lora[f'a{i}']}"} for i in range(2)]}
    assert all(torch.equal(expected[k], v) for k, v in _merge(joined, tmp_path / "joined").items())
    recorded = tmp_path / "recorded"
    recorded.mkdir()
    for name in ("adapter_model.safetensors",):
        (recorded / name).write_bytes((lora["a0"] / name).read_bytes())
    config = json.loads((lora["a0"] / "adapter_config.json").read_text())
    (recorded / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path":
                                                              str(lora["base"])}))
    alone = {"merge_method": "linear", "dtype": "float32", "models": [{"model": str(recorded)},
                                                                      {"model": f"{lora['base']}+{lora['a1']}"}]}
    assert all(torch.equal(expected[k], v) for k, v in _merge(alone, tmp_path / "alone").items())


# ---- adapters out --------------------------------------------------------------------------------------------

def test_extract_lora_at_full_rank_reproduces_the_fine_tune_and_loads_in_peft(llama, tmp_path, run_cli):
    from transformers import LlamaForCausalLM

    result = run_cli("extract-lora", llama["ft1"], llama["base"], "-o", tmp_path / "extracted", "--rank", "64")
    assert result.code == 0, result.stderr
    loaded = _peft_merged(llama["base"], tmp_path / "extracted", LlamaForCausalLM)
    expected = load_file(str(llama["ft1"] / "model.safetensors"))
    for key, value in expected.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=2e-6 * value.abs().max().item(), msg=key)
    assert "adapter" in result.stderr and "relative error" in result.stderr


def test_output_adapter_is_the_best_rank_r_approximation_of_the_merged_delta(lora, tmp_path, run_cli):
    """At rank R each module holds the truncated SVD of (full merge − base): Eckart–Young, by float64 LAPACK here;
    the reported error is ‖D − D_R‖ / ‖D‖; PEFT loads the adapter."""
    from transformers import LlamaForCausalLM

    recipe = {"merge_method": "ties", "base_model": str(lora["base"]), "dtype": "float32",
              "models": [{"model": str(lora[f"a{i}"]), "parameters": {"weight": 1.0, "density": 0.6}}
                         for i in range(3)]}
    full = _merge(recipe, tmp_path / "full")
    (tmp_path / "recipe.yaml").write_text(json.dumps(recipe))
    result = run_cli("merge", tmp_path / "recipe.yaml", tmp_path / "adapter", "--output-adapter", "--rank", "3")
    assert result.code == 0, result.stderr
    loaded = _peft_merged(lora["base"], tmp_path / "adapter", LlamaForCausalLM)
    base = load_file(str(lora["base"] / "model.safetensors"))
    card = (tmp_path / "adapter" / "README.md").read_text()
    checked = 0
    for key, value in full.items():
        delta = value.double() - base[key].double()
        if delta.dim() != 2 or not bool(delta.any()):
            torch.testing.assert_close(loaded[key], value, rtol=0, atol=1e-6, msg=key)  # stored whole
            continue
        u, s, vt = torch.linalg.svd(delta, full_matrices=False)
        best = (u[:, :3] * s[:3]) @ vt[:3]
        torch.testing.assert_close(loaded[key].double() - base[key].double(), best, rtol=0, atol=1e-5, msg=key)
        error = ((delta - best).norm() / delta.norm()).item()
        assert f"{error:.3e}"[:4] in card or key[:-len(".weight")] not in card.split("## Recipe")[0]
        checked += 1
    assert checked >= 6


# ---- what is refused ---------------------------------------------------------------------------------------

def _edited_adapter(source: Path, target: Path, **changes) -> Path:
    target.mkdir()
    (target / "adapter_model.safetensors").write_bytes((source / "adapter_model.safetensors").read_bytes())
    config = json.loads((source / "adapter_config.json").read_text())
    (target / "adapter_config.json").write_text(json.dumps({**config, **changes}))
    return target


@pytest.mark.parametrize(("changes", "words"), [
    ({"use_dora": True}, "DoRA"),
    ({"peft_type": "IA3"}, "IA3"),
    ({"r": 5}, "rank 4 in its factors"),
    ({"layer_replication": [[0, 1]]}, "layer_replication"),
])
def test_adapters_mergesmith_cannot_merge_exactly_are_one_clear_line(lora, tmp_path, run_cli, changes, words):
    bad = _edited_adapter(lora["a0"], tmp_path / "bad", **changes)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"merge_method: linear\nbase_model: {lora['base']}\nmodels:\n  - model: {bad}\n"
                      f"  - model: {lora['a1']}\n")
    result = run_cli("merge", recipe, tmp_path / "out")
    assert result.code == 2 and words in result.error_line and str(tmp_path / "bad") in result.error_line
    assert not (tmp_path / "out").exists()


def test_an_adapter_without_a_known_base_says_how_to_name_one(lora, tmp_path):
    """peft records the base it was given: a hub id is no local base; a local one is used (the linear merge of
    adapters with no base_model above)."""
    hub = _edited_adapter(lora["a0"], tmp_path / "hub", base_model_name_or_path="meta-llama/Llama-3.2-1B")
    recipe = {"merge_method": "linear", "models": [{"model": str(hub)}, {"model": str(lora["a1"])}]}
    with pytest.raises(CheckpointError, match=r"'meta-llama/Llama-3.2-1B', not a local directory; give its base as "
                                              r"base_model in the recipe \(--base for measure\), or write the model "
                                              r"as BASE\+"):
        mergesmith.merge(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    merged = _merge({**recipe, "models": [{"model": str(lora["a0"])}, {"model": str(lora["a1"])}]}, tmp_path / "ok")
    assert merged


def test_an_adapter_of_another_model_is_refused(lora, gpt2, tmp_path):
    recipe = {"merge_method": "linear", "base_model": str(gpt2["base"]),
              "models": [{"model": str(lora["a0"])}, {"model": str(gpt2["ft1"])}]}
    with pytest.raises(CheckpointError, match="is this adapter for another model"):
        mergesmith.merge(recipe, tmp_path / "out")


def test_adapter_output_options_are_checked_before_anything_runs(lora, tmp_path, run_cli):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {lora['pre-0']}\n  - model: {lora['pre-1']}\n")
    assert "--output-adapter needs --rank" in run_cli("merge", recipe, tmp_path / "o", "--output-adapter").error_line
    assert "add --output-adapter" in run_cli("merge", recipe, tmp_path / "o", "--rank", "4").error_line
    result = run_cli("merge", recipe, tmp_path / "o", "--output-adapter", "--rank", "4")
    assert result.code == 2 and "no base_model" in result.error_line
    assert not (tmp_path / "o").exists()
    with pytest.raises(MergeError, match="full model, not a LoRA adapter"):
        mergesmith.measure_checkpoint(lora["pre-0"], [{"text": "w1 w2"}], base=lora["base"], task="causal-lm")


def test_an_adapter_saved_as_bin_reads_as_its_safetensors(lora, tmp_path):
    """Older peft saved adapter_model.bin: read with torch.load(weights_only=True), like a model's .bin."""
    target = tmp_path / "bin"
    target.mkdir()
    torch.save(load_file(str(lora["a1"] / "adapter_model.safetensors")), target / "adapter_model.bin")
    (target / "adapter_config.json").write_text((lora["a1"] / "adapter_config.json").read_text())
    from_bin, from_safetensors = open_adapter(target, lora["base"], "bin"), open_adapter(lora["a1"], lora["base"], "s")
    for key in from_safetensors.keys():
        assert torch.equal(from_bin.get(key), from_safetensors.get(key)), key


def test_measure_cli_on_an_adapter_keys_the_sidecar_by_the_base_names(lora, sidecars, tmp_path, run_cli):
    from mergesmith.io.card import copy_tokenizer
    from mergesmith.io.sidecar import StatsReader

    copy_tokenizer(lora["base"], lora["a2"])  # peft users often save the tokenizer beside the adapter
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(f"w{(7 * i + j) % 90}" for j in range(6))}) + "\n"
                            for i in range(8)))
    result = run_cli("measure", lora["a2"], "--base", lora["base"], "--data", data, "--kind", "gram", "--task",
                     "causal-lm", "--batch-size", "4", "--max-length", "8", "-o", tmp_path / "stats")
    assert result.code == 0, result.stderr
    measured, expected = StatsReader(tmp_path / "stats"), StatsReader(sidecars["pre-2"])
    assert sorted(measured.keys()) == sorted(k for k in expected.keys() if k.startswith("gram/"))
    for key in measured.keys():
        scale = expected.get(key).abs().max().clamp_min(1e-12)
        torch.testing.assert_close(measured.get(key) / scale, expected.get(key) / scale, rtol=0, atol=1e-5, msg=key)


def test_a_gpt2_merge_written_as_an_adapter_loads_in_peft(gpt2, tmp_path):
    """GPT-2's Conv1D weights are stored (in, out): the output adapter sets fan_in_fan_out for them."""
    from transformers import GPT2LMHeadModel

    recipe = {"merge_method": "task_arithmetic", "base_model": str(gpt2["base"]), "dtype": "float32",
              "models": [{"model": str(gpt2["ft1"])}, {"model": str(gpt2["ft2"])}]}
    full = _merge(recipe, tmp_path / "full")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mergesmith.merge(recipe, tmp_path / "adapter", adapter_rank=1000)
    loaded = _peft_merged(gpt2["base"], tmp_path / "adapter", GPT2LMHeadModel)
    for key, value in full.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=1e-5, msg=key)
