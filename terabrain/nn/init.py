"""Initialisation by hidden unit: each hidden unit's weights are a function of (seed, unit
index) alone, drawn in blocks of ``UNITS_PER_BLOCK`` units from a generator seeded by
(seed, block).

Why: a model split across ranks by hidden unit can then initialise each rank's shard where
it lives, without ever building the full matrix (tens of GB for the seed-001 autoencoders),
and get exactly the values a single process would. The model does not need to know that it
is split: it only says, per parameter, along which dimension its hidden units lie.
"""

from __future__ import annotations

from typing import Literal

import torch

UNITS_PER_BLOCK = 256

Distribution = Literal["normal", "uniform"]


def _block_generator(seed: int, salt: int, block: int) -> torch.Generator:
    # Distinct streams per (seed, parameter, block); large odd multipliers avoid overlaps.
    return torch.Generator().manual_seed((seed * 1_000_003 + salt * 7_919 + block) % (2**63))


@torch.no_grad()
def init_by_unit_(
    tensor: torch.Tensor,
    unit_dim: int,
    first_unit: int,
    seed: int,
    salt: int,
    distribution: Distribution,
    scale: float,
) -> torch.Tensor:
    """Fill ``tensor`` (hidden units ``first_unit, first_unit + 1, ...`` along ``unit_dim``)
    with N(0, scale^2) or U(-scale, scale) values that depend only on (seed, salt, unit)."""
    count = tensor.shape[unit_dim]
    block_shape = list(tensor.shape)
    block_shape[unit_dim] = UNITS_PER_BLOCK
    unit = first_unit
    while unit < first_unit + count:
        block, within = divmod(unit, UNITS_PER_BLOCK)
        take = min(UNITS_PER_BLOCK - within, first_unit + count - unit)
        generator = _block_generator(seed, salt, block)
        if distribution == "normal":
            values = torch.randn(block_shape, generator=generator) * scale
        else:
            values = (torch.rand(block_shape, generator=generator) * 2 - 1) * scale
        tensor.narrow(unit_dim, unit - first_unit, take).copy_(values.narrow(unit_dim, within, take))
        unit += take
    return tensor
