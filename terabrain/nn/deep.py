"""Deep unsupervised networks: a stack of RICA layers on images, each followed by optional
pooling and local contrast normalization (Ni et al. 2015's 3-layer network, the 9-layer network
of Le et al. 2012, the COTS-HPC networks of Coates et al. 2013).

A layer is one of
- local: untied locally connected filters (terabrain.nn.local), as in Ni et al. 2015 and Coates et al. 2013;
- conv: the same filters shared over positions (torch's conv2d);
- dense: fully connected on the flattened input.
Every layer is RICA (Ni et al. 2015, eq. 1): codes ``alpha W x`` with W's rows (one per hidden
unit) of unit norm, reconstruction ``D^T codes + b`` with ``D = W`` (tied) or a separate
decoder (untied, as Le et al.). Nothing here knows how it is trained (terabrain.learners.
layerwise) or split over ranks (terabrain.parallel).
"""

from __future__ import annotations

from typing import Any, Optional, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from terabrain.nn.autoencoder import UnitInitialized, _draw_seed
from terabrain.nn.filter_maps import ConvMap, DenseMap, LocalMap
from terabrain.nn.init import init_by_unit_
from terabrain.nn.local import LocallyConnected2d
from terabrain.nn.normalization import LocalContrastNorm
from terabrain.nn.pooling import L2Pool2d
from terabrain.nn.shared_weight import unit_row_map_codes, unit_row_map_pair
from terabrain.nn.unit_rows import normalize_rows_, unit_rows

Shape = tuple[int, int, int]  # (channels, height, width)


class LayerSpec(Protocol):
    """What one layer is built from: the attributes read here (terabrain.config's
    LayerConfig has them; nn does not import the config). ``pool`` is None or has
    ``kind``, ``kernel``, ``stride``; ``lcn`` is None or has ``kernel``, ``sigma``."""

    kind: str  # local, conv or dense
    maps: int
    kernel: int
    stride: int
    tied: bool
    padding_sides: tuple[int, int]
    pool: Any
    lcn: Any


class FilterBank(nn.Module):
    """One layer's filters (``weight``, whose last dimension is one hidden unit's filter)
    and the geometry of their linear map (``fmap``, terabrain.nn.filter_maps: the map, its
    adjoint and its weight gradient). Each bank initialises its own rows from its own
    seed, hidden unit by hidden unit (terabrain.nn.init)."""

    weight: nn.Parameter
    out_shape: Shape
    seed: int
    fmap: LocalMap | ConvMap | DenseMap

    @torch.no_grad()
    def init_rows_(self, tensor: torch.Tensor, first_unit: int = 0) -> None:
        """Fill ``tensor`` with the rows of hidden units ``first_unit, ...``: the values the
        whole bank has there, wherever the rows are created (a split plan's shard)."""
        init_by_unit_(tensor, 0, first_unit, self.seed, 5, "normal", 1.0)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.weight.device.type != "meta":
            self.init_rows_(self.weight.data)


class LocalBank(FilterBank):
    def __init__(self, in_shape: Shape, maps: int, kernel: int, stride: int, seed: int):
        super().__init__()
        channels, height, width = in_shape
        self.layer = LocallyConnected2d(channels, maps, (height, width), kernel, stride, seed=seed)
        self.seed = self.layer.init_seed
        self.out_shape = (maps, *self.layer.output_size)
        self.fmap = LocalMap(kernel, stride, (height, width), self.layer.block_bytes)

    def reset_parameters(self) -> None:
        self.layer.reset_parameters()

    @property
    def weight(self) -> nn.Parameter:  # registered once, in the layer (state_dict keys unique)
        return self.layer.weight



class ConvBank(FilterBank):
    def __init__(self, in_shape: Shape, maps: int, kernel: int, stride: int, seed: int):
        super().__init__()
        channels, height, width = in_shape
        if kernel > min(height, width):
            raise ValueError(f"kernel {kernel} is larger than the input {height}x{width}")
        self.kernel, self.stride, self.in_shape, self.seed = kernel, stride, in_shape, seed
        self.weight = nn.Parameter(torch.empty(maps, channels * kernel * kernel))
        self.reset_parameters()
        self.out_shape = (maps, (height - kernel) // stride + 1, (width - kernel) // stride + 1)
        self.fmap = ConvMap(kernel, stride, in_shape)  # rows in (kh, kw, C) order


class DenseBank(FilterBank):
    def __init__(self, in_shape: Shape, maps: int, seed: int):
        super().__init__()
        self.in_shape, self.seed = in_shape, seed
        self.weight = nn.Parameter(torch.empty(maps, in_shape[0] * in_shape[1] * in_shape[2]))
        self.reset_parameters()
        self.out_shape = (maps, 1, 1)
        self.fmap = DenseMap(in_shape)


def _bank(config: LayerSpec, in_shape: Shape, seed: int) -> FilterBank:
    if config.kind == "local":
        return LocalBank(in_shape, config.maps, config.kernel, config.stride, seed)
    if config.kind == "conv":
        return ConvBank(in_shape, config.maps, config.kernel, config.stride, seed)
    return DenseBank(in_shape, config.maps, seed)


class RICALayer(UnitInitialized):
    """One layer of the stack: ``codes = alpha W pad(x)``, ``reconstruction = D^T codes + b``
    (cropped back to ``x``'s size). Rows are normalized in the forward pass as in
    terabrain.nn.autoencoder.RICA, by scaling the codes (terabrain.nn.shared_weight.
    unit_row_map_pair: no normalised copy of W, one gradient buffer per weight), and kept
    at unit norm after every step (``normalize_``)."""

    def __init__(self, config: LayerSpec, in_shape: Shape, seed: Optional[int] = None):
        super().__init__()
        self.init_seed = _draw_seed(seed)
        self.in_shape = tuple(in_shape)
        self.padding: tuple[int, int] = config.padding_sides
        channels, height, width = in_shape
        added = sum(self.padding)
        padded = (channels, height + added, width + added)
        self.encoder = _bank(config, padded, self.init_seed)
        self.decoder = None if config.tied else _bank(config, padded, self.init_seed + 1)
        self.alpha = nn.Parameter(torch.ones(()))
        self.bias = nn.Parameter(torch.zeros(self.in_shape))
        self.out_shape: Shape = self.encoder.out_shape
        self.normalize_()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for bank in self.banks():
            bank.reset_parameters()
        if self.alpha.device.type != "meta":
            self.alpha.fill_(1.0)
            self.bias.zero_()
        self.normalize_()

    def banks(self) -> list[FilterBank]:
        return [bank for bank in (self.encoder, self.decoder) if bank is not None]

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        before, after = self.padding
        return F.pad(x, [before, after, before, after]) if before or after else x

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return unit_row_map_codes(self.encoder.fmap, self._pad(x), self.encoder.weight, self.alpha)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        decoder = None if self.decoder is None else self.decoder.weight
        codes, reconstruction = unit_row_map_pair(self.encoder.fmap, self._pad(x),
                                                  self.encoder.weight, decoder, self.alpha)
        if any(self.padding):
            _, height, width = self.in_shape
            top = self.padding[0]
            reconstruction = reconstruction[..., top : top + height, top : top + width]
        return codes, reconstruction + self.bias

    @torch.no_grad()
    def normalize_(self) -> None:
        for bank in self.banks():
            if bank.weight.device.type != "meta":
                normalize_rows_(bank.weight)

    def filters(self) -> torch.Tensor:
        """Every hidden unit's filter as a row (the encoder's): (kh, kw, C) order for local
        and conv layers, the input's (C, H, W) order for dense ones."""
        weight = unit_rows(self.encoder.weight.detach())
        return weight.reshape(-1, weight.shape[-1])


def _pooled(size: int, kernel: int, stride: int) -> int:
    return (size - kernel) // stride + 1


def _post(config: LayerSpec, shape: Shape) -> tuple[nn.Module, Shape]:
    """Pooling then LCN after a layer, and the shape that comes out."""
    steps: list[nn.Module] = []
    if config.pool is not None:
        kernel, stride = config.pool.kernel, config.pool.stride or config.pool.kernel
        if kernel > min(shape[1:]):
            raise ValueError(f"pool.kernel {kernel} is larger than the layer's output {shape}")
        pool = {"l2": L2Pool2d, "max": nn.MaxPool2d, "avg": nn.AvgPool2d}[config.pool.kind]
        steps.append(pool(kernel, stride))
        shape = (shape[0], _pooled(shape[1], kernel, stride), _pooled(shape[2], kernel, stride))
    if config.lcn is not None:
        steps.append(LocalContrastNorm(config.lcn.kernel, config.lcn.sigma))
    return nn.Sequential(*steps), shape


class DeepNetwork(UnitInitialized):
    """RICA layers, bottom first, each with its pooling and LCN (``post``).

    Inputs are rows of flattened images in the data's layout, (H, W) or (H, W, C) — what
    terabrain.data produces — or image tensors (N, C, H, W).
    """

    def __init__(self, layers: Sequence[LayerSpec], input_shape: Shape, seed: Optional[int] = None):
        super().__init__()
        self.init_seed = _draw_seed(seed)
        self.input_shape: Shape = tuple(input_shape)
        self.layers = nn.ModuleList()
        self.post = nn.ModuleList()
        self.shapes: list[Shape] = [self.input_shape]
        shape = self.input_shape
        for index, config in enumerate(layers):
            try:
                layer = RICALayer(config, shape, seed=self.init_seed + 7919 * (index + 1))
                post, shape = _post(config, layer.out_shape)
            except ValueError as error:
                raise ValueError(f"model.layers[{index}]: {error} (its input is {shape})") from None
            self.layers.append(layer)
            self.post.append(post)
            self.shapes.append(shape)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def output_shape(self) -> Shape:
        return self.shapes[-1]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for layer in self.layers:
            layer.reset_parameters()

    def to_images(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            return x
        channels, height, width = self.input_shape
        return x.view(len(x), height, width, channels).permute(0, 3, 1, 2)

    def features(self, x: torch.Tensor, upto: Optional[int] = None) -> torch.Tensor:
        """The images after layers 1..``upto`` (all by default), each with its post-processing."""
        h = self.to_images(x)
        for layer, post in list(zip(self.layers, self.post))[: upto if upto is not None else None]:
            h = post(layer.encode(h))
        return h

    def encode(self, x: torch.Tensor, layer: Optional[int] = None) -> torch.Tensor:
        """Flattened rows. ``layer=N`` (1-based): the codes of layer N's hidden units (before
        its pooling and LCN), the neurons analysis looks at. No ``layer``: the network's
        output features (after the top layer's post-processing), what a classifier uses."""
        if layer is None:
            return self.features(x).flatten(1)
        if not 1 <= layer <= len(self.layers):
            raise ValueError(f"layer {layer}: the network has layers 1..{len(self.layers)}")
        return self.layers[layer - 1].encode(self.features(x, layer - 1)).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """The first layer's reconstruction of ``x``, as rows in the data's layout."""
        _, reconstruction = self.layers[0](self.to_images(x))
        return reconstruction.permute(0, 2, 3, 1).reshape(len(x), -1)

    def normalize_(self) -> None:
        for layer in self.layers:
            layer.normalize_()

    def filters(self) -> torch.Tensor:
        return self.layers[0].filters()

    def first_layer_filters(self, limit: int = 256) -> tuple[torch.Tensor, tuple[int, ...]]:
        """Up to ``limit`` first-layer filters as rows in image layout (k, k[, C]) and that
        shape, for pictures. A local layer has a filter bank per location: the banks of
        evenly spaced locations are shown, all maps of each."""
        layer = self.layers[0]
        channels = layer.in_shape[0]
        weight = layer.encoder.weight.detach()  # normalised below, once picked
        if isinstance(layer.encoder, DenseBank):  # rows in the input's (C, H, W) order
            _, height, width = layer.in_shape
            rows = unit_rows(weight[:limit]).view(-1, channels, height, width).permute(0, 2, 3, 1)
        else:
            kernel = layer.encoder.layer.kernel_size if isinstance(layer.encoder, LocalBank) else layer.encoder.kernel
            height = width = kernel
            if weight.dim() == 3:  # (locations, maps, K)
                locations = max(1, min(weight.shape[0], limit // weight.shape[1]))
                picked = torch.linspace(0, weight.shape[0] - 1, locations).round().long()
                weight = weight[picked]
            rows = unit_rows(weight.reshape(-1, weight.shape[-1])[:limit])
        rows = rows.reshape(len(rows), -1)
        shape = (height, width) if channels == 1 else (height, width, channels)
        return rows, shape


def input_shape_from(example_shape: tuple[int, ...]) -> Shape:
    """The data's example shape (H, W) or (H, W, C) as the network's (C, H, W)."""
    if len(example_shape) == 2:
        return (1, example_shape[0], example_shape[1])
    if len(example_shape) == 3:
        return (example_shape[2], example_shape[0], example_shape[1])
    raise ValueError(f"model.kind deep needs image examples, got rows of shape {example_shape}")
