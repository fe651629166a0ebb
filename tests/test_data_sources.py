"""Sources and the seed-000 preprocessing: image folders, tar shards (empty, truncated,
``../`` members), YFCC100M metadata with tag and media filters, lfw, Fashion-MNIST."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from collections_for_tests import image_bytes, image_id, write_raw_shards
from terabrain.data.sources import data_config
from terabrain.data.catalogs import ShardCatalog
from terabrain.data.decode import BadSample, ImageSpec, decode
from terabrain.data.labelled import fashion_mnist_available
from terabrain.data.prepare import prepare_data
from terabrain.data.yfcc import COLUMNS_25


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def test_seed_000_centre_scale_and_crop():
    # 600 wide, 400 high: three vertical bands, the middle one (200..400) white. Scaling
    # the smaller side to 300 makes it 450 x 300; the centre 300 x 300 crop keeps columns
    # 75..375 of the scaled image, so the white band (150..300 scaled) sits at 75..225.
    array = np.zeros((400, 600), np.uint8)
    array[:, 200:400] = 255
    out = decode(_png(array), "bands.png", ImageSpec(crop=300))
    assert out.shape == (300, 300) and out.dtype == np.float32
    assert out[:, 80:220].min() > 0.99 and out[:, :70].max() < 0.01 and out[:, 230:].max() < 0.01
    # A tall image: the crop is taken from the vertical centre; then resized to 32.
    tall = np.zeros((900, 300, 3), np.uint8)
    tall[300:600] = (255, 0, 0)
    small = decode(_png(tall), "tall.png", ImageSpec(crop=300, size=32, color=True))
    assert small.shape == (32, 32, 3)
    assert small[..., 0].min() > 0.99 and small[..., 1].max() < 0.01
    # Small images are scaled up to the crop size (Ni et al. 2015: the smaller side becomes 300).
    assert decode(image_bytes(5, size=(40, 30)), "tiny.png", ImageSpec(crop=300)).shape == (300, 300)


def test_damaged_images_are_bad_samples_never_partial_images():
    whole = image_bytes(10, "jpeg", (300, 200))
    with pytest.raises(BadSample, match="truncated.jpg.*truncated"):
        decode(whole[: len(whole) // 2], "truncated.jpg", ImageSpec(64))
    with pytest.raises(BadSample, match="unknown format"):
        decode(b"GIF89a but not really", "fake.gif", ImageSpec(64))
    with pytest.raises(BadSample, match="empty"):
        decode(b"", "empty.png", ImageSpec(64))


def test_raw_shards_refuse_escaping_members_and_keep_what_is_intact(tmp_path):
    info = write_raw_shards(tmp_path / "shards", 10)
    catalog = ShardCatalog(tmp_path / "shards")
    problems = dict(catalog.problems)
    assert any(info["refused"] in name and "refused" in why for name, why in problems.items())
    assert any(name.endswith("a-002.tar") and "empty shard" in why for name, why in problems.items())
    assert any(name.endswith("a-003.tar:t1.png") and "truncated" in why for name, why in problems.items())
    assert len(catalog) == info["good"]  # 10 + the intact member of the truncated shard
    ids = sorted(image_id(decode(catalog.read(i), catalog.name(i), ImageSpec(8))) for i in range(len(catalog)))
    assert ids == list(range(10)) + [61]
    assert all(".cls" not in catalog.name(i) for i in range(len(catalog)))


def _yfcc_line(line: int, photo: int, tags: str, marker: str, extension: str = "jpg") -> str:
    digest = f"{photo:032x}"
    row = dict.fromkeys(COLUMNS_25, "")
    row.update(line=str(line), id=str(photo), hash=digest, user_nsid="12345678@N00",
               user_nickname="someone", date_taken="2013-06-01 10:00:00.0", date_uploaded="1370080800",
               capture_device="Canon+EOS+5D", title="a+title", description="", user_tags=tags,
               longitude="", latitude="", accuracy="", page_url=f"http://www.flickr.com/photos/x/{photo}/",
               download_url=f"http://farm1.staticflickr.com/1/{photo}_abc.jpg",
               license_name="Attribution License", license_url="http://creativecommons.org/licenses/by/2.0/",
               server_id="1", farm_id="1", secret="abc", secret_original="def", extension=extension,
               marker=marker)
    return "\t".join(row[c] for c in COLUMNS_25)


def test_yfcc_metadata_filters_and_hash_layout(tmp_path):
    root = tmp_path / "images"
    lines = []
    entries = [  # photo id, tags, marker (0 photo, 1 video), image present
        (101, "new+york,city,night", "0", True),
        (102, "beach,sunset", "0", True),
        (103, "city,people", "0", True),
        (104, "city", "1", True),       # a video
        (105, "cat,city", "0", True),   # excluded by tags_none
        (106, "city", "0", False),      # listed, image missing
        (107, "city,bridge", "0", True),
        (108, "City,river", "0", True),  # tags compare case-insensitively
    ]
    for number, (photo, tags, marker, present) in enumerate(entries):
        lines.append(_yfcc_line(number, photo, tags, marker))
        if present:
            digest = f"{photo:032x}"
            folder = root / digest[:3] / digest[3:6]
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{digest}.jpg").write_bytes(image_bytes(photo - 100, "jpeg"))
    lines.append("too\tfew\tcolumns")
    metadata = tmp_path / "yfcc100m_dataset"
    metadata.write_text("\n".join(lines) + "\n")

    config = data_config(source="yfcc", metadata=metadata, root=root, yfcc_tags_any=["city", "new york"],
                        yfcc_tags_none=["cat"], crop_size=16, remove_mean=False, whitening="none",
                        holdout_patches=1)
    data = prepare_data(config, seed=0)
    source = data.stream
    # 101, 103, 106, 107, 108 (104 is a video, 105 has "cat", 102 none of the tags)
    assert len(source.catalog) == 5
    assert any("3 columns" in why for _, why in source.problems)
    stream = source.open(2, None, torch.device("cpu"))
    seen = [image_id(r) for r in stream.batch(0)[0].numpy()]
    missing = sum(1 for i in stream.local_ids(0) if not Path(source.catalog.name(int(i))).exists())
    assert set(seen) <= {1, 3, 7, 8} and len(seen) == 2  # a missing image is replaced, not dropped
    assert stream.metrics()["data_skipped"] == missing
    stream.close()
    # Videos only, by id layout (the 23-column release names files <id>.<extension>).
    videos = data_config(source="yfcc", metadata=metadata, root=root, yfcc_media="video", yfcc_layout="id")
    from terabrain.data.sources import source_of

    catalog = source_of(videos).catalog(videos)
    assert [catalog.name(i) for i in range(len(catalog))] == [str(root / "104.jpg")]
    # Both selections came from one index beside the metadata file, parsed once.
    assert (tmp_path / "yfcc100m_dataset.tbindex").is_file()
    assert len(list(tmp_path.glob("yfcc100m_dataset.tbindex.select-*.npy"))) == 2


def test_lfw_source_is_labelled_faces():
    data = prepare_data(data_config(source="lfw", whitening="none"), seed=0)
    assert data.example_shape == (25, 25)
    assert len(data.train_x) + len(data.holdout_x) == 200 and data.num_classes == 2


@pytest.mark.skipif(not fashion_mnist_available(), reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_source_uses_the_published_split():
    data = prepare_data(data_config(source="fashion-mnist", whitening="none", remove_mean=False), seed=0)
    assert data.train_x.shape == (60000, 784) and data.holdout_x.shape == (10000, 784)
    assert data.example_shape == (28, 28) and data.num_classes == 10
    assert 0.0 <= float(data.train_x.min()) and float(data.train_x.max()) <= 1.0


@pytest.mark.skipif(not fashion_mnist_available(), reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_patches_are_unlabelled_windows_of_training_images():
    from terabrain.data.sources import source_of

    config = data_config(source="fashion-mnist", patch_size=6, num_patches=300,
                         holdout_patches=50, whitening="none", remove_mean=False)
    assert not source_of(config).has_labels(config)
    assert source_of(config).training_rows(config) == 300
    data = prepare_data(config, seed=0)
    assert data.train_x.shape == (300, 36) and data.holdout_x.shape == (50, 36)
    assert data.example_shape == (6, 6) and data.train_y is None
    assert 0.0 <= float(data.train_x.min()) and float(data.train_x.max()) <= 1.0
    with pytest.raises(ValueError, match="patch_size"):
        data_config(source="fashion-mnist", patch_size=29)


def test_data_lcn_normalizes_every_example_in_memory_and_streamed(tmp_path):
    from terabrain.data.sources import data_config
    from terabrain.data.prepare import prepare_data

    config = data_config(source="photos", patch_size=16, num_patches=64, holdout_patches=16,
                        whitening="none", lcn={"kernel": 5})
    data = prepare_data(config, seed=0)
    images = data.train_x.view(-1, 16, 16)
    # After LCN each image has (near) zero mean locally; its overall mean is ~0 too.
    assert images.mean(dim=(1, 2)).abs().max() < 0.2
    plain = prepare_data(config.model_copy(update={"lcn": None}), seed=0)
    assert not torch.allclose(plain.train_x, data.train_x)
