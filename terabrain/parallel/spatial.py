"""Spatial model parallelism for locally connected layers: Coates et al. 2013's "distributed array".

A locally connected layer's ``Ho`` output rows are split into contiguous blocks, one per rank
of the model axis; each rank holds the filters of its rows' locations only (no weight is
ever replicated or summed across ranks). Its input arrives split by rows too. A block of
output rows reads input rows ``[r0 s, (r1 - 1) s + k)``: the rows it owns plus, for
overlapping fields (``k > s``), a *halo* of ``k - s`` rows owned by the next rank(s). Each
rank receives exactly those rows from their owners by point-to-point messages (no
collective, no full input anywhere); the backward pass sends the halo's gradient back to
the owner, which adds it to its own. ``transpose`` (the reconstruction) runs the same
exchange the other way round: each rank's fields write into the halo rows too, and those
partial sums go to the rows' owners.

The layout math lives in pure functions (``row_partition``, ``halo_bytes``, in
terabrain/parallel/halo.py with the exchange itself) so a planner can count rows and bytes
without a process group; this module is that API, plus ``rows_of_parameter`` (a layer's
slice of rows, created where it lives). The plan that applies it to a network is
``terabrain.parallel.spatial_network.partition_network``: each local layer becomes this
rank's block of rows, and each pooling and ``LocalContrastNorm`` step (Ni et al. 2015 normalises
after every layer) its row-split version (terabrain/parallel/row_split.py) on the rows the
layers hand on; the model code is unchanged.

Per layer and forward pass a rank receives ``N C W (k - s)`` values (one halo) and sends as
many, against ``N C W H / P`` values of its own input; the backward pass moves the same
amount back. For Ni et al. 2015's first layer (k 16, s 4) that is 12 input rows per block.
"""

from __future__ import annotations

from typing import Optional

import torch

from terabrain.nn.local import LocallyConnected2d
from terabrain.parallel.halo import (  # noqa: F401  (re-exported: the spatial plan's API)
    RowBlock, Rows, exchange_plan, gather_halo, gather_rows, halo_bytes, row_partition,
    scatter_add_halo, scatter_rows, split_evenly, split_rows, tiled_height,
)


def rows_of_parameter(layer: LocallyConnected2d, name: str, first: int, count: int,
                       device: Optional[torch.device]) -> torch.Tensor:
    """The slice of ``layer``'s parameter along its row dimension: copied from a real
    parameter, or created and initialised here for a layer built on the meta device (the
    values equal the whole layer's)."""
    parameter = getattr(layer, name)
    dim = layer.row_dims[name]
    if parameter.device.type != "meta":
        local = parameter.detach().narrow(dim, first, count).clone()
        return local.to(device) if device is not None else local
    shape = list(parameter.shape)
    shape[dim] = count
    local = torch.empty(shape, dtype=parameter.dtype, device=device or torch.device("cpu"))
    layer.init_parameter_(name, local, first)
    return local
