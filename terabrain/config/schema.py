"""The experiment schema: every field a user can set, with what it means and what is allowed.

Field descriptions are the reference documentation: `terabrain show NAME` prints a
built-in experiment, and an error message quotes the field's path and allowed values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Union

from pydantic import (
    BaseModel, ConfigDict, Field, NonNegativeInt, PositiveFloat, PositiveInt, model_validator,
)

from terabrain.data.embedded import PHOTOS


class Section(BaseModel):
    """Unknown keys are errors, not silently ignored: a typo must not change an experiment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LCNConfig(Section):
    """Local contrast normalization (seed 000; Jarrett et al. 2009): subtract a Gaussian-
    weighted local mean, divide by the local standard deviation."""

    kernel: PositiveInt = Field(9, description="Side of the Gaussian window, in positions.")
    sigma: Optional[PositiveFloat] = Field(
        None, description="Width of the Gaussian window; null: kernel / 4."
    )

    @model_validator(mode="after")
    def _odd(self) -> "LCNConfig":
        if self.kernel % 2 == 0:
            raise ValueError(f"lcn.kernel must be odd (a centred window), got {self.kernel}")
        return self


class DataConfig(Section):
    """Where examples come from and how they are preprocessed."""

    source: Literal[
        "photos", "digits", "npy", "lfw", "fashion-mnist", "folder", "shards", "yfcc", "face_mix",
    ] = Field(
        "photos",
        description="photos: patches of the natural photographs bundled with scikit-image and "
        "scikit-learn; digits: scikit-learn's 8x8 digits (with labels); npy: a float array of "
        "shape (N, D) or (N, H, W[, C]) in a .npy file given by `path`; lfw: scikit-image's "
        "200 LFW 25x25 crops (faces / non-faces labels); fashion-mnist: Fashion-MNIST from "
        "Debian's dataset-fashion-mnist (train for training, test held out); folder: the images "
        "under `root`; shards: tar shards in `root` (see `terabrain data pack`); yfcc: a "
        "YFCC100M metadata file `metadata` with its images under `root`. folder, shards and "
        "yfcc are streamed (see docs/data.md); face_mix: unlabelled grey images, `patch_size` "
        "square, mixing jittered lfw_subset faces (only those of the face test's selection "
        "half) with random photo crops (terabrain.data.faces).",
    )
    photos: list[str] = Field(
        default_factory=lambda: [
            "astronaut", "camera", "coffee", "chelsea", "rocket", "china", "flower",
            "grass", "brick", "clock", "gravel",
        ],
        description=f"Bundled photographs to sample patches from (source: photos). "
        f"Available: {', '.join(PHOTOS)}.",
    )
    path: Optional[Path] = Field(None, description="The .npy file (source: npy).")
    labels_path: Optional[Path] = Field(
        None, description="Optional .npy of integer labels, one per row of `path`."
    )
    color: bool = Field(False, description="Keep RGB channels; otherwise convert to grey.")
    patch_size: PositiveInt = Field(
        8, description="Side of the square patches sampled from photos (pixels)."
    )
    num_patches: PositiveInt = Field(
        20000, description="Patches in the training set (source: photos)."
    )
    holdout_patches: PositiveInt = Field(
        5000, description="Extra patches kept out of training, for evaluation and analysis."
    )
    test_fraction: float = Field(
        0.25, gt=0.0, lt=1.0,
        description="Fraction of a labelled data set kept for testing (digits, npy).",
    )
    remove_mean: bool = Field(
        True, description="Subtract each example's own mean (per channel) before whitening."
    )
    lcn: Optional[LCNConfig] = Field(
        None,
        description="Local contrast normalization of every example, after mean removal and "
        "before whitening (the preprocessing of Le et al. 2012 that seed 000 follows).",
    )
    whitening: Literal["none", "zca"] = Field(
        "zca", description="none, or ZCA whitening fitted on `whitening_fit_samples` rows."
    )
    whitening_epsilon: PositiveFloat = Field(
        0.1,
        description="ZCA regulariser, as a fraction of the mean eigenvalue; larger values "
        "smooth the filters (a low-pass filter).",
    )
    whitening_fit_samples: PositiveInt = Field(
        20000, description="Training rows used to fit the whitening."
    )
    # --- streamed collections (docs/data.md) -----------------------------------------
    root: Optional[Path] = Field(
        None, description="folder: the image folder; shards: a directory of tar shards (or one "
        ".tar); yfcc: the image root.",
    )
    metadata: Optional[Path] = Field(
        None, description="yfcc: the YFCC100M metadata file (tab-separated, 23 or 25 columns; "
        ".bz2 and .gz are read directly).",
    )
    yfcc_media: Literal["photo", "video", "any"] = Field(
        "photo", description="yfcc: keep photos, videos (their still images) or both."
    )
    yfcc_tags_any: list[str] = Field(
        default_factory=list, description="yfcc: keep lines with at least one of these user tags."
    )
    yfcc_tags_all: list[str] = Field(
        default_factory=list, description="yfcc: keep lines with all of these user tags."
    )
    yfcc_tags_none: list[str] = Field(
        default_factory=list, description="yfcc: drop lines with any of these user tags."
    )
    yfcc_layout: Literal["hash", "id"] = Field(
        "hash", description="yfcc: image paths under `root`: hash: <h[:3]>/<h[3:6]>/<h>.jpg "
        "(Multimedia Commons mirror, 25-column file); id: <photo id>.<extension>.",
    )
    crop_size: PositiveInt = Field(
        300, description="Images: the smaller side is scaled to this and the centre "
        "crop_size x crop_size kept (seed 000: 300).",
    )
    image_size: Optional[PositiveInt] = Field(
        None, description="Images: resize the crop to image_size x image_size (null: keep crop_size).",
    )
    patches_per_image: int = Field(
        0, ge=0, description="Images: 0 makes each image one example; k > 0 takes k random "
        "patch_size patches from each image (positions seeded by seed, epoch, image).",
    )
    block_size: Optional[PositiveInt] = Field(
        None, description="Streamed: read in blocks of this many images, blocks in random order, "
        "shuffled inside (seed 000: 960 with train.batch_size 192); a multiple of the batch.",
    )
    stream: Optional[bool] = Field(
        None, description="npy: true streams rows from the memory map instead of loading the "
        "array (null: stream folder, shards and yfcc; load the others).",
    )
    workers: int = Field(
        4, ge=0, description="Streamed: parallel decoding workers per rank (0: decode in the "
        "training thread, no prefetch).",
    )
    worker_kind: Literal["thread", "process"] = Field(
        "thread", description="Streamed: thread pool, or DataLoader worker processes.",
    )
    prefetch: PositiveInt = Field(4, description="Streamed: batches read ahead per rank.")
    read_timeout_s: PositiveFloat = Field(
        300.0, description="Streamed: stop with an error when no batch arrives for this long.",
    )
    on_error: Literal["skip", "fail"] = Field(
        "skip", description="Unreadable examples: skip and count them (metrics data_skipped), "
        "or stop the run naming the file.",
    )
    stage_dir: Optional[Path] = Field(
        None, description="shards: copy shards to this node-local directory in the background, "
        "verify their checksums, read the local copies once complete.",
    )
    stage_wait: bool = Field(
        False, description="With stage_dir: finish staging this rank's shards before the first "
        "step (stage, then train) instead of training from the shared file system meanwhile.",
    )
    order: Literal["global", "shard_affine"] = Field(
        "global", description="Streamed: global: every epoch a shuffle of the whole collection "
        "(each rank reads from every shard); shard_affine (source shards): each data-parallel "
        "replica owns a fixed, size-balanced set of shards and shuffles only its own examples, "
        "so stage_dir holds only the shards of that node's ranks; every replica takes "
        "min-share // batch steps per epoch and the rest of larger shares waits, in rotation "
        "(docs/data.md).",
    )

    @model_validator(mode="after")
    def _order_needs(self) -> "DataConfig":
        if self.order == "shard_affine":
            if self.source != "shards":
                raise ValueError(f"data.order: shard_affine needs data.source shards (got "
                                 f"{self.source}); allowed for other sources: global")
            if self.block_size is not None:
                raise ValueError("data.order: shard_affine does not combine with data.block_size "
                                 "(set data.block_size null, or use data.order global)")
        return self

    @model_validator(mode="after")
    def _collection_needs(self) -> "DataConfig":
        needs = {"folder": ("root",), "shards": ("root",), "yfcc": ("metadata", "root")}
        for name in needs.get(self.source, ()):
            if getattr(self, name) is None:
                raise ValueError(f"data.{name} is required when data.source is {self.source}")
        if self.source in ("folder", "yfcc") and not Path(self.root).is_dir():
            raise ValueError(f"data.root: not a directory: {self.root}")
        if self.source == "shards" and not Path(self.root).exists():
            raise ValueError(f"data.root: not found: {self.root}")
        if self.metadata is not None and not Path(self.metadata).is_file():
            raise ValueError(f"data.metadata: file not found: {self.metadata}")
        if self.stage_wait and self.stage_dir is None:
            raise ValueError("data.stage_wait needs data.stage_dir (the directory to stage into)")
        if self.stage_dir is not None and self.source != "shards":
            raise ValueError("data.stage_dir works with data.source shards (packed with "
                             "`terabrain data pack`, which writes the checksums)")
        if self.image_size is not None and self.image_size > self.crop_size:
            raise ValueError(f"data.image_size ({self.image_size}) must not exceed data.crop_size ({self.crop_size})")
        if self.patches_per_image and self.patch_size > (self.image_size or self.crop_size):
            raise ValueError(f"data.patch_size ({self.patch_size}) is larger than the "
                             f"{self.image_size or self.crop_size}-pixel images")
        return self

    face_fraction: float = Field(
        0.35, gt=0.0, lt=1.0,
        description="face_mix: fraction of the images that are faces (Le et al.: ~35% in "
        "their test set; faces are rarer in their unlabelled frames).",
    )

    @model_validator(mode="after")
    def _face_mix_is_grey(self) -> "DataConfig":
        if self.source == "face_mix" and self.color:
            raise ValueError("data.color: face_mix images are grey (lfw_subset is); allowed: false")
        return self

    @model_validator(mode="after")
    def _source_needs(self) -> "DataConfig":
        if self.source == "npy" and self.path is None:
            raise ValueError("data.path is required when data.source is npy")
        unknown = [name for name in self.photos if name not in PHOTOS]
        if unknown:
            raise ValueError(
                f"data.photos: unknown photograph(s) {', '.join(unknown)}; "
                f"allowed: {', '.join(PHOTOS)}"
            )
        for field in ("path", "labels_path"):
            value = getattr(self, field)
            if value is not None and not Path(value).is_file():
                raise ValueError(f"data.{field}: file not found: {value}")
        return self


class PoolConfig(Section):
    """Pooling after a layer (before LCN)."""

    kind: Literal["l2", "max", "avg"] = Field(
        "l2", description="l2: sqrt of the sum of squares in the window (Le et al. 2012)."
    )
    kernel: PositiveInt = Field(5, description="Window side.")
    stride: Optional[PositiveInt] = Field(None, description="null: the window side.")


class LayerConfig(Section):
    """One layer of a deep network, trained layer-wise with its own RICA objective."""

    kind: Literal["local", "conv", "dense"] = Field(
        "local",
        description="local: untied locally connected (a separate filter bank at every "
        "location); conv: shared filters (torch conv2d); dense: fully connected.",
    )
    maps: PositiveInt = Field(
        8, description="local/conv: output maps (filters per location); dense: hidden units."
    )
    kernel: PositiveInt = Field(8, description="local/conv: receptive field side.")
    stride: PositiveInt = Field(1, description="local/conv: step between receptive fields.")
    padding: Union[NonNegativeInt, tuple[NonNegativeInt, NonNegativeInt]] = Field(
        0,
        description="local/conv: zero rows and columns added around the input: n on every "
        "side, or [before, after] (top and left, bottom and right).",
    )
    tied: bool = Field(
        True,
        description="Decoder is the encoder's transpose (RICA). false: a separate decoder "
        "matrix, as in Le et al. 2012 (twice the weights).",
    )
    sparsity_weight: Optional[float] = Field(
        None, ge=0.0, description="This layer's lambda; null: objective.sparsity_weight."
    )
    pool: Optional[PoolConfig] = Field(None, description="Pooling after the layer.")
    lcn: Optional[LCNConfig] = Field(None, description="LCN after the layer (and pooling).")
    steps: Optional[PositiveInt] = Field(
        None, description="This layer's budget in layer-wise training; null: train.steps."
    )

    @property
    def padding_sides(self) -> tuple[int, int]:
        """(before, after) zeros; none for a dense layer, which has no spatial field."""
        if self.kind == "dense":
            return (0, 0)
        return (self.padding, self.padding) if isinstance(self.padding, int) else tuple(self.padding)


class ModelConfig(Section):
    """The feature learner: a plain module with no parallelism inside."""

    kind: Literal["rica", "autoencoder", "deep"] = Field(
        "rica",
        description="rica: x -> alpha W x, reconstructed as W^T(alpha W x) + b, W's rows of "
        "unit norm (seed 000, eq. 1); autoencoder: x -> act(W1 x + b1) -> W2 h + b2; deep: "
        "a stack of RICA layers (model.layers) trained layer by layer.",
    )
    hidden: PositiveInt = Field(128, description="Hidden units (features, filters).")
    tied: bool = Field(True, description="autoencoder: decoder uses the encoder's W^T.")
    activation: Literal["sigmoid", "tanh", "relu", "identity"] = Field(
        "sigmoid", description="autoencoder: the hidden units' nonlinearity."
    )
    decoder_activation: Literal["identity", "sigmoid"] = Field(
        "identity", description="autoencoder: nonlinearity of the reconstruction."
    )
    dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="Dropout probability on the input of the encoder."
    )
    layers: list[LayerConfig] = Field(
        default_factory=list,
        description="model.kind deep: the layers, bottom first, each trained with RICA "
        "(seed 000's networks); see docs/networks.md.",
    )
    input_shape: Optional[tuple[PositiveInt, PositiveInt, PositiveInt]] = Field(
        None,
        description="model.kind deep: (channels, height, width) of the input images; null: "
        "from the data. Needed by `terabrain plan` for networks larger than any data here.",
    )

    @model_validator(mode="after")
    def _deep_needs_layers(self) -> "ModelConfig":
        if self.kind == "deep" and not self.layers:
            raise ValueError("model.layers: model.kind deep needs at least one layer")
        if self.kind != "deep" and self.layers:
            raise ValueError("model.layers is only used with model.kind deep")
        return self


class ObjectiveConfig(Section):
    """What the feature learner minimises."""

    kind: Literal["rica", "sparse_autoencoder", "reconstruction"] = Field(
        "rica",
        description="rica (needs model.kind rica); sparse_autoencoder: squared error + "
        "beta KL(rho || mean activation) + weight decay; reconstruction: squared error.",
    )
    sparsity_weight: float = Field(
        0.1, ge=0.0, description="rica: lambda, the weight of the L1 sparsity of alpha W x."
    )
    sparsity_epsilon: PositiveFloat = Field(
        0.01, description="rica: smooth L1 as sqrt(h^2 + epsilon), differentiable at 0."
    )
    rho: float = Field(
        0.05, gt=0.0, lt=1.0, description="sparse_autoencoder: target mean activation."
    )
    beta: float = Field(3.0, ge=0.0, description="sparse_autoencoder: weight of the KL term.")
    weight_decay: float = Field(
        0.0, ge=0.0,
        description="sparse_autoencoder / reconstruction: (weight_decay / 2) * sum of squared "
        "weights, part of the objective (unlike optimizer.weight_decay).",
    )


class OptimizerConfig(Section):
    """A torch.optim optimizer and its settings."""

    name: Literal["sgd", "adagrad", "rmsprop", "adam", "adamw", "lbfgs"] = Field(
        "lbfgs", description="An optimizer from torch.optim, by name."
    )
    lr: PositiveFloat = Field(1.0, description="Learning rate (L-BFGS: initial step length).")
    momentum: float = Field(0.0, ge=0.0, lt=1.0, description="sgd, rmsprop: momentum.")
    nesterov: bool = Field(False, description="sgd: Nesterov momentum (needs momentum > 0).")
    weight_decay: float = Field(0.0, ge=0.0, description="Decoupled from the objective.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="adam, adamw: betas.")
    max_iter: PositiveInt = Field(
        25, description="lbfgs: iterations per training step (each on the full batch)."
    )
    history_size: PositiveInt = Field(20, description="lbfgs: curvature pairs kept.")
    line_search: Literal["strong_wolfe", "none"] = Field(
        "strong_wolfe", description="lbfgs: line search."
    )

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> "OptimizerConfig":
        if self.nesterov and self.momentum <= 0.0:
            raise ValueError("optimizer.nesterov needs optimizer.momentum > 0")
        return self


class EarlyStoppingConfig(Section):
    """Stop when the loss has stopped improving."""

    patience: int = Field(
        0, ge=0, description="Stop after this many logged steps without improvement; 0: never."
    )
    min_delta: float = Field(
        0.0, ge=0.0, description="Relative improvement of the loss that counts as progress."
    )


class TrainConfig(Section):
    """Steps, batches, logging and checkpoints of one training stage."""

    steps: PositiveInt = Field(12, description="Optimizer steps.")
    batch_size: Optional[PositiveInt] = Field(
        None, description="Examples per step; null: the full training set (L-BFGS)."
    )
    log_every: PositiveInt = Field(1, description="Steps between metrics lines.")
    checkpoint_every: int = Field(
        4, ge=0, description="Steps between checkpoints (0: only the final one)."
    )
    keep_checkpoints: PositiveInt = Field(2, description="Checkpoints kept on disk.")
    histogram_every: int = Field(
        0, ge=0, description="Steps between TensorBoard weight histograms (0: at the end)."
    )
    early_stopping: EarlyStoppingConfig = Field(default_factory=EarlyStoppingConfig)
    schedule: Literal["greedy", "pipelined"] = Field(
        "greedy",
        description="model.kind deep: greedy trains layer L+1 once layer L has finished (its "
        "budget or early stopping); pipelined starts it once layer L has trained "
        "train.start_after steps, feeding it from a copy of layer L refreshed every "
        "train.sync_every steps (seed 000, section 3.1).",
    )
    start_after: PositiveInt = Field(
        100, description="pipelined: steps layer L trains before layer L+1 starts."
    )
    sync_every: PositiveInt = Field(
        10, description="pipelined: steps between refreshes of layer L's forward copy."
    )
    progress: bool = Field(True, description="Show a progress bar on an interactive terminal.")


class ParallelConfig(Section):
    """How ranks are laid out: a (data x model) mesh over the processes of the launcher."""

    data: int = Field(
        -1,
        description="Data-parallel replicas: the global batch is split evenly across them and "
        "gradients are averaged. -1: all ranks not used by `model`.",
    )
    model: int = Field(
        1, description="Model-parallel ranks per replica (1: no model parallelism)."
    )
    backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="auto: nccl when CUDA is available, else gloo."
    )
    timeout_s: PositiveFloat = Field(
        300.0,
        description="Collective timeout: when a rank dies or hangs, the others stop with a "
        "message after at most this long.",
    )
    # --- gradient communication (docs/compression.md) ---
    mode: Literal["sync", "localsgd", "hogwild"] = Field(
        "sync",
        description="sync: gradients averaged every step (optionally compressed); localsgd: "
        "each replica steps on its own gradients and parameters are averaged every "
        "`average_every` steps; hogwild: `workers` lock-free processes on one machine update "
        "shared-memory parameters (one launcher rank only).",
    )
    compression: Literal["none", "fp16", "bf16", "onebit", "threshold", "adaptive"] = Field(
        "none",
        description="How sync data parallelism sends gradients. none: fp32 all-reduce; fp16 / "
        "bf16: half-precision all-reduce; onebit: signs + two values per column (Seide et "
        "al.); threshold: entries beyond +-threshold_tau as index+sign words (Strom); adaptive: "
        "the adaptive_proportion largest entries of each column (Dryden et al.). The last "
        "three use reduce-scatter + all-gather with re-quantization and error feedback; their "
        "per-column values and the vectors (biases) go in bf16, also with error feedback.",
    )
    error_feedback: bool = Field(
        True,
        description="onebit / threshold / adaptive: carry what quantization left out to the "
        "next step. Without it, they do not converge to the uncompressed result.",
    )
    threshold_tau: PositiveFloat = Field(
        1e-3,
        description="threshold: the magnitude an accumulated gradient entry must exceed to be "
        "sent; it is reconstructed as +-tau. Scale it to the gradients (bench/compression.py "
        "calibrates it so about 1/32 of the entries are sent).",
    )
    adaptive_proportion: float = Field(
        1 / 32, gt=0.0, le=1.0,
        description="adaptive: fraction of each column's entries sent per step; 1/32 sends "
        "about as many bytes as onebit.",
    )
    average_every: PositiveInt = Field(
        8, description="localsgd: steps between parameter averages (K)."
    )
    workers: PositiveInt = Field(2, description="hogwild: worker processes.")

    @model_validator(mode="after")
    def _communication_fits(self) -> "ParallelConfig":
        if self.compression != "none" and self.mode != "sync":
            raise ValueError(f"parallel.compression {self.compression!r} applies to "
                             f"parallel.mode sync only, got mode {self.mode!r}")
        return self


class SupervisedConfig(Section):
    """A classifier or regressor trained on top of the learned features, with labels."""

    task: Literal["classification", "regression"] = Field(
        "classification",
        description="classification: cross-entropy over classes; regression: squared error.",
    )
    fine_tune: bool = Field(
        False, description="Also train the feature layer (otherwise it is frozen)."
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the features.")
    optimizer: OptimizerConfig = Field(
        default_factory=lambda: OptimizerConfig(name="adam", lr=0.01)
    )
    train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(steps=300, batch_size=128, checkpoint_every=100)
    )


class ExperimentConfig(Section):
    """One experiment: the same file runs on a laptop or on a cluster."""

    name: str = Field("experiment", description="Used in the run directory's name.")
    description: str = Field("", description="One line shown by `terabrain configs`.")
    seed: int = Field(0, description="Seeds data sampling, initialisation and batching.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: CUDA when a GPU is present, else CPU."
    )
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="bf16: autocast matmuls to bfloat16; weights stay fp32."
    )
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    supervised: Optional[SupervisedConfig] = Field(
        None, description="Optional second stage on labels (digits, npy with labels_path)."
    )

    @model_validator(mode="after")
    def _compatible(self) -> "ExperimentConfig":
        rica_model = self.model.kind in ("rica", "deep")
        rica_objective = self.objective.kind == "rica"
        if rica_model != rica_objective:
            allowed = "rica" if rica_model else "sparse_autoencoder, reconstruction"
            raise ValueError(
                f"objective.kind {self.objective.kind!r} does not fit model.kind "
                f"{self.model.kind!r}; allowed: {allowed}"
            )
        if self.objective.kind == "sparse_autoencoder" and self.model.activation != "sigmoid":
            raise ValueError(
                "objective.kind sparse_autoencoder needs model.activation sigmoid "
                "(the KL target rho is a firing probability)"
            )
        if (
            self.model.kind == "deep"
            and self.train.schedule == "pipelined"
            and self.optimizer.name == "lbfgs"
        ):
            raise ValueError(
                "train.schedule pipelined trains several layers in one step and needs a "
                "per-parameter optimizer; optimizer.name allowed: sgd, adagrad, rmsprop, adam, "
                "adamw (or train.schedule greedy)"
            )
        if self.supervised is not None and self.data.source in ("photos", "folder", "shards", "yfcc"):
            raise ValueError("supervised needs labels: data.source digits, npy, lfw or fashion-mnist")
        if (
            self.supervised is not None
            and self.data.source == "npy"
            and self.data.labels_path is None
        ):
            raise ValueError("supervised with data.source npy needs data.labels_path")
        self._communication_fits_optimizer()
        return self

    def _communication_fits_optimizer(self) -> None:
        if self.model.kind == "deep" and self.parallel.compression in ("onebit", "threshold", "adaptive"):
            raise ValueError(
                f"parallel.compression {self.parallel.compression} keeps an error-feedback "
                "residual per gradient tensor, and layer-wise training changes which layers "
                "have gradients from step to step; allowed for model.kind deep: none, fp16, bf16"
            )
        if self.parallel.mode == "hogwild" and self.model.kind == "deep":
            raise ValueError(
                "parallel.mode hogwild trains one model with lock-free workers and has no "
                "layer-wise schedule; allowed for model.kind deep: sync, localsgd"
            )
        lossy = self.parallel.compression in ("onebit", "threshold", "adaptive")
        if self.optimizer.name == "lbfgs" and (lossy or self.parallel.mode != "sync"):
            what = (f"parallel.compression {self.parallel.compression}" if lossy
                    else f"parallel.mode {self.parallel.mode}")
            raise ValueError(
                f"{what} needs a stochastic optimizer (optimizer.name sgd, adagrad, rmsprop, "
                f"adam, adamw): L-BFGS's line search needs exact, synchronized gradients")
