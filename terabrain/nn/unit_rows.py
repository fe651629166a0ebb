"""Unit-norm rows: each hidden unit's filter (the weight's last dimension) divided by its
Euclidean norm. RICA and the sparse autoencoders keep their weights on this constraint;
every layer and every split plan normalises through these two functions, so a split layer's
rows are bit-identical to one process's.

A zero row stays zero: its norm is clamped from below at ``EPS`` before dividing.
"""

from __future__ import annotations

import torch

EPS = 1e-12


def unit_rows(weight: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``weight`` with every row (along ``dim``) scaled to unit norm (a new tensor, so the
    division is part of the graph)."""
    return weight / weight.norm(dim=dim, keepdim=True).clamp_min(EPS)


@torch.no_grad()
def normalize_rows_(weight: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Scale every row of ``weight`` (along ``dim``) to unit norm, in place."""
    return weight.div_(weight.norm(dim=dim, keepdim=True).clamp_min(EPS))
