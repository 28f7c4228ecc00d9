"""Reading recipes: numbers as mergekit ends up reading them, YAML errors with line and column, duplicate
keys, every numeric parameter's range, and every recipe in the docs (plus recipes in mergekit's own examples
style) read by both mergesmith and mergekit 0.1.5 to the same parameter values.

The mergekit half runs where ``MERGEKIT_YAML`` names a ``mergekit-yaml`` in a virtual environment of its
own (as tests/test_mergekit_parity.py); its ``python`` beside it reads all the recipes in one subprocess.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

import mergesmith
from mergesmith.config import load_recipe, load_yaml, loads_recipe, parse_number, parse_recipe
from mergesmith.errors import MergeError, RecipeError
from mergesmith.methods import get_method, method_names
from mergesmith.methods.registry import REQUIRED

ROOT = Path(__file__).resolve().parents[1]
MERGEKIT_YAML = os.environ.get("MERGEKIT_YAML")
INF, NAN = math.inf, math.nan


def value_of(text: str):
    """What our reader makes of one YAML scalar."""
    return load_yaml(f"v: {text}")[0]["v"]


def same(a, b) -> bool:
    """Equal values, NaN equal to NaN, int 1 equal to float 1.0 but never to True."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return (math.isnan(a) and math.isnan(b)) or a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


# ---------------------------------------------------------------------------------------------------------
# Scalars


# (YAML text, what mergesmith reads, what yaml.safe_load — mergekit's reader — reads)
SCALARS = [
    # YAML 1.2 floats that YAML 1.1 leaves as strings; mergekit's float() of the string gives the same number
    ("1e-3", 0.001, "1e-3"), ("5e2", 500.0, "5e2"), ("1E3", 1000.0, "1E3"), ("1.0e3", 1000.0, "1.0e3"),
    ("1e+3", 1000.0, "1e+3"), (".5e1", 5.0, ".5e1"), ("-.5", -0.5, "-.5"), ("+.5", 0.5, "+.5"),
    ("-1e-3", -0.001, "-1e-3"), ("1_0e-1", 1.0, "1_0e-1"),
    # read alike by both
    (".5", 0.5, 0.5), ("1_000", 1000, 1000), ("+1", 1, 1), ("1.0e-3", 0.001, 0.001), ("-1_000.5", -1000.5, -1000.5),
    ("1.", 1.0, 1.0), (".inf", INF, INF), ("-.inf", -INF, -INF), (".nan", NAN, NAN),
    ("010", 8, 8), ("0x10", 16, 16), ("1:30", 90, 90),  # YAML 1.1: octal, hexadecimal, sexagesimal
    ("yes", True, True), ("no", False, False), ("on", True, True), ("Off", False, False), ("TRUE", True, True),
    ("y", "y", "y"), ("n", "n", "n"), ("0o17", "0o17", "0o17"),
    ('"0.5"', "0.5", "0.5"), ("'1e-3'", "1e-3", "1e-3"),  # quoted: strings to YAML; numbers to a method
    # not numbers
    ("1e", "1e", "1e"), ("e3", "e3", "e3"), ("1e3.5", "1e3.5", "1e3.5"), ("1.2.3", "1.2.3", "1.2.3"),
    ("_1", "_1", "_1"), ("1,5", "1,5", "1,5"), ("-.", "-.", "-."), ("+e1", "+e1", "+e1"), ("inf", "inf", "inf"),
]


@pytest.mark.parametrize("text, ours, safe_load", SCALARS, ids=[s[0] for s in SCALARS])
def test_scalars_read_as_yaml_1_2_floats_and_otherwise_as_safe_load(text, ours, safe_load):
    assert same(value_of(text), ours)
    assert same(yaml.safe_load(f"v: {text}")["v"], safe_load)
    if not same(ours, safe_load):  # the only differences: strings mergekit's methods turn into the same number
        assert isinstance(safe_load, str) and float(safe_load) == ours


@pytest.mark.parametrize("text, expected", [
    ("0.5", 0.5), (" 1e-3 ", 0.001), ("1_000", 1000), ("+1", 1), ("-.5", -0.5), ("5.", 5.0), ("1E3", 1000.0),
    ("010", 10), ("1" * 500, float("1" * 500)), ("1e999", INF),
    ("", None), ("abc", None), ("0x10", None), ("inf", None), ("nan", None), ("1__0", None), ("1_", None),
    ("_1", None), ("1._5", None), ("١", None), ("1 0", None), ("--1", None), (".", None), ("e5", None),
])
def test_parse_number_reads_decimal_strings_only(text, expected):
    assert same(parse_number(text), expected)


# ---------------------------------------------------------------------------------------------------------
# Parameter values in a recipe


def ties(parameters: dict | str, model_parameters: str = "{}") -> str:
    if isinstance(parameters, dict):
        parameters = json.dumps(parameters)
    return (f"merge_method: ties\nbase_model: ./base\nmodels:\n  - model: ./a\n    parameters: {model_parameters}\n"
            f"  - ./b\nparameters: {parameters}\n")


def mats(parameters: str) -> str:
    return f"merge_method: mats\nbase_model: ./base\nmodels: [./a, ./b]\nparameters: {parameters}\n"


@pytest.mark.parametrize("text, name, expected", [
    (ties("{lambda: 1e-3}"), "lambda", 0.001),
    (ties("{lambda: 5e2}"), "lambda", 500.0),
    (ties("{lambda: '1E3'}"), "lambda", 1000.0),
    (ties("{lambda: -.5}"), "lambda", -0.5),
    (ties("{lambda: 1_000}"), "lambda", 1000.0),
    (ties("{lambda: +1}"), "lambda", 1.0),
    (ties('{density: "0.5"}'), "density", 0.5),
    (ties('{density: " 5e-1 "}'), "density", 0.5),
    (ties("{density: [1e-1, '0.5', .9]}"), "density", [0.1, 0.5, 0.9]),
    (ties("{density: [{filter: mlp, value: '1e-1'}, {value: [.2, '3e-1']}]}"), "density",
     [{"filter": "mlp", "value": 0.1}, {"value": [0.2, 0.3]}]),
    (ties("{density: {filter: mlp, value: '0.25'}}"), "density", {"filter": "mlp", "value": 0.25}),
    (ties("{normalize: yes, int8_mask: off}"), "normalize", True),
    (ties("{rescale: on}"), "rescale", True),
    (ties("{rescale: l1}"), "rescale", "l1"),
    (mats("{max_iters: 1_000}"), "max_iters", 1000),
    (mats("{max_iters: 1e3}"), "max_iters", 1000),
    (mats("{max_iters: '250'}"), "max_iters", 250),
    (mats("{max_iters: 100.0}"), "max_iters", 100),
    (mats("{damping: 1e-3, tol: 1e-6}"), "tol", 1e-6),
    (mats("{init: base}"), "init", "base"),
    ("merge_method: gradient_matching\nbase_model: ./base\nmodels: [./a]\nparameters: {prior: '1e-3'}\n",
     "prior", 0.001),
    ("merge_method: gradient_matching\nbase_model: ./base\nmodels: [./a]\nparameters: {prior: base}\n",
     "prior", "base"),
])
def test_recipe_values_are_the_numbers_the_method_uses(text, name, expected):
    recipe = loads_recipe(text)
    got = recipe.parameters[name]
    assert same(got, expected), got
    if isinstance(expected, int) and not isinstance(expected, bool):
        assert type(got) is int
    assert same(parse_recipe(yaml.safe_load(text)).parameters[name], expected)  # the dict API agrees


def test_quoted_numbers_in_gradients_interpolate():
    """A gradient of quoted numbers interpolates as numbers, as mergekit's evaluate_setting validates each
    entry before interpolating (mergekit/config.py:47-59)."""
    from mergesmith.config import evaluate_setting
    recipe = loads_recipe(ties("{}", "{weight: ['0', '1e0']}"))
    assert evaluate_setting(recipe.models[0].parameters["weight"], "x", 0.25) == 0.25


def test_the_recipe_yaml_round_trips_the_numbers():
    recipe = loads_recipe(mats("{damping: 1e-10, tol: '1e-6', max_iters: 1e3}"))
    again = loads_recipe(recipe.to_yaml())
    assert again.parameters == {"damping": 1e-10, "tol": 1e-6, "max_iters": 1000}


def test_the_callers_dict_is_not_changed():
    data = yaml.safe_load(ties('{density: "0.5", lambda: [1, "2"]}'))
    parse_recipe(data)
    assert data["parameters"] == {"density": "0.5", "lambda": [1, "2"]}


# (recipe text, pattern the one-line error must match); each names the recipe, its line and the parameter
BAD_VALUES = [
    (ties("{lambda: abc}"), r"line 7, column 14: parameters: 'lambda' must be a number, got 'abc'"),
    (ties("{lambda: true}"), r"'lambda' must be a number, got True"),
    (ties("{lambda: '0x10'}"), r"'lambda' must be a number, got '0x10'"),
    (ties("{lambda: 'inf'}"), r"'lambda' must be a number, got 'inf'"),
    (ties("{lambda: .inf}"), r"'lambda' must lie in \(-inf, inf\), got inf"),
    (ties("{lambda: .nan}"), r"'lambda' must lie in \(-inf, inf\), got nan"),
    (ties("{}", "{density: 1.5}"), r"line 5, column 18: models\.0\.parameters: 'density' must lie in "
                                   r"\[0\.0, 1\.0\], got 1\.5"),
    (ties("{}", "{density: [0.5, 1e1]}"), r"line 5, column \d+: .*'density' must lie in \[0\.0, 1\.0\], got 10\.0"),
    (ties("{}", "{density: [{filter: mlp, value: -.1}]}"), r"'density' must lie in \[0\.0, 1\.0\], got -0\.1"),
    (ties("{}", "{density: '1.5'}"), r"'density' must lie in \[0\.0, 1\.0\], got 1\.5"),
    (ties("{normalize: 1}"), r"'normalize' must be true or false, got 1"),
    (ties("{normalize: 'true'}"), r"'normalize' must be true or false, got 'true'"),
    (ties("{normalize: y}"), r"'normalize' must be true or false, got 'y'"),
    (ties("{rescale: 1}"), r"'rescale' must be one of .*got 1"),
    (ties("{density: }"), r"parameters\.density: has no value"),
    (ties("{density: [[0.5]]}"), r"expected \{filter, value\} conditions, got \[0\.5\]"),
    (ties("{densty: 0.5}"), r"line 7, column 14: parameters: unknown parameter 'densty' for method 'ties' "
                            r"\(did you mean 'density'\?\)"),
    (ties("{}", "{lamda: 0.5}"), r"models\.0\.parameters: unknown parameter 'lamda' for method 'ties' \(did you "
                                 r"mean 'lambda'\? It is a global parameter"),
    (ties("{}", "{lambda: 0.5}"), r"'lambda' is a global parameter of 'ties'"),
    (mats("{max_iters: 12.5}"), r"'max_iters' must be a whole number, got 12\.5"),
    (mats("{max_iters: 0}"), r"'max_iters' must lie in an integer in \[1, inf\), got 0"),
    (mats("{tol: 0}"), r"'tol' must lie in \(0\.0, 1\.0\), got 0"),
    (mats("{damping: -1e-3}"), r"'damping' must lie in \[0\.0, inf\), got -0\.001"),
    (mats("{init: 1}"), r"'init' must be one of .*got 1"),
    ("merge_method: tiess\nmodels: [./a]\n", r"line 1, column 1: unknown merge_method 'tiess' \(did you mean 'ties'"),
    ("merge_method: ties\nmodels: [./a]\ndtype: bf61\n", r"line 3, column 1: 'dtype: bf61' is not a dtype"),
    ("merge_method: ties\nmodels:\n  - model: ./a\n    parameters: [1]\n",
     r"line 4, column \d+: models\.0\.parameters: Input should be a valid dictionary"),
]


@pytest.mark.parametrize("text, pattern", BAD_VALUES)
def test_bad_values_are_one_line_recipe_errors(tmp_path, text, pattern):
    path = tmp_path / "r.yml"
    path.write_text(text)
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"recipe {path}"), message
    assert re.search(pattern, message), f"{pattern!r} not in {message!r}"


# ---------------------------------------------------------------------------------------------------------
# YAML errors and duplicate keys


@pytest.mark.parametrize("text, line, column, pattern", [
    ("merge_method: ties\nmodels: [./a\n", 3, 1, r"expected ',' or '\]'"),
    ("merge_method: ties\nmodels:\n  - model: ./a\n   parameters: {}\n", 4, 4, r"expected <block end>"),
    ("merge_method: ties\n\tmodels: []\n", 2, 1, r"found character '\\t'"),
    ("merge_method: [ties\n", 2, 1, r"expected ',' or '\]'"),
    ("merge_method: ties\nmodels: \"./a\n", 3, 1, r"found unexpected end of stream"),
    ("merge_method: ties\nmodels: *a\n", 2, 9, r"found undefined alias 'a'"),
    ("a: !!python/object/apply:os.system [ls]\n", 1, 4, r"could not determine a constructor"),
    ("merge_method: ties\nparameters: {lambda: !!int 1.5}\n", 2, 22, r"cannot read '1\.5' as !!int"),
    ("merge_method: ties\nparameters: {lambda: !!float abc}\n", 2, 22, r"cannot read 'abc' as !!float"),
    ("merge_method: ties\nwhen: 2001-13-45\n", 2, 7, r"cannot read '2001-13-45' as !!timestamp"),
    ("merge_method: ties\nparameters: {lambda: !!bool maybe}\n", 2, 22, r"as !!bool"),
    ("merge_method: ties\nn: " + "9" * 5000 + "\n", 2, 4, r"cannot read .* as !!int"),
    ("a: b\n---\nc: d\n", 2, 1, r"expected a single document"),
    ("merge_method: ties\n? [a]\n: b\n", 2, 3, r"unhashable key"),
    ("merge_method: ties\nx: \x00\n", 2, 4, r"character #x0000 is not allowed"),
    ("a: &x [*x]\n", 1, 8, r"alias \*x is used inside its own anchor"),
    ("a: " + "[" * 60 + "]" * 60 + "\n", 1, 43, r"nested more than 40 levels"),
])
def test_yaml_errors_name_the_line_and_column(tmp_path, text, line, column, pattern):
    path = tmp_path / "r.yml"
    path.write_text(text)
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    message = str(caught.value)
    assert message.startswith(f"recipe {path} line {line}, column {column}: "), message
    assert re.search(pattern, message), message
    assert "\n" not in message


def test_an_alias_bomb_is_refused_without_expanding_it():
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]  # 10^9 leaves
    with pytest.raises(RecipeError, match=r"line 1, column 1: invalid YAML: the document expands to more than"):
        loads_recipe("\n".join(lines))


def test_chained_aliases_cannot_nest_past_the_limit():
    lines = ["a0: &a0 " + "[" * 30 + "]" * 30]
    lines += [f"a{i}: &a{i} " + "[" * 30 + f"*a{i - 1}" + "]" * 30 for i in range(1, 40)]
    with pytest.raises(RecipeError, match=r"nested more than 40 levels deep \(through aliases\)"):
        loads_recipe("\n".join(lines))


@pytest.mark.parametrize("text, line, key, first", [
    ("merge_method: ties\nbase_model: ./b\nmodels: [./a]\nparameters:\n  density: 0.5\n  density: 0.7\n",
     6, "density", 5),
    ("merge_method: ties\nmerge_method: linear\nmodels: [./a]\n", 2, "merge_method", 1),
    ("merge_method: ties\nbase_model: ./b\nmodels:\n  - model: ./a\n    parameters: {weight: 1, weight: 2}\n",
     5, "weight", 5),
    ("merge_method: ties\nmodels:\n  - model: ./a\n    model: ./b\n", 4, "model", 3),
    ("merge_method: linear\nmodels: [./a]\nparameters: {1: a, true: b}\n", 3, "True", 3),  # 1 == True
])
def test_duplicate_keys_are_errors(text, line, key, first):
    with pytest.raises(RecipeError) as caught:
        loads_recipe(text, "r.yml")
    message = str(caught.value)
    assert message.startswith(f"recipe r.yml line {line}, column "), message
    assert f"duplicate key {key!r} (first on line {first})" in message or \
        f"duplicate key {key} (first on line {first})" in message, message


def test_merge_keys_may_be_overridden():
    """`<<: *defaults` then `density:` is YAML's override, not a duplicate."""
    recipe = loads_recipe("""
merge_method: ties
base_model: ./base
models:
  - model: ./a
    parameters: &defaults {weight: 0.5, density: 0.5}
  - model: ./b
    parameters:
      <<: *defaults
      density: 0.9
""")
    assert recipe.models[0].parameters == {"weight": 0.5, "density": 0.5}
    assert recipe.models[1].parameters == {"weight": 0.5, "density": 0.9}


@pytest.mark.parametrize("raw, pattern", [
    (b"merge_method: ties\n\xff\xfe", r"not UTF-8 text \(byte 19 is 0xff\)"),
    (b"\x00\x01", r"line 1, column 1: invalid YAML: character #x0000"),
    (b"", r"the recipe is empty"),
    (b"- a\n- b\n", r"expected a mapping at the top level"),
    (b"just text", r"expected a mapping at the top level"),
])
def test_unreadable_files(tmp_path, raw, pattern):
    path = tmp_path / "r.yml"
    path.write_bytes(raw)
    with pytest.raises(RecipeError, match=pattern):
        load_recipe(path)


def test_a_byte_order_mark_is_fine_and_a_directory_is_an_error(tmp_path):
    path = tmp_path / "r.yml"
    path.write_bytes("\ufeffmerge_method: linear\nmodels: [./a]\n".encode())
    assert load_recipe(path).merge_method == "linear"
    with pytest.raises(RecipeError, match=r"cannot be read"):
        load_recipe(tmp_path)
    with pytest.raises(RecipeError, match=r"not found"):
        load_recipe(tmp_path / "missing.yml")


# ---------------------------------------------------------------------------------------------------------
# Ranges: every numeric parameter of every method


def numeric_params():
    return [(m, p) for m in method_names() for p in get_method(m).params if p.kind in (int, float)]


# the documented range of each numeric parameter (docs/methods.md, "Parameter ranges"): kind, low, high,
# low excluded, high excluded (an infinite bound is always excluded)
RANGES = {
    "weight": (float, -INF, INF, True, True),
    "lambda": (float, -INF, INF, True, True),
    "scale": (float, -INF, INF, True, True),
    "density": (float, 0.0, 1.0, False, False),
    "gamma": (float, 0.0, 1.0, False, False),
    "t": (float, 0.0, 1.0, False, False),
    "alpha": (float, 0.0, 1.0, False, False),
    "fisher_floor": (float, 0.0, INF, False, True),
    "damping": (float, 0.0, INF, False, True),
    "data_size": (float, 0.0, INF, False, True),
    "prior": (float, 0.0, INF, False, True),
    "tol": (float, 0.0, 1.0, True, True),
    "max_iters": (int, 1, INF, False, True),
    "common_space_fraction": (float, 0.0, 1.0, False, False),
    "iterations": (int, 1, 100_000, False, False),
    "lr": (float, 0.0, 1.0, True, False),
    "epsilon": (float, 0.0, 1.0, False, False),
    "select_topk": (float, 0.0, 1.0, False, False),
    "r": (float, 0.0, INF, False, True),
    "eps": (float, 0.0, INF, True, True),
    "max_iter": (int, 0, INF, False, True),
}
# where a method's parameter has its own range: the curvature methods' weights weigh precision matrices
CURVATURE_WEIGHT = (float, 0.0, INF, False, True)
METHOD_RANGES = {(m, "weight"): CURVATURE_WEIGHT
                 for m in ("fisher", "regmean", "regmean_plusplus", "mats", "gradient_matching")}
# the subspace methods' alpha is the scale of the merged task vector, not RegMean's off-diagonal share
METHOD_RANGES |= {(m, "alpha"): (float, -INF, INF, True, True) for m in ("tsv", "iso_c", "iso_cts", "wudi")}
# RAM's epsilon is a threshold on |τ_i|, RAM+'s alpha a cap on a ratio, NearSwap's t a distance
METHOD_RANGES |= {(m, "epsilon"): (float, 0.0, INF, False, True) for m in ("ram", "ramplus_tl")}
METHOD_RANGES |= {("karcher", "tol"): (float, 0.0, 1.0, True, True)}  # mats's range, its own default
METHOD_RANGES |= {("ramplus_tl", "alpha"): (float, 0.0, INF, False, True),
                  ("nearswap", "t"): (float, 0.0, INF, False, True)}


def documented_range(method: str, name: str) -> tuple:
    return METHOD_RANGES.get((method, name), RANGES[name])


def test_every_numeric_parameter_declares_its_documented_interval():
    seen = set()
    for method, p in numeric_params():
        assert p.interval is not None, f"{method}.{p.name} has no interval"
        assert p.name in RANGES, f"{method}.{p.name}: add its range to RANGES and docs/methods.md"
        kind, low, high, open_low, open_high = documented_range(method, p.name)
        assert p.kind is kind, f"{method}.{p.name}"
        assert tuple(p.interval) == (low, high), f"{method}.{p.name}: {p.interval}"
        assert (p.open_low or low == -INF) == open_low and (p.open_high or high == INF) == open_high, p
        seen.add(p.name)
    assert seen == set(RANGES)


def edge_values(method: str, name: str) -> list[tuple[float, bool]]:
    """(value, accepted) at and around each bound of ``name``'s documented range, and the non-finite ones."""
    kind, low, high, open_low, open_high = documented_range(method, name)
    step = 1 if kind is int else 1e-9
    cases = [(NAN, False), (INF, False), (-INF, False)]
    for bound, excluded, inward in ((low, open_low, 1), (high, open_high, -1)):
        if math.isinf(bound):
            cases.append((math.copysign(1e300, bound) if kind is float else int(math.copysign(10**12, bound)), True))
        else:
            cases += [(bound, not excluded), (bound + inward * step, True), (bound - inward * step, False)]
    return cases


def _merge_inputs(method: str):
    spec = get_method(method)
    n = max(spec.min_models, 2 if spec.max_models is None or spec.max_models >= 2 else 1)
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(3, 4, generator=generator, dtype=torch.float64)
    tensors = [base + 0.1 * torch.randn(3, 4, generator=generator, dtype=torch.float64) for _ in range(n)]
    return (base if spec.base != "ignored" else None), tensors


EDGE_CASES = [(m, p.name, value, accepted) for m, p in numeric_params()
              for value, accepted in edge_values(m, p.name)]


@pytest.mark.parametrize("method, name, value, accepted", EDGE_CASES,
                         ids=[f"{m}-{n}-{v}" for m, n, v, _ in EDGE_CASES])
def test_edge_values_through_merge_tensors(method, name, value, accepted):
    base, tensors = _merge_inputs(method)
    spec = get_method(method)
    param = spec.param(name)
    kwargs = {"generator": torch.Generator().manual_seed(1)} if spec.random else {}
    # DELLA refuses density ± epsilon outside [0, 1], a check of the pair; a zero spread isolates density's range
    alone = {"epsilon": 0.0} if method.startswith("della") and name == "density" else {}
    if param.per_model:
        kwargs["model_parameters"] = [{name: value, **alone}] + [dict(alone) for _ in tensors[1:]]
    else:
        kwargs[name] = value
    if accepted:
        mergesmith.merge_tensors(method, base, tensors, **kwargs)
    else:
        with pytest.raises(RecipeError, match=rf"'{name}' must lie in "):
            mergesmith.merge_tensors(method, base, tensors, **kwargs)


@pytest.mark.parametrize("method, name, value, accepted",
                         [c for c in EDGE_CASES if c[0] in ("ties", "mats", "slerp", "gradient_matching")])
def test_edge_values_through_a_recipe(method, name, value, accepted):
    text = {math.inf: ".inf", -math.inf: "-.inf"}.get(value, ".nan" if value != value else repr(value))
    where = "models[0]" if get_method(method).param(name).per_model else "global"
    models = "[./a]" if method in ("slerp", "gradient_matching") else "[./a, ./b]"
    if where == "global":
        recipe = f"merge_method: {method}\nbase_model: ./base\nmodels: {models}\nparameters: {{{name}: {text}}}\n"
    else:
        recipe = (f"merge_method: {method}\nbase_model: ./base\nmodels:\n  - model: ./a\n"
                  f"    parameters: {{{name}: {text}}}\n  - ./b\n")
    if accepted:
        assert same(next(v for _, p in loads_recipe(recipe).parameter_scopes() for k, v in p.items() if k == name),
                    value)
    else:
        with pytest.raises(RecipeError, match=rf"recipe r\.yml line \d+, column \d+: .*'{name}' must lie in "):
            loads_recipe(recipe, "r.yml")


def test_range_texts():
    assert get_method("ties").param("density").range_text == "[0.0, 1.0]"
    assert get_method("mats").param("tol").range_text == "(0.0, 1.0)"
    assert get_method("mats").param("max_iters").range_text == "an integer in [1, inf)"
    assert get_method("gradient_matching").param("prior").range_text == "[0.0, inf) or 'base'"
    assert get_method("ties").param("normalize").range_text == "true or false"
    assert get_method("ties").param("weight").range_text == "(-inf, inf)"


def test_merge_tensors_stays_strict_about_types():
    """The Python API takes numbers, not strings: the reader converts a recipe's quoted numbers."""
    base, tensors = _merge_inputs("ties")
    with pytest.raises(RecipeError, match=r"'density' must be a number, got '0\.5'"):
        mergesmith.merge_tensors("ties", base, tensors, density="0.5")
    with pytest.raises(RecipeError, match=r"'max_iters' must be a whole number"):
        mergesmith.merge_tensors("mats", base, tensors, max_iters=2.5)
    assert isinstance(RecipeError("x"), MergeError)


# ---------------------------------------------------------------------------------------------------------
# Docs: every YAML block is a recipe that reads; the documented defaults parse to the registry's defaults


def doc_recipes() -> dict[str, str]:
    blocks = {}
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for i, match in enumerate(re.finditer(r"```yaml\n(.*?)```", path.read_text(), re.S)):
            blocks[f"{path.name}#{i}"] = match.group(1)
    return blocks


def test_the_docs_have_recipes():
    assert len(doc_recipes()) >= 5


@pytest.mark.parametrize("name", sorted(doc_recipes()))
def test_every_yaml_block_in_the_docs_reads(name):
    loads_recipe(doc_recipes()[name], name)


def test_the_methods_table_defaults_parse_to_the_registry_defaults():
    text = (ROOT / "docs" / "methods.md").read_text()
    table = text[:text.index("## Parameter ranges")]
    checked = 0
    for row in re.finditer(r"^\| `(\w+)` \|[^|]*\| (.*?) \|", table, re.M):
        method, cell = row.group(1), row.group(2)
        if cell.startswith("as "):
            continue
        for name, default in re.findall(r"`(\w+)`\*? \(([^)]*)\)", cell):
            token = re.split(r"[ ,]", default)[0]
            declared = get_method(method).param(name).default
            if token == "required":
                assert declared is REQUIRED, (method, name)
            else:
                assert same(value_of(token), declared) or (isinstance(declared, float) and same(
                    float(value_of(token)), declared)), (method, name, token, declared)
            checked += 1
    assert checked >= 40


def test_the_ranges_table_matches_the_registry():
    text = (ROOT / "docs" / "methods.md").read_text()
    section = text[text.index("## Parameter ranges"):]
    rows = re.findall(r"^\| `(\w+)`\*? \| ([^|]*) \| (`[^`]*`|required) \| ([^|]*) \|", section, re.M)
    assert {name for name, _, _, _ in rows} == set(RANGES)
    for name, methods, default, range_text in rows:
        named = set(re.findall(r"`(\w+)`", methods))  # a row naming methods holds for those; others for the rest
        overridden = {m for m, n in METHOD_RANGES if n == name}
        for method, p in numeric_params():
            if p.name == name and (method in named if named & overridden else method not in overridden):
                assert p.range_text == range_text.strip(), (method, name)
                if default == "required":
                    assert p.default is REQUIRED
                else:
                    assert same(float(value_of(default.strip("`"))), float(p.default)), (method, name)


# ---------------------------------------------------------------------------------------------------------
# Both readers: mergesmith and mergekit 0.1.5


# Recipes in the style of mergekit's examples (its README and examples/), with the number spellings people
# write. Hub names are fine: nothing is opened.
MERGEKIT_STYLE = {
    "ties-readme": """
models:
  - model: psmathur/orca_mini_v3_13b
    parameters:
      density: [1, 0.7, 0.1] # density gradient
      weight: 1.0
  - model: garage-bAInd/Platypus2-13B
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1] # weight gradient
  - model: WizardLM/WizardMath-13B-V1.0
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: TheBloke/Llama-2-13B-fp16
parameters:
  normalize: true
  int8_mask: true
dtype: float16
""",
    "dare-ties-exponents": """
merge_method: dare_ties
base_model: mistralai/Mistral-7B-v0.1
models:
  - model: mistralai/Mistral-7B-v0.1
  - model: samir-fama/SamirGPT-v1
    parameters: {density: 0.53, weight: 0.4}
  - model: abacusai/Slerp-CM-mist-dpo
    parameters: {density: 5.3e-1, weight: "0.3"}
  - model: EmbeddedLLM/Mistral-7B-Merge-14-v0.2
    parameters: {density: .53, weight: 3e-1}
parameters:
  int8_mask: true
  lambda: 1E0
dtype: bfloat16
""",
    "slerp-readme": """
slices:
  - sources:
      - model: OpenPipe/mistral-ft-optimized-1218
        layer_range: [0, 32]
      - model: mlabonne/NeuralHermes-2.5-Mistral-7B
        layer_range: [0, 32]
merge_method: slerp
base_model: OpenPipe/mistral-ft-optimized-1218
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: bfloat16
""",
    "slerp-per-slice": """
merge_method: slerp
base_model: ./a
slices:
  - sources:
      - {model: ./a, layer_range: [0, 16]}
      - {model: ./b, layer_range: [0, 16]}
    parameters: {t: 2.5e-1}
  - sources:
      - {model: ./a, layer_range: [16, 32]}
      - {model: ./b, layer_range: [16, 32]}
    parameters:
      t: [".25", .75]
dtype: bfloat16
""",
    "linear-quoted": """
models:
  - model: ./a
    parameters: {weight: 1.0}
  - model: ./b
    parameters: {weight: 5e-1}
  - model: ./c
    parameters: {weight: "0.25"}
merge_method: linear
parameters: {normalize: yes}
dtype: float32
""",
    "task-arithmetic-negation": """
merge_method: task_arithmetic
base_model: ./base
models:
  - model: ./math
    parameters: {weight: 1.0}
  - model: ./toxic
    parameters: {weight: -.5}
parameters: {lambda: 1_0e-1, normalize: false}
dtype: bfloat16
""",
    "breadcrumbs": """
merge_method: breadcrumbs
base_model: ./base
models:
  - model: ./a
    parameters: {weight: 0.5, density: 0.9, gamma: 1e-2}
  - model: ./b
    parameters: {weight: 0.5, density: 9e-1, gamma: "0.01"}
dtype: bfloat16
""",
    "breadcrumbs-ties-gradients": """
merge_method: breadcrumbs_ties
base_model: ./base
models:
  - model: ./a
    parameters:
      weight: [1e-1, 0.5, 1]
      density:
        - filter: self_attn
          value: [9e-1, .8]
        - value: 0.95
      gamma: 0.01
  - model: ./b
    parameters: {weight: 0.5, density: 0.9}
parameters: {normalize: true, lambda: 0.9}
dtype: bfloat16
""",
    "model-stock": """
models:
  - model: ./ft1
  - model: ./ft2
  - model: ./ft3
merge_method: model_stock
base_model: ./base
parameters: {filter_wise: false}
dtype: bfloat16
""",
    "passthrough-frankenmerge": """
slices:
  - sources:
    - model: ./a
      layer_range: [0, 24]
  - sources:
    - model: ./b
      layer_range: [8, 32]
merge_method: passthrough
dtype: bfloat16
""",
    "passthrough-scaled": """
slices:
  - sources:
      - model: ./a
        layer_range: [0, 16]
        parameters:
          scale:
            - filter: o_proj
              value: 0.0
            - filter: down_proj
              value: 0E0
            - value: 1
merge_method: passthrough
dtype: bfloat16
""",
    "nuslerp": """
merge_method: nuslerp
models:
  - model: ./a
    parameters: {weight: 0.7}
  - model: ./b
    parameters: {weight: 3e-1}
parameters: {nuslerp_flatten: false, nuslerp_row_wise: true}
""",
    "dare-linear": """
merge_method: dare_linear
base_model: ./base
models:
  - model: ./a
    parameters: {weight: +1, density: "5e-1"}
  - model: ./b
    parameters: {weight: 1_0, density: [0.2, 0.4, 6e-1]}
parameters: {normalize: true, rescale: on}
dtype: bfloat16
""",
    "numbers": """
merge_method: linear
models:
  - model: ./a
    parameters:
      weight: [1e-3, 5e2, 1E3, .5, -.5, 1_000, +1, "0.5", " 2.5 ", 1.0e+3, "1_000", 0x10, 1:30, 010]
  - model: ./b
parameters: {normalize: false}
""",
}

# Recipes mergekit accepts and mergesmith refuses, on purpose (docs/recipes.md and docs/methods.md)
DIVERGENT = {
    "bool-as-number": ("merge_method: linear\nmodels:\n  - model: ./a\n    parameters: {weight: true}\n",
                       r"'weight' must be a number, got True"),
    "number-as-bool": ("merge_method: linear\nmodels: [{model: ./a}]\nparameters: {normalize: 1}\n",
                       r"'normalize' must be true or false, got 1"),
    "string-as-bool": ("merge_method: linear\nmodels: [{model: ./a}]\nparameters: {normalize: 'true'}\n",
                       r"'normalize' must be true or false"),
    "density-above-1": ("merge_method: ties\nbase_model: ./base\nmodels:\n  - model: ./a\n"
                        "    parameters: {weight: 1, density: 1.5}\n", r"'density' must lie in"),
    "t-above-1": ("merge_method: slerp\nbase_model: ./a\nmodels: [{model: ./a}, {model: ./b}]\nparameters: {t: 1.5}\n",
                  r"'t' must lie in"),
    "nan-weight": ("merge_method: linear\nmodels:\n  - model: ./a\n    parameters: {weight: .nan}\n",
                   r"'weight' must lie in"),
    "inf-string": ("merge_method: linear\nmodels:\n  - model: ./a\n    parameters: {weight: 'inf'}\n",
                   r"'weight' must be a number"),
    "duplicate-key": ("merge_method: ties\nbase_model: ./base\nmodels:\n  - model: ./a\n"
                      "    parameters: {weight: 1, density: 0.5, density: 0.7}\n", r"duplicate key 'density'"),
}

MERGEKIT_READER = r'''
import json, sys, yaml
from pydantic import TypeAdapter
from mergekit.config import ConditionalParameter, MergeConfiguration
from mergekit.merge_methods import registry

KINDS = {"float": float, "int": int, "bool": bool}
request = json.load(sys.stdin)
results = {}
for name, item in request.items():
    try:
        config = MergeConfiguration.model_validate(yaml.safe_load(item["text"]))
    except Exception as e:
        results[name] = {"error": f"{type(e).__name__}: {e}"}
        continue
    try:
        specs = {p.name: p for p in registry.get(config.merge_method).spec.parameters}
    except RuntimeError:  # a method mergekit does not have: pydantic's conversion to the type we declare
        specs = {}

    def leaf(name, value):
        if name in specs:  # what the method resolves (mergekit/parameter_resolver.py, config.py evaluate_setting)
            return specs[name].validate(value)
        if name in item["kinds"]:
            try:
                return TypeAdapter(KINDS[item["kinds"][name]]).validate_python(value)
            except Exception:
                return value
        return value

    def plain(setting, convert):
        if isinstance(setting, ConditionalParameter):
            return {"filter": setting.filter, "value": plain(setting.value, convert)}
        if isinstance(setting, list):
            return [plain(v, convert) for v in setting]
        return convert(setting)

    def scopes(convert):
        out = {}
        def add(where, params):
            if params:
                out[where] = {k: plain(v, lambda x, k=k: convert(k, x)) for k, v in params.items()}
        add("", config.parameters)
        for i, m in enumerate(config.models or []):
            add(f"models[{i}].", m.parameters)
        for i, s in enumerate(config.slices or []):
            add(f"slices[{i}].", s.parameters)
            for j, src in enumerate(s.sources):
                add(f"slices[{i}].sources[{j}].", src.parameters)
        return out

    try:
        results[name] = {"config": scopes(lambda k, x: x), "method": scopes(leaf)}
    except Exception as e:
        results[name] = {"error": f"{type(e).__name__}: {e}"}
json.dump(results, sys.stdout)
'''


def our_values(recipe) -> dict:
    """The recipe's parameter settings as {where: {name: setting}}, conditions with an explicit filter."""
    def plain(setting):
        if isinstance(setting, dict):
            return {"filter": setting.get("filter"), "value": plain(setting["value"])}
        if isinstance(setting, list):
            return [plain(v) for v in setting]
        return setting
    return {where: {k: plain(v) for k, v in params.items()} for where, params in recipe.parameter_scopes() if params}


def declared_kinds(text: str) -> dict[str, str]:
    method = yaml.safe_load(text)["merge_method"]
    return {p.name: p.kind.__name__ for p in get_method(method).params
            if p.kind in (int, float, bool) and p.choices is None and not p.words}


def all_readable_recipes() -> dict[str, str]:
    return {**{f"docs:{k}": v for k, v in doc_recipes().items()}, **MERGEKIT_STYLE}


@pytest.mark.parametrize("name", sorted(MERGEKIT_STYLE))
def test_mergekit_style_recipes_read(name):
    loads_recipe(MERGEKIT_STYLE[name], name)


@pytest.mark.parametrize("name", sorted(DIVERGENT))
def test_divergent_recipes_are_refused(name):
    text, pattern = DIVERGENT[name]
    with pytest.raises(RecipeError, match=pattern):
        loads_recipe(text, name)


@pytest.fixture(scope="module")
def mergekit_reading() -> dict:
    if not MERGEKIT_YAML:
        pytest.skip("set MERGEKIT_YAML to a mergekit-yaml executable")
    python = Path(MERGEKIT_YAML).parent / "python"
    request = {name: {"text": text, "kinds": declared_kinds(text)}
               for name, text in {**all_readable_recipes(), **{k: v[0] for k, v in DIVERGENT.items()}}.items()}
    done = subprocess.run([str(python), "-c", MERGEKIT_READER], input=json.dumps(request), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.mark.parametrize("name", sorted(all_readable_recipes()))
def test_both_readers_give_the_same_parameter_values(mergekit_reading, name):
    """mergesmith's values equal the values mergekit's method resolves from its configuration: its
    ``ParameterSpec.validate`` of each entry (a number written ``1e-3`` is the string "1e-3" in mergekit's
    config and becomes 0.001 there), or pydantic's conversion to our declared type for a method mergekit
    does not have."""
    theirs = mergekit_reading[name]
    assert "error" not in theirs, theirs
    ours = our_values(loads_recipe(all_readable_recipes()[name], name))
    assert same(ours, theirs["method"]), f"\nours:     {ours}\nmergekit: {theirs['method']}"


def test_mergekit_keeps_exponent_numbers_as_strings_in_its_config(mergekit_reading):
    """The claim in docs/recipes.md: mergekit's configuration holds what yaml.safe_load made, its method
    converts."""
    config = mergekit_reading["numbers"]["config"]["models[0]."]["weight"]
    method = mergekit_reading["numbers"]["method"]["models[0]."]["weight"]
    assert config[:5] == ["1e-3", "5e2", "1E3", 0.5, "-.5"]
    assert config[7:9] == ["0.5", " 2.5 "] and config[11:] == [16, 90, 8]
    assert method == [0.001, 500.0, 1000.0, 0.5, -0.5, 1000.0, 1.0, 0.5, 2.5, 1000.0, 1000.0, 16.0, 90.0, 8.0]


@pytest.mark.parametrize("name", sorted(DIVERGENT))
def test_mergekit_accepts_what_we_refuse_on_purpose(mergekit_reading, name):
    assert "error" not in mergekit_reading[name], mergekit_reading[name]
