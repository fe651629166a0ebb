"""The counting rules every learner's capacity figures share: fp32 bytes, ring collectives,
optimizer state and closure evaluations per step."""

from __future__ import annotations

FP32 = 4
BF16 = 2


def weight_bytes(precision: str) -> int:
    """Bytes per weight and per gradient element: 2 with precision bf16-weights, else 4
    (bf16 autocasts the products; its weights stay fp32)."""
    return BF16 if precision == "bf16-weights" else FP32


def ring_all_reduce(ranks: int, payload: float) -> float:
    """Bytes each rank sends in a ring all-reduce of ``payload`` bytes: 2 (k-1)/k * S."""
    return 2.0 * (ranks - 1) / ranks * payload if ranks > 1 else 0.0


def ring_all_gather(ranks: int, payload: float) -> float:
    """Bytes each rank sends in a ring all-gather of a ``payload``-byte tensor: (k-1)/k * S."""
    return (ranks - 1) / ranks * payload if ranks > 1 else 0.0


def optimizer_state(optimizer, local: int, total_parameters: int) -> int:
    """Elements of optimizer state per rank: sgd 0 (momentum 0) or 1x local (momentum
    buffer); adam, adamw 2x; rmsprop 1x (+1x with momentum); adagrad 1x. lbfgs keeps its
    curvature history as flat vectors over *all* parameters, replicated (not sharded) under
    DTensor: 2 * history_size + 3 full-size vectors on every rank, plus 3 more and a copy
    of the local weights during a strong-Wolfe line search."""
    if optimizer.name == "sgd":
        return local if optimizer.momentum > 0 else 0
    if optimizer.name in ("adam", "adamw"):
        return 2 * local
    if optimizer.name == "rmsprop":
        return local * (2 if optimizer.momentum > 0 else 1)
    if optimizer.name == "adagrad":
        return local
    flat = 2 * optimizer.history_size + 3  # lbfgs
    if optimizer.line_search == "strong_wolfe":
        return (flat + 3) * total_parameters + local
    return flat * total_parameters


# torch.optim's fused kernels update a parameter in one pass; terabrain.train.optim uses them
# wherever this says they apply, so the trainer and the counts below follow one rule. DTensor
# has sharding rules for fused Adam and AdamW only (a model split over DTensors keeps the
# loop for SGD and Adagrad); RMSprop and L-BFGS have no fused kernel.
FUSED_OPTIMIZERS = ("sgd", "adam", "adamw", "adagrad")
FUSED_OVER_DTENSORS = ("adam", "adamw")


def fused_update(name: str, over_dtensors: bool = False) -> bool:
    """Whether optimizer ``name`` updates with a fused kernel (parameters all DTensors, or
    none)."""
    return name in (FUSED_OVER_DTENSORS if over_dtensors else FUSED_OPTIMIZERS)


def optimizer_transient(optimizer, largest_local: int, precision: str = "fp32",
                        over_dtensors: bool = False) -> int:
    """Elements the optimizer step allocates and frees. A fused update (:func:`fused_update`)
    allocates none. Unfused, adam, adamw, rmsprop and adagrad divide by the square root of a
    running average, a new tensor the size of the parameter (torch.optim's per-parameter
    path, so the largest parameter). Adam's denominator is two of them at once
    (``exp_avg_sq.sqrt() / bias_correction``). sgd and lbfgs: none beyond their state.
    precision bf16-weights (terabrain.train.bf16_weights): three fp32 pieces of at most
    2^22 values (weight, gradient, rounding noise), whatever the optimizer."""
    if precision == "bf16-weights":
        return 3 * min(largest_local, 1 << 22)
    if fused_update(optimizer.name, over_dtensors):
        return 0
    if optimizer.name in ("adam", "adamw"):
        return 2 * largest_local
    if optimizer.name in ("rmsprop", "adagrad"):
        return largest_local
    return 0


def evaluations_per_step(optimizer) -> int:
    """Closure evaluations per step: 1, or L-BFGS's max_iter (+1 with line search)."""
    if optimizer.name != "lbfgs":
        return 1
    return optimizer.max_iter + (1 if optimizer.line_search == "strong_wolfe" else 0)
