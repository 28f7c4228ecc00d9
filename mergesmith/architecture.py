"""What a tensor's name says about its place in the architecture: its layer, and whether it is a task head
or an embedding. One place for these name patterns, which planning and reporting share."""

from __future__ import annotations

import re

# A layer tensor: "<stack>.<index>.<rest>", e.g. model.layers.3.mlp.up_proj.weight or transformer.h.0.attn.c_attn.weight
LAYER_NAME = re.compile(r"^(?P<stack>(?:.*?\.)?(?:layers|layer|h|blocks|block))\.(?P<index>\d+)\.(?P<rest>.+)$")
# Task heads (classifiers, LM heads): the tensors a recipe's ``heads`` policy applies to, by name prefix.
HEAD_PREFIXES = ("classifier", "score", "lm_head", "qa_outputs", "cls")
EMBEDDING_HINTS = ("embed", "wte", "wpe", "word_embeddings", "position_embeddings", "token_type_embeddings")

def is_head(name: str, prefixes: list[str] | tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def split_layer_name(name: str) -> tuple[str, int, str] | None:
    match = LAYER_NAME.match(name)
    return (match["stack"], int(match["index"]), match["rest"]) if match else None
