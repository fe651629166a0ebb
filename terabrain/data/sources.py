"""The table of data sources: one entry per ``data.source``, and nothing else in terabrain
branches on it.

Each entry declares its config section (only its own fields: ``terabrain show`` prints no
other source's settings), whether it is streamed or held in memory, whether it has labels,
the shape of one example, how many training rows it has and the bytes the trainer keeps
(what `terabrain plan` counts), and its loader: ``load`` for in-memory sources, ``catalog``
for streamed image collections. The preprocessing after loading (mean removal, LCN, ZCA) is
common to all and lives in terabrain.data.prepare / terabrain.data.streamed_source.

Adding a source is one section class, one ``DataSource`` subclass and one line in
``SOURCES``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal, Optional, Union

import numpy as np
from pydantic import (
    Field,
    PositiveFloat,
    PositiveInt,
    TypeAdapter,
    field_validator,
    model_validator,
)

from terabrain.config.sections import TIMEOUT_LIMIT_S, LCNConfig, Section
from terabrain.data.eight_bit import unit_float_array
from terabrain.data.embedded import PHOTOS
from terabrain.data.labelled import DEBIAN_FASHION_MNIST_DIR, FASHION_MNIST_ENV
from terabrain.errors import ConfigError

if TYPE_CHECKING:
    from terabrain.data.catalogs import Catalog

FP32 = 4


# --- config sections ----------------------------------------------------------------------


class DataSection(Section):
    """Where examples come from and how they are preprocessed (fields common to every source)."""

    remove_mean: bool = Field(
        True, description="Subtract each example's own mean (per channel) before whitening."
    )
    lcn: Optional[LCNConfig] = Field(
        None,
        description="Local contrast normalization of every example, after mean removal and "
        "before whitening (the preprocessing of Le et al. 2012 that Ni et al. 2015 follow).",
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


def _holdout_field(default: int = 5000):
    return Field(default, description="Extra examples kept out of training, for evaluation "
                 "and analysis (streamed: at most a tenth of the collection).")


def _patch_size_field(description: str):
    return Field(8, description=description)


def _test_fraction_field():
    return Field(0.25, gt=0.0, lt=1.0, description="Fraction of the labelled set kept for testing.")


class PhotosData(DataSection):
    """Patches of the natural photographs bundled with scikit-image and scikit-learn."""

    source: Literal["photos"] = "photos"
    photos: list[str] = Field(
        default_factory=lambda: [
            "astronaut", "camera", "coffee", "chelsea", "rocket", "china", "flower",
            "grass", "brick", "clock", "gravel",
        ],
        description=f"Bundled photographs to sample patches from. Available: {', '.join(PHOTOS)}.",
    )
    color: bool = Field(False, description="Keep RGB channels; otherwise convert to grey.")
    patch_size: PositiveInt = _patch_size_field("Side of the square patches (pixels).")
    num_patches: PositiveInt = Field(20000, description="Patches in the training set.")
    holdout_patches: PositiveInt = _holdout_field()

    @model_validator(mode="after")
    def _known_photos(self) -> "PhotosData":
        unknown = [name for name in self.photos if name not in PHOTOS]
        if unknown:
            raise ValueError(f"data.photos: unknown photograph(s) {', '.join(unknown)}; "
                             f"allowed: {', '.join(PHOTOS)}")
        return self


class FaceMixData(DataSection):
    """Unlabelled grey images mixing jittered lfw_subset faces (only those of the face test's
    selection half) with random photo crops (terabrain.data.faces)."""

    source: Literal["face_mix"] = "face_mix"
    patch_size: PositiveInt = _patch_size_field("Side of the square grey images (pixels).")
    num_patches: PositiveInt = Field(20000, description="Images in the training set.")
    holdout_patches: PositiveInt = _holdout_field()
    face_fraction: float = Field(
        0.35, gt=0.0, lt=1.0,
        description="Fraction of the images that are faces (Le et al. 2012: ~35% in their "
        "test set; faces are rarer in their unlabelled frames).",
    )


class DigitsData(DataSection):
    """scikit-learn's 1,797 8x8 digits, with labels."""

    source: Literal["digits"] = "digits"
    test_fraction: float = _test_fraction_field()


class LFWData(DataSection):
    """scikit-image's 200 LFW 25x25 crops, labelled faces / non-faces."""

    source: Literal["lfw"] = "lfw"
    test_fraction: float = _test_fraction_field()


class FashionMNISTData(DataSection):
    """Fashion-MNIST (Debian's dataset-fashion-mnist): train for training, test held out."""

    source: Literal["fashion-mnist"] = "fashion-mnist"
    root: Optional[Path] = Field(
        None, description=f"Directory of the idx files; null: ${FASHION_MNIST_ENV} when set, "
        f"else {DEBIAN_FASHION_MNIST_DIR}.",
    )
    patch_size: Optional[PositiveInt] = Field(
        None, le=28, description="null: whole 28x28 images with their labels; k: unlabelled "
        "k x k patches at random positions of the training images (the test images are never "
        "sampled), as single-layer feature learners are trained (Coates et al. 2011).",
    )
    num_patches: PositiveInt = Field(
        100000, description="With patch_size: patches in the training set.")
    holdout_patches: PositiveInt = Field(
        10000, description="With patch_size: held-out patches, also from training images.")


class StreamedData(DataSection):
    """Fields of every collection read while training runs (docs/data.md)."""

    holdout_patches: PositiveInt = _holdout_field()
    block_size: Optional[PositiveInt] = Field(
        None, description="Read in blocks of this many images, blocks in random order, "
        "shuffled inside (Ni et al. 2015: 960 with train.batch_size 192); a multiple of the batch.",
    )
    workers: int = Field(
        4, ge=0, description="Parallel decoding workers per rank (0: decode in the training "
        "thread, no prefetch).",
    )
    worker_kind: Literal["thread", "process"] = Field(
        "thread", description="Thread pool, or DataLoader worker processes.",
    )
    prefetch: PositiveInt = Field(4, description="Batches read ahead per rank.")
    read_timeout_s: PositiveFloat = Field(
        300.0, le=TIMEOUT_LIMIT_S, description="Stop with an error when no batch arrives for this long.",
    )
    on_error: Literal["skip", "fail"] = Field(
        "skip", description="Unreadable examples: skip and count them (metrics data_skipped), "
        "or stop the run naming the file.",
    )


class NpyData(StreamedData):
    """A float array of shape (N, D) or (N, H, W[, C]) in a .npy file."""

    source: Literal["npy"] = "npy"
    path: Path = Field(description="The .npy file.")
    labels_path: Optional[Path] = Field(
        None, description="Optional .npy of integer labels, one per row of `path`."
    )
    test_fraction: float = _test_fraction_field()
    stream: bool = Field(
        False, description="true streams rows from the memory map instead of loading the array."
    )

    @field_validator("stream", mode="before")
    @classmethod
    def _null_is_false(cls, value):  # earlier layouts wrote null for "load the array"
        return False if value is None else value

    @model_validator(mode="after")
    def _files_exist(self) -> "NpyData":
        for name in ("path", "labels_path"):
            value = getattr(self, name)
            if value is not None and not Path(value).is_file():
                raise ValueError(f"data.{name}: file not found: {value}")
        return self


class ActivationsData(StreamedData):
    """A network's activations: one .npy or .safetensors file of shape (rows, width), or a
    directory of such shards, read in file-name order (terabrain.data.activation_shards).
    For a sparse autoencoder set remove_mean false and whitening none: the model keeps its
    own bias and input scale."""

    source: Literal["activations"] = "activations"
    path: Path = Field(description="A .npy / .safetensors shard, or a directory of them.")
    tensor: Optional[str] = Field(
        None, description="The tensor to read in safetensors shards; null: the only one.")
    test_fraction: float = _test_fraction_field()
    stream: bool = Field(
        False, description="true reads batches from the shards while training (only their "
        "rows are read); false loads every row into memory.")

    @model_validator(mode="after")
    def _path_exists(self) -> "ActivationsData":
        if not Path(self.path).exists():
            raise ValueError(f"data.path: not found: {self.path}")
        return self


class ImageCollectionData(StreamedData):
    """Fields of the streamed image collections (folder, shards, yfcc)."""

    root: Path = Field(description="The image folder (folder, yfcc) or the shards (shards).")
    color: bool = Field(False, description="Keep RGB channels; otherwise convert to grey.")
    crop_size: PositiveInt = Field(
        300, description="The smaller side is scaled to this and the centre crop_size x "
        "crop_size kept (Ni et al. 2015: 300).",
    )
    image_size: Optional[PositiveInt] = Field(
        None, description="Resize the crop to image_size x image_size (null: keep crop_size).",
    )
    patches_per_image: int = Field(
        0, ge=0, description="0 makes each image one example; k > 0 takes k random "
        "patch_size patches from each image (positions seeded by seed, epoch, image).",
    )
    patch_size: PositiveInt = _patch_size_field("With patches_per_image > 0: side of the patches.")
    max_file_bytes: PositiveInt = Field(
        64 * 2**20, le=2**40, description="Largest image file (or shard member) read, in bytes; "
        "a larger one is an unreadable example (data.on_error), so a damaged file cannot "
        "exhaust memory. FIFOs and devices are never read.",
    )

    @model_validator(mode="after")
    def _sizes_fit(self) -> "ImageCollectionData":
        if self.image_size is not None and self.image_size > self.crop_size:
            raise ValueError(f"data.image_size ({self.image_size}) must not exceed "
                             f"data.crop_size ({self.crop_size})")
        if self.patches_per_image and self.patch_size > (self.image_size or self.crop_size):
            raise ValueError(f"data.patch_size ({self.patch_size}) is larger than the "
                             f"{self.image_size or self.crop_size}-pixel images")
        return self


class FolderData(ImageCollectionData):
    """The images under `root` (any depth; JPEG, PNG, ...)."""

    source: Literal["folder"] = "folder"

    @model_validator(mode="after")
    def _root_is_directory(self) -> "FolderData":
        if not Path(self.root).is_dir():
            raise ValueError(f"data.root: not a directory: {self.root}")
        return self


class ShardsData(ImageCollectionData):
    """Tar shards in `root`, or one .tar (see `terabrain data pack`)."""

    source: Literal["shards"] = "shards"
    stage_dir: Optional[Path] = Field(
        None, description="Copy shards to this node-local directory in the background, "
        "verify their checksums, read the local copies once complete.",
    )
    stage_wait: bool = Field(
        False, description="With stage_dir: finish staging this rank's shards before the first "
        "step (stage, then train) instead of training from the shared file system meanwhile.",
    )
    order: Literal["global", "shard_affine"] = Field(
        "global", description="global: every epoch a shuffle of the whole collection (each "
        "rank reads from every shard); shard_affine: each data-parallel replica owns a fixed, "
        "size-balanced set of shards and shuffles only its own examples, so stage_dir holds "
        "only the shards of that node's ranks; every replica takes min-share // batch steps "
        "per epoch and the rest of larger shares waits, in rotation (docs/data.md).",
    )

    @model_validator(mode="after")
    def _shard_options_fit(self) -> "ShardsData":
        if not Path(self.root).exists():
            raise ValueError(f"data.root: not found: {self.root}")
        if self.stage_wait and self.stage_dir is None:
            raise ValueError("data.stage_wait needs data.stage_dir (the directory to stage into)")
        if self.order == "shard_affine" and self.block_size is not None:
            raise ValueError("data.order: shard_affine does not combine with data.block_size "
                             "(set data.block_size null, or use data.order global)")
        return self


class YFCCData(ImageCollectionData):
    """A YFCC100M metadata file with its images under `root` (Thomee et al. 2016)."""

    source: Literal["yfcc"] = "yfcc"
    metadata: Path = Field(
        description="The YFCC100M metadata file (tab-separated, 23 or 25 columns; .bz2 and "
        ".gz are read directly).",
    )
    yfcc_media: Literal["photo", "video", "any"] = Field(
        "photo", description="Keep photos, videos (their still images) or both."
    )
    yfcc_tags_any: list[str] = Field(
        default_factory=list, description="Keep lines with at least one of these user tags."
    )
    yfcc_tags_all: list[str] = Field(
        default_factory=list, description="Keep lines with all of these user tags."
    )
    yfcc_tags_none: list[str] = Field(
        default_factory=list, description="Drop lines with any of these user tags."
    )
    yfcc_layout: Literal["hash", "id"] = Field(
        "hash", description="Image paths under `root`: hash: <h[:3]>/<h[3:6]>/<h>.jpg "
        "(Multimedia Commons mirror, 25-column file); id: <photo id>.<extension>.",
    )
    index_dir: Optional[Path] = Field(
        None, description="Where the catalog index of `metadata` is kept (`terabrain data "
        "index`; built by the first run if missing or stale, then memory-mapped); null: beside "
        "the metadata file. A node-local directory works: rank 0 of each node builds its own.",
    )

    @model_validator(mode="after")
    def _files_exist(self) -> "YFCCData":
        if not Path(self.root).is_dir():
            raise ValueError(f"data.root: not a directory: {self.root}")
        if not Path(self.metadata).is_file():
            raise ValueError(f"data.metadata: file not found: {self.metadata}")
        return self


# --- the sources --------------------------------------------------------------------------


@dataclass
class Loaded:
    """An in-memory source's examples as rows, before the common preprocessing."""

    train: np.ndarray
    holdout: np.ndarray
    shape: tuple[int, ...]
    """One example as an image: (H, W) or (H, W, C), or (D,) for plain vectors."""
    labels: Optional[tuple[np.ndarray, np.ndarray]] = None


def preprocessed(config: DataSection) -> bool:
    """Whether the examples are transformed after loading (then they are floats)."""
    return config.remove_mean or config.lcn is not None or config.whitening == "zca"


def _test_rows(rows: int, fraction: float) -> int:
    """Rows a labelled set keeps for testing: ``test_fraction`` of them, at least one."""
    return max(1, int(round(rows * fraction)))


def _training_rows(rows: int, fraction: float) -> int:
    return rows - _test_rows(rows, fraction)


def _split_labelled(data: np.ndarray, labels: Optional[np.ndarray], shape: tuple[int, ...],
                    fraction: float, rng: np.random.Generator) -> Loaded:
    order = rng.permutation(len(data))
    test = _test_rows(len(data), fraction)
    train_rows, test_rows = order[test:], order[:test]
    split_labels = None if labels is None else (labels[train_rows], labels[test_rows])
    return Loaded(data[train_rows], data[test_rows], shape, split_labels)


class DataSource:
    """What terabrain needs to know about one kind of data (see the module docstring)."""

    name: str = ""
    section: type[DataSection] = DataSection
    labelled: bool = False
    analysis_data: str = "holdout"
    """The default data set of `terabrain analyze` for runs trained on this source."""

    def streamed(self, config: DataSection) -> bool:
        return False

    def class_names(self, config: DataSection) -> list[str] | None:
        """The labels' names, by class number (None: the numbers themselves)."""
        return None

    def has_labels(self, config: DataSection) -> bool:
        """Whether the configured data carries labels (a supervised stage needs them)."""
        return self.labelled

    def example_shape(self, config: DataSection) -> tuple[int, ...]:
        """One example as an image, from the config alone (no image is decoded)."""
        raise NotImplementedError

    def training_rows(self, config: DataSection) -> Optional[int]:
        """Training examples, from the config alone; None for a streamed collection (it is
        known only once the collection is listed)."""
        raise NotImplementedError

    def resident_bytes(self, config: DataSection) -> int:
        """Bytes of training data every rank keeps on its device (fp32 rows); 0 when streamed."""
        rows = self.training_rows(config)
        if self.streamed(config) or rows is None:
            return 0
        return FP32 * rows * math.prod(self.example_shape(config))

    def load(self, config: DataSection, rng: np.random.Generator) -> Loaded:
        raise NotImplementedError(f"data.source {self.name} is streamed")

    # Streamed sources (terabrain.data.streamed_source reads them while training runs).

    def catalog(self, config: DataSection) -> Optional["Catalog"]:
        """The listing of a streamed image collection (None for arrays and in-memory sets)."""
        return None

    def stream_reader(self, config: DataSection, seed: int, catalog: Optional["Catalog"]):
        """Example i of the collection as rows (terabrain.data.examples)."""
        raise NotImplementedError(f"data.source {self.name} is not streamed")

    def location(self, config: DataSection) -> str:
        """Where a streamed collection lives, for messages."""
        return ""

    def sample_order(self, config: DataSection) -> str:
        """global (a shuffle of the whole collection) or shard_affine (shards only)."""
        return "global"

    def stage_dir(self, config: DataSection) -> Optional[Path]:
        """The node-local directory a collection is staged into (shards only)."""
        return None

    def reading(self, config: DataSection) -> tuple[str, float]:
        """What reading one training example costs, for `terabrain plan --profile`:
        ("resident", 0) when the set stays in memory, ("pixels", bytes) for arrays read as
        they are, ("jpeg", pixels decoded) for encoded images."""
        if not self.streamed(config):
            return "resident", 0.0
        return "pixels", float(math.prod(self.example_shape(config)))


class PhotosSource(DataSource):
    name, section = "photos", PhotosData

    def example_shape(self, config: PhotosData) -> tuple[int, ...]:
        return (config.patch_size, config.patch_size) + ((3,) if config.color else ())

    def training_rows(self, config: PhotosData) -> int:
        return config.num_patches

    def resident_bytes(self, config: PhotosData) -> int:
        """Held as 8-bit pixels unless preprocessed (terabrain.data.eight_bit)."""
        per_value = FP32 if preprocessed(config) else 1
        return per_value * config.num_patches * math.prod(self.example_shape(config))

    def load(self, config: PhotosData, rng: np.random.Generator) -> Loaded:
        from terabrain.data.embedded import load_photo
        from terabrain.data.patches import sample_patches

        # Without preprocessing the set is kept as its 8-bit pixels (terabrain.data.eight_bit).
        eight_bit = not preprocessed(config)
        images = [load_photo(name, config.color, eight_bit) for name in config.photos]
        if len({image.dtype for image in images}) > 1:  # a grey photograph among colour ones
            images = [unit_float_array(image) for image in images]
        largest = max(min(image.shape[:2]) for image in images)
        if config.patch_size > largest:
            raise ConfigError(
                f"data.patch_size: {config.patch_size} is larger than every photograph in "
                f"data.photos (the largest square that fits is {largest}x{largest} pixels)")
        patches = sample_patches(
            images, config.patch_size, config.num_patches + config.holdout_patches, rng
        )
        return Loaded(patches[: config.num_patches], patches[config.num_patches :],
                      self.example_shape(config))


class FaceMixSource(DataSource):
    name, section, analysis_data = "face_mix", FaceMixData, "faces"

    def example_shape(self, config: FaceMixData) -> tuple[int, ...]:
        return (config.patch_size, config.patch_size)

    def training_rows(self, config: FaceMixData) -> int:
        return config.num_patches

    def load(self, config: FaceMixData, rng: np.random.Generator) -> Loaded:
        from terabrain.data.faces import face_mix

        images = face_mix(config.num_patches + config.holdout_patches, config.patch_size,
                          config.face_fraction, rng)
        return Loaded(images[: config.num_patches], images[config.num_patches :],
                      self.example_shape(config))


class DigitsSource(DataSource):
    name, section, labelled = "digits", DigitsData, True
    ROWS = 1797  # scikit-learn's digits

    def example_shape(self, config: DigitsData) -> tuple[int, ...]:
        return (8, 8)

    def training_rows(self, config: DigitsData) -> int:
        return _training_rows(self.ROWS, config.test_fraction)

    def load(self, config: DigitsData, rng: np.random.Generator) -> Loaded:
        from terabrain.data.embedded import load_digits

        data, labels = load_digits()
        return _split_labelled(data, labels, (8, 8), config.test_fraction, rng)


class LFWSource(DataSource):
    name, section, labelled = "lfw", LFWData, True
    ROWS, SIDE = 200, 25  # scikit-image's lfw_subset: 100 faces, 100 non-faces

    def example_shape(self, config: LFWData) -> tuple[int, ...]:
        return (self.SIDE, self.SIDE)

    def training_rows(self, config: LFWData) -> int:
        return _training_rows(self.ROWS, config.test_fraction)

    def load(self, config: LFWData, rng: np.random.Generator) -> Loaded:
        from terabrain.data.labelled import load_lfw_subset

        images, labels = load_lfw_subset()
        return _split_labelled(images.reshape(len(images), -1), labels,
                               tuple(images.shape[1:]), config.test_fraction, rng)


class FashionMNISTSource(DataSource):
    name, section, labelled = "fashion-mnist", FashionMNISTData, True
    TRAIN_ROWS, SIDE = 60000, 28

    def has_labels(self, config: FashionMNISTData) -> bool:
        return config.patch_size is None

    def class_names(self, config: FashionMNISTData) -> list[str] | None:
        from terabrain.data.labelled import FASHION_MNIST_CLASSES

        return list(FASHION_MNIST_CLASSES)

    def example_shape(self, config: FashionMNISTData) -> tuple[int, ...]:
        side = config.patch_size or self.SIDE
        return (side, side)

    def training_rows(self, config: FashionMNISTData) -> int:
        return self.TRAIN_ROWS if config.patch_size is None else config.num_patches

    def load(self, config: FashionMNISTData, rng: np.random.Generator) -> Loaded:
        from terabrain.data.labelled import load_fashion_mnist
        from terabrain.data.patches import sample_patches

        try:  # the published split: train for training, test held out
            train, train_labels = load_fashion_mnist("train", config.root)
            test, test_labels = (None, None) if config.patch_size else load_fashion_mnist(
                "test", config.root)
        except (FileNotFoundError, ValueError) as error:
            raise ConfigError(f"data.source fashion-mnist: {error}") from None
        if config.patch_size:
            patches = sample_patches(list(train), config.patch_size,
                                     config.num_patches + config.holdout_patches, rng)
            return Loaded(patches[: config.num_patches], patches[config.num_patches :],
                          self.example_shape(config))
        return Loaded(train.reshape(len(train), -1), test.reshape(len(test), -1),
                      tuple(train.shape[1:]), (train_labels, test_labels))


def open_npy(path: Path) -> np.ndarray:
    """The array of a .npy file as a memory map (nothing is read beyond the header)."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as error:
        raise ConfigError(f"data.path: cannot read {path} as .npy: {error}") from None
    if array.ndim < 2 or not np.issubdtype(array.dtype, np.number):
        raise ConfigError(
            f"data.path: expected a numeric array of shape (N, D) or (N, H, W[, C]), "
            f"got {array.dtype} {array.shape}"
        )
    return array


def _npy_example_shape(array: np.ndarray) -> tuple[int, ...]:
    """(H, W[, C]) for an (N, H, W[, C]) array; (D,) for rows of plain vectors."""
    return tuple(array.shape[1:]) if array.ndim > 2 else (array.shape[1],)


class NpySource(DataSource):
    name, section = "npy", NpyData

    def has_labels(self, config: NpyData) -> bool:
        return config.labels_path is not None and not config.stream

    def streamed(self, config: NpyData) -> bool:
        return config.stream

    def example_shape(self, config: NpyData) -> tuple[int, ...]:
        return _npy_example_shape(open_npy(config.path))

    def reading(self, config: NpyData) -> tuple[str, float]:
        if not config.stream:
            return "resident", 0.0
        array = open_npy(config.path)
        return "pixels", float(array.itemsize * math.prod(array.shape[1:]))

    def training_rows(self, config: NpyData) -> Optional[int]:
        if config.stream:
            return None
        return _training_rows(open_npy(config.path).shape[0], config.test_fraction)

    def stream_reader(self, config: NpyData, seed: int, catalog: None):
        from terabrain.data.examples import ArrayExamples

        return ArrayExamples(open_npy(config.path), str(config.path))

    def location(self, config: NpyData) -> str:
        return str(config.path)

    def load(self, config: NpyData, rng: np.random.Generator) -> Loaded:
        array = open_npy(config.path)
        shape = _npy_example_shape(array)
        data = np.asarray(array, dtype=np.float32).reshape(len(array), -1)
        labels = None
        if config.labels_path is not None:
            labels = np.load(config.labels_path, allow_pickle=False)
            if len(labels) != len(data):
                raise ConfigError(
                    f"data.labels_path: {len(labels)} labels for {len(data)} rows in data.path"
                )
        return _split_labelled(data, labels, shape, config.test_fraction, rng)


def open_activations(config: ActivationsData):
    from terabrain.data.activation_shards import ActivationShards, ShardError

    try:
        return ActivationShards(config.path, config.tensor)
    except ShardError as error:
        raise ConfigError(f"data.path: {error}") from None


class ActivationsSource(DataSource):
    name, section = "activations", ActivationsData

    def streamed(self, config: ActivationsData) -> bool:
        return config.stream

    def example_shape(self, config: ActivationsData) -> tuple[int, ...]:
        return (open_activations(config).shape[1],)

    def training_rows(self, config: ActivationsData) -> Optional[int]:
        if config.stream:
            return None
        return _training_rows(len(open_activations(config)), config.test_fraction)

    def stream_reader(self, config: ActivationsData, seed: int, catalog: None):
        from terabrain.data.examples import ArrayExamples

        return ArrayExamples(open_activations(config), str(config.path))

    def location(self, config: ActivationsData) -> str:
        return str(config.path)

    def load(self, config: ActivationsData, rng: np.random.Generator) -> Loaded:
        shards = open_activations(config)
        data = shards.rows(0, len(shards))
        return _split_labelled(data, None, (data.shape[1],), config.test_fraction, rng)


class ImageCollectionSource(DataSource):
    """Streamed image collections: examples are whole images or patches of them."""

    def streamed(self, config: ImageCollectionData) -> bool:
        return True

    def example_shape(self, config: ImageCollectionData) -> tuple[int, ...]:
        side = config.patch_size if config.patches_per_image else (config.image_size or config.crop_size)
        return (side, side) + ((3,) if config.color else ())

    def training_rows(self, config: ImageCollectionData) -> None:
        return None

    def stream_reader(self, config: ImageCollectionData, seed: int, catalog: "Catalog"):
        from terabrain.data.decode import ImageSpec
        from terabrain.data.examples import ImageExamples

        spec = ImageSpec(config.crop_size, config.image_size, config.color)
        return ImageExamples(catalog, spec, seed, config.patch_size, config.patches_per_image)

    def location(self, config: ImageCollectionData) -> str:
        return str(config.root)

    def reading(self, config: ImageCollectionData) -> tuple[str, float]:
        # One decoded image (its crop, at least the example's size) yields patches_per_image
        # examples; decoding cost is counted on the crop (the original's size is not known).
        side = max(config.crop_size or 0, config.image_size or 0, config.patch_size or 0)
        pixels = side * side * (3 if config.color else 1) / max(1, config.patches_per_image or 1)
        return "jpeg", float(pixels)


class FolderSource(ImageCollectionSource):
    name, section = "folder", FolderData

    def catalog(self, config: FolderData) -> "Catalog":
        from terabrain.data.catalogs import FolderCatalog

        return FolderCatalog(config.root, config.max_file_bytes)


class ShardsSource(ImageCollectionSource):
    name, section = "shards", ShardsData

    def sample_order(self, config: ShardsData) -> str:
        return config.order

    def stage_dir(self, config: ShardsData) -> Optional[Path]:
        return config.stage_dir

    def reading(self, config: ShardsData) -> tuple[str, float]:
        """A pre-decoded pack (`data pack --decode`, its index has "decoded") is read as
        uint8 pixels; otherwise, and when the pack is not there to look at, as JPEG."""
        import json

        from terabrain.data.shards import INDEX_NAME

        try:
            decoded = json.loads((Path(config.root) / INDEX_NAME).read_text()).get("decoded")
        except (OSError, ValueError, AttributeError):
            decoded = None
        if decoded is not None:
            return "pixels", float(math.prod(self.example_shape(config)))
        return super().reading(config)

    def catalog(self, config: ShardsData) -> "Catalog":
        from terabrain.data.catalogs import ShardCatalog

        try:
            return ShardCatalog(config.root, config.max_file_bytes)
        except (ValueError, OSError) as error:
            raise ConfigError(f"data.root: {error}") from None


class YFCCSource(ImageCollectionSource):
    name, section = "yfcc", YFCCData

    def catalog(self, config: YFCCData) -> "Catalog":
        from terabrain.data.catalogs import IndexedYFCCCatalog
        from terabrain.data.yfcc import YFCCFilter
        from terabrain.data.yfcc_index_build import prepare_selection
        from terabrain.parallel.launch import detect_launch_env

        keep = YFCCFilter(config.yfcc_media, tuple(t.lower() for t in config.yfcc_tags_any),
                          tuple(t.lower() for t in config.yfcc_tags_all),
                          tuple(t.lower() for t in config.yfcc_tags_none))
        workers = max(1, min(config.workers, os.cpu_count() or 1))
        try:
            index, selection = prepare_selection(
                config.metadata, config.index_dir, keep, config.yfcc_layout,
                builder=detect_launch_env().local_rank == 0, workers=workers)
        except OSError as error:
            where = config.index_dir or Path(config.metadata).parent
            raise ConfigError(f"data.index_dir: cannot write the catalog index in {where} ({error}); "
                              "set data.index_dir to a writable directory") from None
        return IndexedYFCCCatalog(index, selection, config.root, config.yfcc_layout, str(config.metadata),
                                  config.max_file_bytes)


SOURCES: dict[str, DataSource] = {source.name: source for source in (
    PhotosSource(), DigitsSource(), NpySource(), ActivationsSource(), LFWSource(),
    FashionMNISTSource(),
    FolderSource(), ShardsSource(), YFCCSource(), FaceMixSource(),
)}
DEFAULT_SOURCE = "photos"

DataConfig = Annotated[
    Union[tuple(source.section for source in SOURCES.values())],  # type: ignore[misc]
    Field(discriminator="source"),
]
_DATA_ADAPTER = TypeAdapter(DataConfig)


def source_of(config: DataSection) -> DataSource:
    return SOURCES[config.source]


def data_config(**fields) -> DataSection:
    """A validated data section, for code and tests that build one without an experiment."""
    fields.setdefault("source", DEFAULT_SOURCE)
    return _DATA_ADAPTER.validate_python(fields)
