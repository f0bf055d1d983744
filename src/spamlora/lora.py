"""Low-rank adaptation (LoRA) of the Linear layers of `GPTModel`.

Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models"
(https://arxiv.org/abs/2106.09685): a frozen weight W is adapted as
``W x + (alpha / r) * B A x`` where A and B have rank ``r``. ``B`` starts at zero so
training starts from the pretrained model exactly; ``alpha / r`` scales the update so
that changing ``r`` needs little retuning of the learning rate (section 4.1). ``A`` starts
Kaiming-uniform, in one of two ways (`INITS`):

- ``reference`` (the default): as Hu et al.'s reference code (loralib) and PEFT,
  fan-in = in_dim: entries uniform in ``±1/sqrt(in_dim)``, whatever the rank, so a rank
  experiment compares capacity, not step size.
- ``textbook``: as LLMs-from-scratch does, on ``A`` stored (in_dim, r), so the fan-in
  torch sees is ``r``: entries uniform in ``±1/sqrt(r)``, ~10x larger than the reference
  at r = 8 for GPT-2 124M, and growing as ``r`` shrinks: with alpha fixed, a smaller
  rank then also changes the step size. Kept for the book's exact LoRA.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .model import GPTModel
from .presets import LORA_INITS as INITS
from .presets import TARGET_MODULES


class LoRALayer(nn.Module):
    """The low-rank update ``(alpha / rank) * dropout(x) @ A @ B``.

    Args:
        in_dim, out_dim: shape of the adapted Linear.
        rank: ``r`` of Hu et al. (2021), the rank of the update; trainable parameters
            grow as ``r * (in_dim + out_dim)``.
        alpha: ``alpha`` of Hu et al. (2021); the update is scaled by ``alpha / r``.
        dropout: dropout on the LoRA branch's input (0 disables it).
        init: how ``A`` starts: ``textbook`` (fan-in ``rank``) or ``reference`` (fan-in
            ``in_dim``, as Hu et al.'s code and PEFT); see the module docstring.
    """

    def __init__(self, in_dim: int, out_dim: int, rank: int, alpha: float,
                 dropout: float = 0.0, init: str = "reference"):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        if init not in INITS:
            raise ValueError(f"LoRA init must be one of {INITS}, got {init!r}")
        self.rank, self.alpha = rank, alpha
        self.A = nn.Parameter(torch.empty(in_dim, rank))
        # kaiming_uniform_ takes the fan-in from dim 1: `rank` for A, `in_dim` for A.T.
        nn.init.kaiming_uniform_(self.A if init == "textbook" else self.A.T, a=math.sqrt(5))
        self.B = nn.Parameter(torch.zeros(rank, out_dim))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def delta_weight(self) -> torch.Tensor:
        """The update in `nn.Linear` layout, (out_dim, in_dim)."""
        return (self.scaling * (self.A @ self.B)).T

    def down(self, x: torch.Tensor) -> torch.Tensor:
        """The scaled rank-r projection; scaling it touches r values per token, where
        scaling the output would touch out_dim."""
        return self.dropout(x) @ self.A * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(x) @ self.B

    def extra_repr(self) -> str:
        return (f"in_dim={self.A.shape[0]}, out_dim={self.B.shape[1]}, rank={self.rank}, "
                f"alpha={self.alpha:g}")


class LinearWithLoRA(nn.Module):
    """A frozen `nn.Linear` plus a `LoRALayer`. `merge()` folds the update into the
    Linear's weight for inference; `unmerge()` takes it out again."""

    def __init__(self, linear: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 init: str = "reference"):
        super().__init__()
        self.linear = linear
        self.lora = LoRALayer(linear.in_features, linear.out_features, rank, alpha, dropout,
                              init)
        self.lora.to(device=linear.weight.device, dtype=linear.weight.dtype)
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        return self.add_updates(rows, [self], self.linear(rows)).view(*x.shape[:-1], -1)

    @staticmethod
    def add_updates(x: torch.Tensor, layers: Sequence[nn.Module],
                    y: torch.Tensor) -> torch.Tensor:
        """`y`, the frozen outputs of `layers` for the same rows `x` side by side (both 2-D,
        `y` a tensor of its own, not a view), plus the update of every unmerged
        `LinearWithLoRA` among them, added in place. `model.project` calls it for Q, K and
        V: their rank-r products then run as one rank-3r product, ``x @ [A_q A_k A_v]``,
        and one GEMM with the block diagonal of the B matrices that accumulates into `y`.
        Each layer's update is exactly its own, as if called alone."""
        adapted = [isinstance(layer, LinearWithLoRA) and not layer.merged for layer in layers]
        if not any(adapted):
            return y
        loras = [layer.lora for layer, on in zip(layers, adapted, strict=True) if on]
        if len(loras) == 1:
            h = loras[0].down(x)
        elif all(isinstance(lora.dropout, nn.Identity) for lora in loras):
            scaling = torch.cat([torch.full((lora.rank,), lora.scaling, device=x.device)
                                 for lora in loras])
            h = x @ torch.cat([lora.A for lora in loras], dim=1) * scaling
        else:  # each layer draws its own dropout mask
            h = torch.cat([lora.down(x) for lora in loras], dim=-1)
        if len(layers) == 1:
            B = loras[0].B
        else:  # a layer without an update owns columns of y but no rows of B
            B = torch.block_diag(*(
                layer.lora.B if on else
                loras[0].B.new_zeros(0, getattr(layer, "linear", layer).out_features)
                for layer, on in zip(layers, adapted, strict=True)))
        # h @ B accumulated into y by the GEMM itself, in place: no extra pass over y and
        # no second buffer of its size. Autograd allows it (the product that made y does
        # not keep y), and as y is no view, its backward copies nothing. In-place ops
        # escape autocast: cast here.
        return y.addmm_(h.to(y.dtype), B.to(y.dtype))

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self._add_delta(1.0)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self._add_delta(-1.0)
            self.merged = False

    def _add_delta(self, sign: float) -> None:
        """weight += sign * delta_weight(). Where the weight has the update's dtype, as
        one GEMM accumulating into it, ``W += s B^T A^T``: adding the transposed product
        instead took 8x as long (0.24 s for GPT-2 124M's 72 layers: the start of every
        evaluate and predict)."""
        weight, lora = self.linear.weight, self.lora
        if weight.dtype == lora.A.dtype:
            weight.addmm_(lora.B.T, lora.A.T, alpha=sign * lora.scaling)
        else:
            weight += sign * lora.delta_weight().to(weight.dtype)


def replace_linear_with_lora(model: GPTModel, rank: int, alpha: float,
                             targets: list[str] | tuple[str, ...] = tuple(TARGET_MODULES),
                             dropout: float = 0.0, init: str = "reference") -> GPTModel:
    """Wrap the chosen Linears of every transformer block in `LinearWithLoRA`, in place.
    The default targets are all six (Q, K, V, attention output, both MLP layers); the
    output head is never adapted. `init`: how each ``A`` starts (`LoRALayer`)."""
    unknown = [t for t in targets if t not in TARGET_MODULES]
    if unknown:
        raise ValueError(f"unknown LoRA target(s) {unknown}; choose from "
                         f"{list(TARGET_MODULES)}")
    for block in model.trf_blocks:
        for target in targets:
            parent_path, _, child = TARGET_MODULES[target].rpartition(".")
            parent = block.get_submodule(parent_path)
            linear = parent.get_submodule(child)
            if isinstance(linear, LinearWithLoRA):
                raise ValueError(f"{TARGET_MODULES[target]} already carries LoRA")
            parent.register_module(child, LinearWithLoRA(linear, rank, alpha, dropout, init))
    return model


def lora_layers(model: nn.Module) -> list[LinearWithLoRA]:
    return [m for m in model.modules() if isinstance(m, LinearWithLoRA)]


def merge(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its Linear (inference is then as fast as the base)."""
    for layer in lora_layers(model):
        layer.merge()
    return model


def merge_for_good(model: nn.Module) -> nn.Module:
    """Every LoRA update folded into its Linear, and each `LinearWithLoRA` replaced by
    that Linear, in place: for a model that only scores, which then holds no LoRA
    parameters and cannot be unmerged. A merged wrapper only passes its input on, but
    its 72 calls in GPT-2 124M cost one message 3–7% of its scoring time
    (benchmarks/README.md)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LinearWithLoRA):
                child.merge()
                parent.register_module(name, child.linear)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    for layer in lora_layers(model):
        layer.unmerge()
    return model
