"""Per-example squared gradients, Σ_n w_n (∂ log p(y_n|x_n) / ∂θ)², from one batched backward pass.

A parameter's per-example gradient is a function of what its module saw: for a Linear layer it is
Σ_t g_{n,t} a_{n,t}ᵀ over example n's rows (inputs a, gradients g of the outputs), for an embedding the
output gradients summed into the rows of the example's token ids, for anything else (norms) the module's
own vector-Jacobian product, vectorised over examples with ``torch.func``. Forward hooks record each call's
inputs; a gradient hook on its output forms the per-example gradients as the backward pass reaches it, and
squares them right away unless the parameter is used again in the batch (tied embeddings, a module called
twice), in which case its uses are summed per example first.

The result is exact whenever examples do not interact inside the model, which holds for transformers in
eval mode. Parameters the hooks cannot account for (used outside their module's forward, or in modules the
rules above do not cover) are found on the first batch — the per-example gradients of each parameter
must add up to its batch gradient — and measured with one backward pass per example instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

LogLikelihood = Callable[[nn.Module, Mapping[str, Tensor]], Tensor]


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"  # GPT-2's transposed Linear, y = x W + b


def linear_example_gradients(module: nn.Module, x: Tensor, g: Tensor) -> dict[str, Tensor]:
    """Per-example gradients of a Linear (or Conv1D) layer's parameters from its input ``x`` (n, ..., in) and
    output gradient ``g`` (n, ..., out): weight (n, *weight.shape), bias (n, out)."""
    x = x.reshape(x.shape[0], -1, x.shape[-1])  # (n, rows, in)
    g = g.reshape(g.shape[0], -1, g.shape[-1])  # (n, rows, out)
    weight = torch.bmm(x.transpose(1, 2), g) if _is_conv1d(module) else torch.bmm(g.transpose(1, 2), x)
    grads = {"weight": weight}
    if module.bias is not None:
        grads["bias"] = g.sum(dim=1)
    return grads


def embedding_example_rows(ids: Tensor, g: Tensor, num_rows: int, padding_idx: int | None
                           ) -> tuple[Tensor, Tensor, Tensor]:
    """Per-example gradient of an embedding table, sparsely: (example index, row index, gradient row) for
    every distinct (example, token id) pair; repeated ids within an example are summed."""
    n = ids.shape[0]
    ids = ids.reshape(n, -1)
    g = g.reshape(n, ids.shape[1], -1)
    keys = (torch.arange(n, device=ids.device)[:, None] * num_rows + ids).reshape(-1)
    rows = g.reshape(-1, g.shape[-1])
    if padding_idx is not None:  # the padding row never receives a gradient
        keep = ids.reshape(-1) != padding_idx
        keys, rows = keys[keep], rows[keep]
    unique, inverse = torch.unique(keys, return_inverse=True)
    summed = rows.new_zeros(unique.shape[0], rows.shape[1]).index_add_(0, inverse, rows)
    return unique // num_rows, unique % num_rows, summed


def module_example_gradients(module: nn.Module, names: list[str], x: Tensor, g: Tensor) -> dict[str, Tensor]:
    """Per-example gradients of any module's own parameters: the vector-Jacobian product of one example's
    output gradient through the module, vmapped over examples."""
    from torch.func import functional_call, grad, vmap

    def contribution(params: dict[str, Tensor], x_n: Tensor, g_n: Tensor) -> Tensor:
        return (functional_call(module, params, (x_n.unsqueeze(0),)) * g_n.unsqueeze(0)).sum()

    params = {name: getattr(module, name).detach() for name in names}
    return vmap(grad(contribution), in_dims=(None, 0, 0))(params, x.detach(), g.detach())


@dataclass
class _Use:
    """What a parameter has received so far in this batch."""

    expected: int = 0  # calls in the forward pass
    received: int = 0
    dense: Tensor | None = None  # (n, *shape): sum of per-example gradients over the uses so far
    sparse: list[tuple[Tensor, Tensor, Tensor]] = field(default_factory=list)


class PerExampleSquares:
    """Hooks on ``model`` that turn one backward pass of Σ_n log p(y_n|x_n) into Σ_n w_n (per-example
    gradient)² for every parameter they cover. Use ``run`` once per batch."""

    def __init__(self, model: nn.Module, chunk_size: int | None = None):
        self.model = model
        self.chunk_size = chunk_size
        self.names = {id(p): name for name, p in model.named_parameters() if p.requires_grad}
        self.params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        self.rules: dict[nn.Module, str] = {}  # modules owning trainable parameters -> how to differentiate them
        self.uncovered: set[str] = set()
        for module in model.modules():
            own = [self.names[id(p)] for p in module.parameters(recurse=False) if id(p) in self.names]
            if not own:
                continue
            if isinstance(module, nn.Linear) or _is_conv1d(module):
                self.rules[module] = "linear"
            elif isinstance(module, nn.Embedding) and not module.scale_grad_by_freq and module.max_norm is None:
                self.rules[module] = "embedding"
            elif next(module.children(), None) is None:
                self.rules[module] = "module"
            else:  # parameters of a container module are used in its own code: not covered
                self.uncovered.update(own)
        self.verified = False

    def run(self, batch: Mapping[str, Tensor], log_likelihood: LogLikelihood,
            weights: Tensor | None) -> dict[str, Tensor]:
        """Σ_n w_n g_n² for the covered parameters over one batch (w_n = 1 when ``weights`` is None)."""
        state = _BatchState(self, weights, _examples(batch))
        handles = [module.register_forward_hook(state.forward_hook(module), with_kwargs=True)
                   for module in self.rules]
        try:
            total = log_likelihood(self.model, batch).sum()
        finally:
            for handle in handles:
                handle.remove()
        roots = state.roots + [p for name, p in self.params.items() if name in self.uncovered]
        # on the first batch the same backward pass also gives the batch gradients the check needs
        checked = [] if self.verified else [(n, p) for n, p in self.params.items() if n not in self.uncovered]
        if roots or checked:
            grads = torch.autograd.grad(total, roots + [p for _, p in checked], allow_unused=True)
        state.finish()
        if checked:
            self._verify(state, checked, grads[len(roots):])
        self.verified = True
        return {name: s for name, s in state.squares.items() if name not in self.uncovered}

    def _verify(self, state: _BatchState, params: list[tuple[str, Tensor]], batch_grads: tuple) -> None:
        """On the first batch, check that each covered parameter's per-example gradients add up to its batch
        gradient; a parameter used where the hooks do not see it fails this and is measured by the loop."""
        norms = [0.0 if g is None else float(torch.linalg.vector_norm(g)) for g in batch_grads]
        # rounding error of the whole model's gradient: a parameter the loss barely touches (a key bias
        # under softmax) has a batch gradient of pure rounding noise and must not count as a mismatch
        noise = 1e-6 * max(norms, default=0.0)
        missing = set()
        for (name, p), expected, norm in zip(params, batch_grads, norms):
            got = state.sums.get(name, torch.zeros_like(p))
            expected = torch.zeros_like(p) if expected is None else expected
            error = float(torch.linalg.vector_norm(got - expected))
            if error > 1e-4 * (norm + float(torch.linalg.vector_norm(got))) + noise:
                missing.add(name)
        self.uncovered |= missing


class _BatchState:
    def __init__(self, squares_of: PerExampleSquares, weights: Tensor | None, examples: int):
        self.of = squares_of
        self.examples = examples
        self.weights = weights
        self.uses: dict[str, _Use] = {}
        self.squares: dict[str, Tensor] = {}
        self.sums: dict[str, Tensor] = {}  # Σ_n per-example gradient, kept on the first batch to verify
        self.roots: list[Tensor] = []  # outputs whose inputs need no gradient: where the backward pass stops
        self.closed = False

    def forward_hook(self, module: nn.Module):
        names = [(self.of.names[id(p)], local) for local, p in module.named_parameters(recurse=False)
                 if id(p) in self.of.names and self.of.names[id(p)] not in self.of.uncovered]
        rule = self.of.rules[module]

        def hook(_module, args, kwargs, output):
            if not names or not isinstance(output, Tensor) or not output.requires_grad:
                return None
            if not args or not isinstance(args[0], Tensor) or (rule == "module" and (len(args) > 1 or kwargs)):
                self.of.uncovered.update(name for name, _ in names)  # an input the rules do not understand
                return None
            x = args[0].detach()
            if output.shape[0] != self.examples:
                if output.shape[0] != 1 or x.shape[0] != 1:
                    self.of.uncovered.update(name for name, _ in names)
                    return None
                # one output broadcast over the batch (position embeddings of shape (1, tokens, width)): hand
                # each example its own view, so that the gradient arriving here is per example
                output = output.expand(self.examples, *output.shape[1:])
                x = x.expand(self.examples, *x.shape[1:])
            for name, _ in names:
                self.uses.setdefault(name, _Use()).expected += 1
            if not args[0].requires_grad:
                self.roots.append(output)
            output.register_hook(lambda g: self._on_gradient(module, rule, names, x, g))
            return output

        return hook

    def _on_gradient(self, module: nn.Module, rule: str, names: list[tuple[str, str]], x: Tensor, g: Tensor) -> None:
        if self.closed:
            return
        g = g.detach()
        if rule == "embedding":
            example, row, values = embedding_example_rows(x, g, module.num_embeddings, module.padding_idx)
            self._receive(names[0][0], sparse=(example, row, values))
            return
        n = g.shape[0]
        step = self.of.chunk_size or n
        for start in range(0, n, step):
            xs, gs = x[start:start + step], g[start:start + step]
            if rule == "linear":
                grads = linear_example_gradients(module, xs, gs)
            else:
                grads = module_example_gradients(module, [local for _, local in names], xs, gs)
            for name, local in names:
                self._receive(name, dense=grads[local], start=start, n=n, last=start + step >= n)

    def _receive(self, name: str, *, dense: Tensor | None = None, sparse: tuple[Tensor, Tensor, Tensor] | None = None,
                 start: int = 0, n: int = 0, last: bool = True) -> None:
        use = self.uses[name]
        if use.expected == 1 and dense is not None:  # the only use: square this chunk now
            if not self.of.verified:
                self._add_sum(name, dense.sum(0))
            self._add_squares(name, dense, start)
            use.received += last
            return
        if sparse is not None:
            use.sparse.append(sparse)
        else:
            if use.dense is None:
                use.dense = dense.new_zeros((n, *dense.shape[1:]))
            use.dense[start:start + dense.shape[0]] += dense
        use.received += last
        if use.received == use.expected:
            self._complete(name, use)

    def _complete(self, name: str, use: _Use) -> None:
        """All uses of a parameter have arrived: sum them per example, then square."""
        if use.dense is None:  # sparse only: merge the (example, row) entries of every use
            example, row, values = (torch.cat(parts) for parts in zip(*use.sparse))
            shape = self.of.params[name].shape
            key = example * shape[0] + row
            unique, inverse = torch.unique(key, return_inverse=True)
            values = values.new_zeros(unique.shape[0], values.shape[1]).index_add_(0, inverse, values)
            example, row = unique // shape[0], unique % shape[0]
            weights = self._weights(values)
            squares = values.square() if weights is None else values.square() * weights[example, None]
            self._accumulate(name, torch.zeros(shape, dtype=values.dtype, device=values.device)
                             .index_add_(0, row, squares))
            if not self.of.verified:
                self._add_sum(name, torch.zeros(shape, dtype=values.dtype, device=values.device)
                              .index_add_(0, row, values))
        else:
            for example, row, values in use.sparse:
                use.dense.index_put_((example, row), values, accumulate=True)
            if not self.of.verified:
                self._add_sum(name, use.dense.sum(0))
            self._add_squares(name, use.dense, 0)
        use.dense, use.sparse = None, []

    def _weights(self, like: Tensor) -> Tensor | None:
        return None if self.weights is None else self.weights.to(like)

    def _add_squares(self, name: str, grads: Tensor, start: int) -> None:
        """Add Σ_n w_n grads_n² (``grads`` are per-example gradients of examples start, start + 1, ...);
        ``grads`` is scratch and gets overwritten."""
        weights = self._weights(grads)
        squares = grads.square_()
        if weights is None:
            self._accumulate(name, squares.sum(0))
        else:
            self._accumulate(name, torch.tensordot(weights[start:start + grads.shape[0]], squares, dims=1))

    def _accumulate(self, name: str, squares: Tensor) -> None:
        if name in self.squares:
            self.squares[name] += squares
        else:
            self.squares[name] = squares

    def _add_sum(self, name: str, total: Tensor) -> None:
        self.sums[name] = self.sums[name] + total if name in self.sums else total

    def finish(self) -> None:
        incomplete = [name for name, use in self.uses.items() if use.received < use.expected]
        # a use whose output gradient never arrived does not affect the log-likelihood: its gradient is zero
        for name in incomplete:
            use = self.uses[name]
            if use.dense is not None or use.sparse:
                self._complete(name, use)
        self.closed = True


def _examples(batch: Mapping[str, Tensor]) -> int:
    return next(v.shape[0] for v in batch.values() if isinstance(v, Tensor) and v.dim() > 0)
