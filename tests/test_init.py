"""Initialisation by hidden unit: any split of the hidden units gives the same values."""

import pytest
import torch

from terabrain.nn.autoencoder import RICA, Autoencoder, SupervisedHead
from terabrain.nn.init import UNITS_PER_BLOCK, init_by_unit_


@pytest.mark.parametrize("unit_dim", [0, 1])
@pytest.mark.parametrize("pieces", [2, 3, 5])
def test_slices_initialised_separately_equal_the_whole(unit_dim, pieces):
    units = 2 * UNITS_PER_BLOCK + 37  # crosses block boundaries unevenly
    shape = (units, 7) if unit_dim == 0 else (7, units)
    whole = init_by_unit_(torch.empty(shape), unit_dim, 0, seed=3, salt=1, distribution="uniform", scale=0.5)
    bounds = torch.linspace(0, units, pieces + 1).round().long().tolist()
    parts = []
    for start, stop in zip(bounds, bounds[1:]):
        part_shape = list(shape)
        part_shape[unit_dim] = stop - start
        parts.append(init_by_unit_(torch.empty(part_shape), unit_dim, start, 3, 1, "uniform", 0.5))
    assert torch.equal(torch.cat(parts, dim=unit_dim), whole)
    assert whole.abs().max() <= 0.5 and whole.std() > 0.2


def test_seed_and_parameter_give_different_streams():
    a = init_by_unit_(torch.empty(4, 4), 0, 0, 1, 1, "normal", 1.0)
    assert not torch.equal(a, init_by_unit_(torch.empty(4, 4), 0, 0, 2, 1, "normal", 1.0))
    assert not torch.equal(a, init_by_unit_(torch.empty(4, 4), 0, 0, 1, 2, "normal", 1.0))


def test_models_with_the_same_seed_are_identical_and_meta_build_allocates_nothing():
    for make in (lambda: RICA(10, 6, seed=4), lambda: Autoencoder(10, 6, tied=False, seed=4),
                 lambda: SupervisedHead(Autoencoder(10, 6, seed=4), 6, 3, seed=5)):
        a, b = make(), make()
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
        with torch.device("meta"):
            ghost = make()
        assert all(p.device.type == "meta" for p in ghost.parameters())
    rica = RICA(10, 6, seed=4)
    assert torch.allclose(rica.weight.norm(dim=1), torch.ones(6))
