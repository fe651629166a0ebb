"""Machine profiles: what `terabrain plan --profile` needs to turn a learner's work and traffic
into seconds. A profile is a small YAML file (``terabrain calibrate`` writes one for this
machine; ``terabrain/capacity/profiles/`` holds the built-in ones), validated here.

Everything is per *device* (a GPU, or a CPU node), in SI units: FLOP/s, bytes/s, seconds.

- ``compute``: the fp32 (and bf16) peak, the memory bandwidth, and measured GEMM points. A
  GEMM's rate is a roofline, min(peak, intensity x bandwidth), corrected by the measured
  points nearest its shape (terabrain.capacity.timing.gemm_rate). Thin matrices at batch 40
  are memory-bound, which the roofline knows; the measured points say by how much the
  library misses it. The locally connected layer runs at ``local_efficiency`` of the GEMM
  rate of its per-location shape; elementwise work and the optimizer update stream memory
  at their own measured bandwidths.
- ``network``: an alpha-beta cost per collective, for links inside a node and between nodes:
  a collective over k ranks that sends S bytes per rank takes alpha x steps(k) + S / bandwidth
  (steps: ring all-reduce 2(k-1), all-gather and reduce-scatter k-1, point-to-point 1).
- ``reader``: how fast one *node* reads examples when they are not resident: pixels decoded
  from JPEG per second, and bytes of pre-decoded pixels per second from where the data lies;
  the ranks of a node share it.
- ``sources``: for a built-in profile, where each number comes from (a datasheet, a seed, a
  measurement, or "assumption: ..."); keys are the fields' dotted paths.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    ValidationError,
)

from terabrain.config.loader import read_yaml_file
from terabrain.errors import ConfigError

PROFILES_DIR = Path(__file__).resolve().parent / "profiles"
COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "point_to_point")


class _Strict(BaseModel):
    # Every figure of a profile is a finite number: an infinite rate or overhead would only
    # surface as a division by zero (or inf - inf) deep in the step-time model.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


GEMM_LAYOUTS = ("nn", "nt", "tn", "tn+")


class GemmPoint(_Strict):
    """One measured matrix product: (m x k) @ (k x n) at ``flops_per_s``, in ``layout``:
    nn both operands row-major; nt the second transposed (x W^T, as torch.nn.functional.linear
    runs it); tn the first transposed, into a new buffer (a weight gradient h^T g, whose pages
    fault in on first touch); tn+ the same added into an existing buffer (addmm_: the second
    gradient of a tied weight). A local point (``local_points``) is ``nn`` for a layer trained
    one step and ``encode`` for its codes alone (a frozen forward copy)."""

    m: PositiveInt
    n: PositiveInt
    k: PositiveInt
    flops_per_s: PositiveFloat
    layout: Literal["nn", "nt", "tn", "tn+", "encode"] = "nn"


class SharedRates(_Strict):
    """Per-rank rates measured with ``ranks`` processes running at once on one node, each
    with ``threads`` threads: what one rank of a CPU node gets while the others compute
    beside it (cores, caches and memory shared; more ranks than cores time-share)."""

    ranks: PositiveInt
    threads: PositiveInt
    gemm_points: list[GemmPoint]
    local_points: list[GemmPoint] = Field(default_factory=list)
    elementwise_bandwidth: PositiveFloat
    optimizer_bandwidth: PositiveFloat
    fresh_bandwidth: PositiveFloat = Field(
        description="Bytes/s of a copy into a newly allocated buffer (its pages fault in).")
    compression_bandwidth: dict[str, PositiveFloat] = Field(default_factory=dict)
    step_overhead_s: float = Field(0.0, ge=0)
    deep_layer_overhead_s: float = Field(0.0, ge=0)
    activation_bandwidth: PositiveFloat | None = None


class Compute(_Strict):
    device: str = Field(description="What one device is, in words.")
    peak_flops: PositiveFloat = Field(description="fp32 FLOP/s of one device.")
    peak_flops_bf16: PositiveFloat | None = Field(
        None, description="bf16 FLOP/s (tensor cores); None: the fp32 peak.")
    memory_bandwidth: PositiveFloat = Field(description="Device memory bytes/s.")
    gemm_efficiency: float = Field(
        0.8, gt=0, le=1,
        description="Fraction of the roofline a GEMM reaches where no point was measured.")
    gemm_points: list[GemmPoint] = Field(default_factory=list)
    local_efficiency: float = Field(
        gt=0, le=4, description="Locally connected layer rate / GEMM rate of one location's "
        "product (above 1 where the layer batches locations into larger products); used "
        "where no local_points were measured.")
    local_points: list[GemmPoint] = Field(
        default_factory=list,
        description="A deep network's locally connected layer trained one step (layout nn), "
                    "and its codes alone (layout encode: a frozen forward copy), as FLOP/s of "
                    "its per-location products (m batch, n maps, k field), copies included; "
                    "interpolated by shape like gemm_points.")
    elementwise_bandwidth: PositiveFloat = Field(
        description="Bytes/s that elementwise kernels stream (reads + writes).")
    optimizer_bandwidth: PositiveFloat = Field(
        description="Bytes/s the optimizer update streams (parameters, gradients, state).")
    compression_bandwidth: dict[str, PositiveFloat] = Field(
        default_factory=dict,
        description="fp32 gradient bytes/s one compress + decompress pass of each "
                    "parallel.compression scheme handles; a scheme not listed: "
                    "elementwise_bandwidth / 8 (an assumption).")
    fresh_bandwidth: PositiveFloat | None = Field(
        None, description="Bytes/s of a copy into a newly allocated buffer (pages fault in "
                          "on first touch); None: elementwise_bandwidth.")
    activation_bandwidth: PositiveFloat | None = Field(
        None, description="Bytes/s a deep network's activation work streams (its losses, bias, "
                          "LCN and pooling: many small kernels, counted as terabrain.learners."
                          "deep_work.activation_values; terabrain calibrate runs one layer's); "
                          "None: elementwise_bandwidth.")
    step_overhead_s: float = Field(
        0.0, ge=0, description="Fixed seconds per training step (framework, launches).")
    deep_layer_overhead_s: float = Field(
        0.0, ge=0, description="Fixed seconds per layer of a deep network's step beyond "
        "step_overhead_s: the layer-wise objective's Python, LCN, losses and bookkeeping and "
        "the dispatch of their small kernels (terabrain calibrate: a 2-layer network on 8 x 8 "
        "images, where the work is negligible); 0: not measured.")
    sharded_evaluation_s: float = Field(
        0.0, ge=0, description="Seconds one closure evaluation of a model-parallel layer "
        "(DTensor) costs beyond the same evaluation on plain tensors: the sharding "
        "propagation and redistributions of its few dozen operations (terabrain calibrate "
        "under a launcher); 0: not measured.")
    ranks_share_device: bool = Field(
        False, description="True on CPU nodes: the ranks of a node share its cores, so each "
                           "gets 1/ranks-per-node of the rates above (unless ``shared`` "
                           "measured what it gets).")
    shared: list[SharedRates] = Field(
        default_factory=list,
        description="CPU nodes: per-rank rates measured with 1, 2, 4 ... ranks computing at "
                    "once (terabrain calibrate); the planner uses the entry for the ranks per "
                    "node instead of dividing the device's rates.")


class Link(_Strict):
    alpha_s: float = Field(ge=0, description="Seconds per algorithm step (latency).")
    bandwidth: PositiveFloat = Field(description="Bytes/s each rank sends.")
    cpu_fraction: float | None = Field(
        None, ge=0, le=8,
        description="CPU seconds a rank's process spends per second of the collective (gloo "
                    "copies through the kernel's sockets and sums on the cores that compute). "
                    "Where ranks share a CPU node, an overlapped collective still takes this "
                    "much from the compute. None: none (a GPU's copy engines and NICs).")
    sync_s: float = Field(
        0.0, ge=0,
        description="Seconds a blocking call costs inside a training step beyond alpha and its "
                    "bytes: the ranks arrive from compute, not idle (terabrain calibrate times "
                    "calls between 2 ms phases of compute, mean over calls). Charged to every "
                    "call a step waits for; 0 where not measured.")


class Links(_Strict):
    all_reduce: Link
    all_gather: Link
    reduce_scatter: Link
    point_to_point: Link


class NodeLinks(_Strict):
    """Intra-node links measured with ``ranks_per_node`` ranks on the node."""

    ranks_per_node: PositiveInt
    links: Links
    sharded_evaluation_s: float | None = Field(
        None, ge=0, description="compute.sharded_evaluation_s measured with these ranks.")


class Network(_Strict):
    backend: str = Field(description="nccl, gloo, mpi.")
    intra_node: Links
    inter_node: Links
    nics_per_node: PositiveInt = Field(
        1, description="Inter-node adapters per node: the ranks of a node share them.")
    by_ranks_per_node: list[NodeLinks] = Field(
        default_factory=list,
        description="Intra-node links measured with 2, 4 ... ranks on the node (terabrain "
                    "calibrate under a launcher with more than 2 ranks on one node: each "
                    "group while the node's other ranks wait). Where ranks time-share a CPU "
                    "node, every step of a collective waits for a process to be scheduled. "
                    "The planner takes the entry for the ranks per node, else the nearest "
                    "measured above, else the largest; intra_node where there are none.")

    def measured_with(self, per_node: int) -> NodeLinks | None:
        """The by_ranks_per_node entry for a node of ``per_node`` ranks (nearest_measured)."""
        return nearest_measured(self.by_ranks_per_node, per_node, lambda e: e.ranks_per_node)


def nearest_measured(entries: list, count: int, ranks_of):
    """The entry measured with ``count`` ranks; else the nearest with more; else the one
    with the most (``ranks_of(entry)``: its rank count). None where there are no entries."""
    if not entries:
        return None
    above = [e for e in entries if ranks_of(e) >= count]
    return min(above, key=ranks_of) if above else max(entries, key=ranks_of)


class Reader(_Strict):
    decode_pixels_per_s: PositiveFloat = Field(
        description="JPEG pixels one node decodes per second (all its cores).")
    pixel_bytes_per_s: PositiveFloat = Field(
        description="Bytes of pre-decoded pixels one node reads per second from its storage.")
    overlaps_compute: bool = Field(
        True, description="Readers run beside the step (False where they share its cores).")


class MachineProfile(_Strict):
    name: str
    description: str = ""
    gpus_per_node: PositiveInt = Field(description="Devices (ranks) per node.")
    device_memory: PositiveInt = Field(description="Bytes of memory per device.")
    compute: Compute
    network: Network
    reader: Reader
    sources: dict[str, str] = Field(
        default_factory=dict, description="Dotted field path -> where the number comes from.")
    measured: dict[str, str] = Field(
        default_factory=dict, description="How `terabrain calibrate` measured (host, torch, when).")

    def link(self, collective: str, inter_node: bool, per_node: int | None = None) -> Link:
        """A collective's link between nodes, or inside a node of ``per_node`` ranks."""
        links = self.network.inter_node if inter_node else self.network.intra_node
        if not inter_node and per_node is not None:
            entry = self.network.measured_with(per_node)
            links = entry.links if entry is not None else links
        return getattr(links, collective)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, width=100)


def builtin_profiles() -> list[str]:
    return sorted(path.stem for path in PROFILES_DIR.glob("*.yaml"))


def numeric_fields(profile: MachineProfile) -> list[str]:
    """The dotted paths of every number a profile states (what ``sources`` must cover)."""
    out = []

    def walk(value, path):
        if isinstance(value, dict):
            for key, item in value.items():
                if key not in ("sources", "measured", "gemm_points"):
                    walk(item, f"{path}.{key}" if path else key)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append(path)

    walk(profile.model_dump(), "")
    return out


def load_profile(name_or_path: str) -> MachineProfile:
    """A built-in profile by name (``h100-sxm``) or a YAML file; ConfigError naming the field
    when it is not a valid profile."""
    path = Path(name_or_path)
    if not path.is_file():
        builtin = PROFILES_DIR / f"{name_or_path}.yaml"
        if not builtin.is_file():
            raise ConfigError(
                f"--profile: no file {name_or_path!r} and no built-in profile of that name; "
                f"built-in: {', '.join(builtin_profiles())}")
        path = builtin
    # As experiment files are read: a binary file, a key written twice or a bomb of aliases
    # is one line, not a traceback or a silent choice.
    raw = read_yaml_file(path, f"--profile {path}", "a profile")
    if not isinstance(raw, dict):
        raise ConfigError(f"--profile {path}: expected a mapping of profile fields")
    try:
        return MachineProfile.model_validate(raw)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ConfigError(f"--profile {path}: {where}: {first['msg']}") from None
