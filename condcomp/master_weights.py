"""bf16 matrix weights between steps, fp32 master weights in the optimizer.

Under bf16 autocast each forward casts every fp32 matrix weight to bf16 before its product, and
each backward casts the bf16 weight gradient back to fp32: two memory passes over the weights
per micro-batch, however few tokens the weights see. In an MoE layer with many experts and few
tokens per expert those passes are most of the layer's memory traffic (docs/benchmarks.md, "Step
time from 8 to 128 experts").

``train.param_dtype = "bfloat16"`` stores those weights in bf16, so the products read them as
they are, and keeps fp32 *master* copies for the optimizer (Micikevicius et al. 2018, "Mixed
Precision Training", sec. 3.1; Megatron-LM's ``main_params``): each micro-batch's bf16 weight
gradient is added into the master's fp32 gradient as soon as autograd has it, the optimizer
updates the masters, and the masters are copied back into the bf16 weights once per step.

Which weights: those whose every use is an autocast bf16 product (:func:`matrix_weights`),
so the forward and backward compute exactly what autocast computes from fp32 storage (rounding
a master to bf16 is the rounding autocast does) and the updates are the same too;
``tests/test_master_weights.py`` holds training with and without it equal. Norm gains, biases,
embedding tables and elementwise coefficients stay fp32 parameters as before.

What it moves rather than removes: once per optimizer step the copy-back and the fp32 gradient
are still a pass each over the weights. What goes is the cast per micro-batch in the forward
and the backward, so the saving grows with gradient accumulation, and a layer's forward and
backward no longer carry weight traffic in proportion to its number of experts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from condcomp.errors import ConfigError

PARAM_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def check_param_dtype(param_dtype: str, amp_dtype: torch.dtype | None, fix: str,
                      key: str = "train.param_dtype") -> None:
    """Storing weights in bf16 only makes sense where bf16 autocast would cast them."""
    if param_dtype != "float32" and amp_dtype != PARAM_DTYPES[param_dtype]:
        raise ConfigError(f"{key} = {param_dtype!r} stores the weights that "
                          f"{param_dtype} autocast would cast, but this run computes in "
                          f"{amp_dtype or 'float32'} (the CPU default): {fix}")


def matrix_weights(model: nn.Module) -> list[nn.Parameter]:
    """The parameters used only as operands of matrix products, which autocast runs in bf16.

    ``nn.Linear`` weights (unless tied to an embedding table, which a lookup also reads) and the
    parameters a module names in its ``MATRIX_WEIGHTS`` class attribute (stacked expert
    weights, a plain MLP's, Mixture of Tokens' controller). In ``model.parameters()`` order.
    """
    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    chosen: dict[int, nn.Parameter] = {}
    for module in model.modules():
        names = ("weight",) if isinstance(module, nn.Linear) else getattr(
            module, "MATRIX_WEIGHTS", ())
        for name in names:
            p = getattr(module, name, None)
            if isinstance(p, nn.Parameter) and p.requires_grad and id(p) not in tables:
                chosen[id(p)] = p
    return [p for p in model.parameters() if id(p) in chosen]


def master_weights_for(model: nn.Module, param_dtype: str) -> MasterWeights | None:
    """Master weights for ``model`` when ``param_dtype`` (``train.param_dtype``) asks for
    low-precision storage, else None (the weights stay fp32 parameters)."""
    if PARAM_DTYPES[param_dtype] == torch.float32:
        return None
    return MasterWeights(model, PARAM_DTYPES[param_dtype])


class MasterWeights:
    """bf16 storage for a model's matrix weights, with fp32 masters for the optimizer.

    Build it after the fp32 weights are final (initialised, or loaded from a checkpoint) and
    before the optimizer, which must be given :meth:`optimizer_params`. After every
    ``optimizer.step()`` call :meth:`copy_to_model`; save checkpoints inside
    :meth:`full_precision` so that they hold the fp32 masters.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> None:
        self.model = model
        self.weights = matrix_weights(model)
        self.masters: list[nn.Parameter] = []
        self._low: list[torch.Tensor] = []
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        for p in self.weights:
            if p.dtype != torch.float32:
                raise ConfigError(f"master weights need fp32 parameters; found {p.dtype}")
            master = nn.Parameter(p.detach().clone())
            # Attributes a layer set, such as no_weight_decay (not torch's own, e.g. hooks).
            master.__dict__.update({k: v for k, v in p.__dict__.items() if not k.startswith("_")})
            self.masters.append(master)
            p.data = p.data.to(dtype)
            self._low.append(p.data)
            self._hooks.append(p.register_post_accumulate_grad_hook(self._accumulate_into(master)))

    @staticmethod
    def _accumulate_into(master: nn.Parameter):
        def hook(p: torch.Tensor) -> None:
            # Micro-batches accumulate in fp32, as autocast's fp32 gradients would.
            if master.grad is None:
                master.grad = p.grad.to(torch.float32)
            else:
                master.grad.add_(p.grad)
            p.grad = None

        return hook

    def hook_bytes(self) -> int:
        """Bytes the gradient hooks move in a step's first micro-batch, outside any compiled
        graph: each weight's bf16 gradient read (2 bytes) and written into its fp32 master's
        gradient (4). For ``condcomp bench ... --count-bytes``, whose count sees only the
        compiled graphs."""
        return 6 * sum(m.numel() for m in self.masters)

    def optimizer_params(self) -> list[nn.Parameter]:
        """``model.parameters()`` with each matrix weight replaced by its master."""
        swap = {id(p): m for p, m in zip(self.weights, self.masters)}
        return [swap.get(id(p), p) for p in self.model.parameters()]

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for low, master in zip(self._low, self.masters):
            low.copy_(master)

    def _point_model_at_masters(self) -> None:
        for p, master in zip(self.weights, self.masters):
            p.data = master.data

    def close(self) -> None:
        """Give the model its fp32 weights back (the masters) and remove the gradient hooks."""
        self._point_model_at_masters()
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    @contextlib.contextmanager
    def full_precision(self) -> Iterator[None]:
        """The model holds the fp32 masters inside the block (to save or export it)."""
        self._point_model_at_masters()
        try:
            yield
        finally:
            for p, low in zip(self.weights, self._low):
                p.data = low
