"""A user's network and one of its layers (the ``source_network`` section): loading it from
an import path or a TorchScript file, taking the layer's activations as examples pass
through, and running it with the layer's output replaced (spliced reconstructions,
ablations).

An ``nn.Module`` is tapped with forward hooks, so any architecture works and nothing is
written out. A loaded TorchScript module calls its submodules from compiled code, where
Python hooks never run; for it the layer must be a top-level child of a scripted
``Sequential``, and the children are run in order around it.

Errors a user can cause (a wrong import path, file, layer name or weights) are ConfigErrors
naming the ``source_network`` field.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from terabrain.data.eight_bit import unit_float
from terabrain.errors import ConfigError
from terabrain.tensor_files import load_tensors

Replace = Callable[[torch.Tensor], torch.Tensor]


class _Stopped(Exception):
    """Raised by the tap's hook: the layer's output is known, the rest need not run."""


def _load_module(spec: str) -> nn.Module:
    path = Path(spec)
    if path.suffix in (".pt", ".pth", ".ts", ".jit") or path.is_file():
        if not path.is_file():
            raise ConfigError(f"source_network.model: file not found: {spec}")
        try:
            return torch.jit.load(str(path), map_location="cpu")
        except (RuntimeError, ValueError, OSError) as error:
            first = (str(error).strip().splitlines() or ["?"])[0][:200]
            raise ConfigError(f"source_network.model: {spec} is not a TorchScript file "
                              f"(torch.jit.load: {first})") from None
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ConfigError(f"source_network.model: {spec!r} is neither module:callable nor "
                          "an existing TorchScript file")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(f"source_network.model: cannot import {module_name!r} ({error})") from None
    target = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ConfigError(f"source_network.model: {module_name} has no {attribute!r}")
        target = getattr(target, part)
    network = target() if callable(target) and not isinstance(target, nn.Module) else target
    if not isinstance(network, nn.Module):
        raise ConfigError(f"source_network.model: {spec} gave a {type(network).__name__}, "
                          "not a torch.nn.Module")
    return network


def load_network(spec: str, weights: Path | None = None, seed: int = 0) -> nn.Module:
    """The network ``spec`` names (module:callable, or a TorchScript file), built under
    ``seed`` (its initialisation is then the same every time), with ``weights`` (a
    safetensors state dict) loaded into it; in eval mode, on the CPU."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        network = _load_module(spec)
    if weights is not None:
        load_weights(network, load_tensors(Path(weights), ConfigError, "source_network.weights"),
                     "source_network.weights")
    return network.eval()


def load_weights(network: nn.Module, state: dict[str, torch.Tensor], field: str) -> None:
    try:
        network.load_state_dict(state)
    except (RuntimeError, KeyError) as error:
        first = (str(error).strip().splitlines() or ["?"])[-1].strip()[:200]
        raise ConfigError(f"{field}: does not fit source_network.model ({first})") from None


def _scripted(network: nn.Module) -> bool:
    return isinstance(network, torch.jit.ScriptModule)


def check_layer(network: nn.Module, layer: str) -> None:
    """ConfigError naming ``source_network.layer`` unless ``network`` has that layer (and,
    for TorchScript, unless it is a top-level child of a scripted Sequential)."""
    names = [name for name, _ in network.named_modules() if name]
    if layer not in names:
        shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
        raise ConfigError(f"source_network.layer: no layer {layer!r} in the network; its "
                          f"layers: {shown or 'none'}")
    if _scripted(network):
        children = [name for name, _ in network.named_children()]
        if getattr(network, "original_name", "") != "Sequential" or layer not in children:
            raise ConfigError(
                f"source_network.layer: {layer!r} of a TorchScript network cannot be tapped "
                "(loaded TorchScript takes no forward hooks); allowed: a top-level layer of "
                f"a scripted Sequential ({', '.join(children)}), or give "
                "source_network.model as module:callable")


def network_input(rows: torch.Tensor, example_shape: tuple[int, ...], layout: str) -> torch.Tensor:
    """Example rows as the network takes them: ``rows`` (N, D), or ``images`` (N, C, H, W)
    from examples of shape (H, W) or (H, W, C)."""
    rows = unit_float(rows)
    if layout == "rows":
        return rows.flatten(1)
    if len(example_shape) == 2:
        return rows.reshape(len(rows), 1, *example_shape)
    if len(example_shape) == 3:
        return rows.reshape(len(rows), *example_shape).permute(0, 3, 1, 2)
    raise ConfigError(f"source_network.input: images needs examples of shape (H, W) or "
                      f"(H, W, C), the data gives {example_shape}; allowed here: rows")


@contextmanager
def _hooked(network: nn.Module, layer: str, hook) -> Iterator[None]:
    handle = network.get_submodule(layer).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _sequential_run(network: nn.Module, layer: str, x: torch.Tensor,
                    replace: Replace | None, stop: bool) -> torch.Tensor:
    for name, child in network.named_children():
        x = child(x)
        if name == layer:
            if stop:
                return x
            if replace is not None:
                x = replace(x)
    return x


class LayerTap:
    """``network``'s layer ``layer``: its output for given inputs (``activations``), and
    the network's output with the layer's output replaced (``outputs``)."""

    def __init__(self, network: nn.Module, layer: str):
        check_layer(network, layer)
        self.network, self.layer = network, layer

    def activations(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's output, flattened to (N, values); the rest of the network is not run."""
        if _scripted(self.network):
            return _sequential_run(self.network, self.layer, x, None, True).flatten(1)
        taken: list[torch.Tensor] = []

        def take(module, inputs, output):
            taken.append(output)
            raise _Stopped

        with _hooked(self.network, self.layer, take):
            try:
                self.network(x)
            except _Stopped:
                pass
        if not taken:
            raise ConfigError(f"source_network.layer: {self.layer!r} did not run in the "
                              "network's forward pass")
        return taken[0].flatten(1)

    def outputs(self, x: torch.Tensor, replace: Replace | None = None) -> torch.Tensor:
        """The network's output with the layer's output ``o`` replaced by
        ``replace(o.flatten(1))`` (reshaped back); None: the network as it is."""
        if replace is None:
            return self.network(x)

        def substitute(output: torch.Tensor) -> torch.Tensor:
            return replace(output.flatten(1)).reshape(output.shape).to(output.dtype)

        if _scripted(self.network):
            return _sequential_run(self.network, self.layer, x, substitute, False)
        with _hooked(self.network, self.layer, lambda m, i, output: substitute(output)):
            return self.network(x)


@torch.no_grad()
def layer_activations(tap: LayerTap, rows: torch.Tensor, example_shape: tuple[int, ...],
                      layout: str, batch_size: int) -> torch.Tensor:
    """The layer's activations of every row, ``batch_size`` rows per forward pass."""
    tap.network.eval()
    pieces = [tap.activations(network_input(rows[start : start + batch_size], example_shape,
                                            layout))
              for start in range(0, len(rows), batch_size)]
    return torch.cat(pieces).float() if pieces else rows.new_zeros((0, 0))


@torch.no_grad()
def network_outputs(tap: LayerTap, rows: torch.Tensor, example_shape: tuple[int, ...],
                    layout: str, batch_size: int, replace: Replace | None = None) -> torch.Tensor:
    """The network's outputs for every row, with the layer replaced as ``LayerTap.outputs``."""
    tap.network.eval()
    return torch.cat([
        tap.outputs(network_input(rows[start : start + batch_size], example_shape, layout),
                    replace).float()
        for start in range(0, len(rows), batch_size)
    ])


def layer_width(spec: str, layer: str, example_shape: tuple[int, ...], layout: str) -> int:
    """Values per example of the layer, from one zero example (for `terabrain plan`)."""
    network = load_network(spec)
    tap = LayerTap(network, layer)
    example = torch.zeros(1, int(torch.tensor(example_shape).prod()))
    try:
        with torch.no_grad():
            return int(tap.activations(network_input(example, example_shape, layout)).shape[1])
    except (RuntimeError, ValueError, TypeError) as error:  # the network's own complaint
        first = (str(error).strip().splitlines() or ["?"])[0][:160]
        raise ConfigError(f"source_network.model: does not take the data's examples of shape "
                          f"{example_shape} as {layout} ({first})") from None
