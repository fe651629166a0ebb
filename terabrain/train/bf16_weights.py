"""``precision: bf16-weights``: weights and gradients in bf16, optimizer state in fp32, and
every update rounded stochastically into the bf16 weight (docs/design.md says why there is
no fp32 master copy).

``StochasticRoundingOptimizer`` is SGD (momentum, Nesterov, weight decay) or Adam/AdamW
with torch.optim's update rules and state names (``momentum_buffer``, ``exp_avg``,
``exp_avg_sq``, ``step``), so checkpoints (terabrain.train.optim) read its state as they
read torch's. Per parameter and per piece of ``CHUNK`` values it takes the bf16 weight and
gradient to fp32, updates the fp32 state, and writes ``round(w + update)`` back: rounded up
with probability equal to the remainder's share of the bf16 step, so the expected weight is
the exact fp32 one and updates smaller than half a bf16 step still move it on average.
Transients: two fp32 pieces, whatever the parameter's size. An fp32 parameter (a
supervised head) is updated the same way without rounding.

Rounding draws from a generator seeded by (seed, parameter, step): a resumed run draws the
same numbers, so it continues exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch.distributed.tensor import DTensor

CHUNK = 1 << 22  # values per piece: 16 MB of fp32 per transient


def stochastic_round_(values: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``values`` (fp32, modified) rounded to bf16: towards zero or away from it, away with
    probability (the dropped 16 bits) / 2^16, so unbiased. Returned in bf16 (exact)."""
    bits = values.view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, generator=generator,
                          device=bits.device)
    # fp32 is sign and magnitude: adding to the bit pattern grows the magnitude, and
    # clearing the low 16 bits truncates it towards zero.
    bits.add_(noise).bitwise_and_(-65536)
    return values.to(torch.bfloat16)


class StochasticRoundingOptimizer(torch.optim.Optimizer):
    """``kind`` sgd, adam or adamw over bf16 (or fp32) parameters with fp32 state."""

    def __init__(self, params: Iterable[torch.nn.Parameter], kind: str, *, lr: float,
                 momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, seed: int = 0):
        if kind not in ("sgd", "adam", "adamw"):
            raise ValueError(f"bf16-weights: optimizer {kind!r}; allowed: sgd, adam, adamw")
        defaults = {"lr": lr, "momentum": momentum, "nesterov": nesterov, "weight_decay": weight_decay,
                        "betas": tuple(betas), "eps": eps}
        super().__init__(params, defaults)
        self.kind, self.seed = kind, seed

    def _state(self, param: torch.nn.Parameter, group: dict) -> dict:
        state = self.state[param]
        if not state:
            state["step"] = torch.tensor(0.0)
            # Shaped and placed like the parameter (a DTensor's state is sharded like it).
            zeros = lambda: torch.zeros_like(param, dtype=torch.float32)
            if self.kind == "sgd" and group["momentum"] > 0:
                state["momentum_buffer"] = zeros()
            elif self.kind != "sgd":
                state["exp_avg"], state["exp_avg_sq"] = zeros(), zeros()
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = 0
        for group in self.param_groups:
            for param in group["params"]:
                index += 1
                if param.grad is None:
                    continue
                state = self._state(param, group)
                state["step"] += 1
                step = int(state["step"])
                generator = torch.Generator(device=_local(param).device).manual_seed(
                    (self.seed * 1_000_003 + index) * 1_000_003 + step)
                self._update(param, state, group, step, generator)
        return loss

    def _update(self, param, state, group, step: int, generator: torch.Generator) -> None:
        weight, grad = _local(param).view(-1), _local(param.grad).view(-1)
        lr, decay = group["lr"], group["weight_decay"]
        buffers = {key: _local(value).view(-1) for key, value in state.items()
                   if key in ("momentum_buffer", "exp_avg", "exp_avg_sq")}
        for start in range(0, weight.numel(), CHUNK):
            piece = slice(start, start + CHUNK)
            w, g = weight[piece].float(), grad[piece].float()
            if self.kind == "sgd":
                if decay:
                    g.add_(w, alpha=decay)
                if "momentum_buffer" in buffers:
                    buf = buffers["momentum_buffer"][piece]
                    # torch.optim.SGD starts the buffer at the first gradient: 0 * m + g.
                    buf.mul_(group["momentum"]).add_(g)
                    g = g.add_(buf, alpha=group["momentum"]) if group["nesterov"] else buf
                w.add_(g, alpha=-lr)
            else:
                beta1, beta2 = group["betas"]
                if self.kind == "adamw":
                    w.mul_(1 - lr * decay)
                elif decay:
                    g.add_(w, alpha=decay)
                exp_avg, exp_avg_sq = buffers["exp_avg"][piece], buffers["exp_avg_sq"][piece]
                exp_avg.lerp_(g, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                correction1, correction2 = 1 - beta1 ** step, 1 - beta2 ** step
                denominator = g.copy_(exp_avg_sq).sqrt_().div_(math.sqrt(correction2)).add_(group["eps"])
                w.addcdiv_(exp_avg, denominator, value=-lr / correction1)
            if param.dtype == torch.bfloat16:
                weight[piece].copy_(stochastic_round_(w, generator))
            else:
                weight[piece].copy_(w)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's values of a (possibly DTensor) parameter, gradient or state: updates are
    elementwise, so each rank updates its own shard."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor
