"""Faces among other things, as in Le et al. 2012's face-neuron test, from offline data.

The labelled test set: scikit-image's ``lfw_subset`` (100 faces, 100 non-faces, 25x25 grey)
plus random crops of the bundled photographs, so that about 35% of the images are faces, as
in Le et al. It is split in two halves once, by a fixed permutation: ``selection`` (where a
neuron and its threshold are chosen) and ``heldout`` (where the accuracy is reported).

The unlabelled training mix (``data.source: face_mix``) draws its faces only from the
selection half, so the held-out faces are never seen in training either; Le et al. trained on
unlabelled video frames in which faces are a small fraction of the content.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from terabrain.data.embedded import load_photo
from terabrain.data.labelled import load_lfw_subset

FACE_SIDE = 25
# Photographs without human faces (astronaut and camera show people).
NEGATIVE_PHOTOS = ("coffee", "chelsea", "rocket", "china", "flower", "grass", "brick", "clock",
                   "gravel", "coins", "moon")
PHOTO_CROPS_PER_SPLIT = 43  # 50 faces among 50 + 50 + 43 images: 35.0% faces
_SPLIT_SEED = 2012


def resize(images: np.ndarray, side: int) -> np.ndarray:
    """(N, H, W[, C]) float images to (N, side, side[, C]), antialiased bilinear."""
    if images.shape[1] == side and images.shape[2] == side:
        return images.astype(np.float32)
    tensor = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    colour = tensor.dim() == 4
    tensor = tensor.permute(0, 3, 1, 2) if colour else tensor[:, None]
    out = F.interpolate(tensor, size=(side, side), mode="bilinear", antialias=True,
                        align_corners=False)
    out = out.permute(0, 2, 3, 1) if colour else out[:, 0]
    return out.clamp(0.0, 1.0).numpy()


def photo_crops(count: int, side: int, rng: np.random.Generator,
                photos: tuple[str, ...] = NEGATIVE_PHOTOS, min_side: int = 25,
                max_side: int = 160) -> np.ndarray:
    """``count`` square grey crops of random size (``min_side`` to ``max_side`` pixels) from
    random places in ``photos``, each resized to ``side`` x ``side``: objects and textures at
    about the scale of a face crop."""
    images = [_photo(name) for name in photos]
    out = np.empty((count, side, side), np.float32)
    for index in range(count):
        image = images[rng.integers(len(images))]
        size = int(rng.integers(min_side, min(max_side, *image.shape) + 1))
        top = rng.integers(0, image.shape[0] - size + 1)
        left = rng.integers(0, image.shape[1] - size + 1)
        out[index] = resize(image[None, top : top + size, left : left + size], side)[0]
    return out


@functools.lru_cache(maxsize=None)
def _photo(name: str) -> np.ndarray:
    return load_photo(name)


def _halves(count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    order = rng.permutation(count)
    return np.sort(order[: count // 2]), np.sort(order[count // 2 :])


def face_test_set() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"selection": (images, labels), "heldout": (images, labels)}``; images (N, 25, 25)
    in [0, 1], labels 1 for a face. Each half: 50 faces, 50 lfw non-faces, 43 photo crops."""
    return {name: (images.copy(), labels.copy()) for name, (images, labels) in _face_test_set().items()}


@functools.lru_cache(maxsize=1)
def _face_test_set() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    images, labels = load_lfw_subset()
    rng = np.random.default_rng(_SPLIT_SEED)
    faces, others = images[labels == 1], images[labels == 0]
    face_halves, other_halves = _halves(len(faces), rng), _halves(len(others), rng)
    splits = {}
    for name, face_rows, other_rows in zip(("selection", "heldout"), face_halves, other_halves):
        crops = photo_crops(PHOTO_CROPS_PER_SPLIT, FACE_SIDE, rng)
        split_images = np.concatenate([faces[face_rows], others[other_rows], crops])
        split_labels = np.r_[np.ones(len(face_rows)), np.zeros(len(other_rows) + len(crops))]
        splits[name] = (split_images.astype(np.float32), split_labels.astype(np.int64))
    return splits


def training_faces() -> np.ndarray:
    """The faces that unsupervised training may use: those of the selection half."""
    images, labels = face_test_set()["selection"]
    return images[labels == 1]


def _jitter(face: np.ndarray, side: int, rng: np.random.Generator) -> np.ndarray:
    """A face mirrored at random, zoomed by 0.85-1.15 and shifted by up to 2 pixels."""
    if rng.random() < 0.5:
        face = face[:, ::-1]
    zoom = rng.uniform(0.85, 1.15)
    crop = int(round(FACE_SIDE / zoom))
    padded = np.pad(face, FACE_SIDE, mode="reflect")
    centre = FACE_SIDE + FACE_SIDE // 2 + rng.integers(-2, 3, size=2)
    top, left = centre - crop // 2
    return resize(padded[None, top : top + crop, left : left + crop], side)[0]


def face_mix(count: int, side: int, face_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Unlabelled training images, rows of ``side * side``: jittered training faces (a
    fraction ``face_fraction``) among random photo crops, shuffled."""
    faces = training_faces()
    face_count = int(round(count * face_fraction))
    jittered = [_jitter(faces[rng.integers(len(faces))], side, rng) for _ in range(face_count)]
    crops = photo_crops(count - face_count, side, rng)
    mixed = np.concatenate([np.stack(jittered) if jittered else crops[:0], crops])
    return mixed[rng.permutation(count)].reshape(count, side * side)
