"""The decoded-image cache: exact pixels, quarantine, and rebuilds that redo only what changed."""

from __future__ import annotations

import os
import pickle

import numpy as np
import polars as pl
from PIL import Image

from kad_pipeline.images.cache import ImageCache, build_image_cache
from kad_pipeline.images.io import decode_image, resize_square


def _write_images(folder, count=4, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for number in range(count):
        path = folder / f"img{number}.png"
        Image.fromarray(rng.integers(0, 255, (40, 30), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def _manifest(paths):
    return pl.DataFrame({"image_id": [os.path.basename(path).split(".")[0] for path in paths], "path": paths})


def test_cache_stores_exact_resized_pixels(tmp_path):
    paths = _write_images(tmp_path / "images")
    result = build_image_cache(_manifest(paths), tmp_path / "cache", size=16, shard_size=3)
    assert result.stats["decoded"] == 4
    assert result.stats["shards_written"] == 2  # 3 + 1 rows
    cache = result.cache
    assert len(cache) == 4
    assert cache.size == 16
    for path in paths:
        image_id = os.path.basename(path).split(".")[0]
        expected = resize_square(decode_image(path), 16)
        assert np.array_equal(cache.get(image_id), expected)


def test_broken_images_are_quarantined(tmp_path):
    paths = _write_images(tmp_path / "images", count=2)
    data = open(paths[1], "rb").read()
    truncated = tmp_path / "images" / "cut.png"
    truncated.write_bytes(data[: len(data) // 2])
    (tmp_path / "images" / "text.png").write_text("not a png")
    manifest = _manifest(paths + [str(truncated), str(tmp_path / "images" / "text.png"), str(tmp_path / "gone.png")])
    manifest = pl.concat([manifest, manifest.head(1)])  # a duplicate id

    result = build_image_cache(manifest, tmp_path / "cache", size=8)
    reasons = dict(zip(result.quarantine["image_id"].to_list(), result.quarantine["reason"].to_list()))
    assert reasons == {"cut": "truncated", "text": "unreadable", "gone": "missing", "img0": "duplicate-id"}
    assert sorted(result.cache.image_ids) == ["img0", "img1"]


def test_rebuild_decodes_only_changes(tmp_path):
    paths = _write_images(tmp_path / "images")
    cache_dir = tmp_path / "cache"
    build_image_cache(_manifest(paths), cache_dir, size=16)

    again = build_image_cache(_manifest(paths), cache_dir, size=16)
    assert again.stats["decoded"] == 0
    assert again.stats["reused"] == 4
    assert again.stats["shards_written"] == 0

    changed = np.full((40, 30), 200, dtype=np.uint8)
    Image.fromarray(changed).save(paths[2])
    os.utime(paths[2], ns=(1, 1))  # a new mtime as well, like a copy tool would leave
    after_edit = build_image_cache(_manifest(paths), cache_dir, size=16)
    assert after_edit.stats["decoded"] == 1
    assert after_edit.stats["reused"] == 3
    assert after_edit.stats["shards_removed"] == 0  # the first shard still contains the other three
    assert np.array_equal(after_edit.cache.get("img2"), np.full((16, 16), 200, dtype=np.uint8))

    dropped = build_image_cache(_manifest(paths[:2]), cache_dir, size=16)
    assert sorted(dropped.cache.image_ids) == ["img0", "img1"]
    assert dropped.stats["shards_removed"] == 1  # the shard with only the edited img2 is gone
    assert len(list((cache_dir / "shards").glob("*.npy"))) == 1


def test_same_content_under_new_path_is_reused(tmp_path):
    paths = _write_images(tmp_path / "images", count=2)
    cache_dir = tmp_path / "cache"
    build_image_cache(_manifest(paths), cache_dir, size=16)
    moved = tmp_path / "elsewhere" / "img0.png"
    moved.parent.mkdir()
    moved.write_bytes(open(paths[0], "rb").read())
    result = build_image_cache(_manifest([str(moved), paths[1]]), cache_dir, size=16)
    assert result.stats["decoded"] == 0


def test_new_size_rebuilds_everything(tmp_path):
    paths = _write_images(tmp_path / "images")
    cache_dir = tmp_path / "cache"
    build_image_cache(_manifest(paths), cache_dir, size=16)
    result = build_image_cache(_manifest(paths), cache_dir, size=24)
    assert result.stats["decoded"] == 4
    assert result.stats["shards_removed"] == 1
    assert result.cache.get("img0").shape == (24, 24)


def test_cache_survives_pickling(tmp_path):
    paths = _write_images(tmp_path / "images", count=2)
    cache = build_image_cache(_manifest(paths), tmp_path / "cache", size=16).cache
    first = cache.get("img1").copy()
    clone = pickle.loads(pickle.dumps(cache))
    assert np.array_equal(clone.get("img1"), first)
    reopened = ImageCache(tmp_path / "cache")
    assert np.array_equal(reopened.get("img1"), first)
