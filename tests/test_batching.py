"""Crops, augmentation and task-balanced batches."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from datprl.platform.batching import (
    BalancedBatcher,
    center_crop,
    collate,
    paired_augment,
    paired_random_crop,
    to_chw3,
    to_unit_float,
)


def test_paired_crop_takes_the_same_window():
    rng = np.random.default_rng(0)
    gt = np.arange(60 * 50 * 3, dtype=np.uint16).reshape(60, 50, 3)
    lq = gt + 1
    a, b = paired_random_crop(lq, gt, 32, rng)
    assert a.shape == b.shape == (32, 32, 3)
    assert np.array_equal(a, b + 1)


def test_crop_pads_small_images_and_rejects_mismatch():
    rng = np.random.default_rng(0)
    a, b = paired_random_crop(np.ones((10, 12)), np.ones((10, 12)), 16, rng)
    assert a.shape == b.shape == (16, 16)
    with pytest.raises(ValueError, match="sizes differ"):
        paired_random_crop(np.ones((10, 12)), np.ones((11, 12)), 8, rng)


def test_augment_is_a_shared_dihedral_transform():
    rng = np.random.default_rng(1)
    img = np.random.default_rng(2).random((9, 9, 3))
    seen = set()
    for _ in range(64):
        a, b = paired_augment(img, img * 2, rng)
        assert np.allclose(a * 2, b)
        seen.add(a.tobytes())
    assert len(seen) == 8  # all 8 flips/rotations occur


def test_unit_float_keeps_bit_depth_until_normalisation():
    ct = np.array([[0, 1024, 4095]], dtype=np.uint16)
    assert np.allclose(to_unit_float(ct, white_level=4095), [[0, 1024 / 4095, 1]])
    assert to_unit_float(np.array([[255]], dtype=np.uint8))[0, 0] == 1.0
    with pytest.raises(ValueError, match="dtype"):
        to_unit_float(np.array([[1]], dtype=np.int64))


def test_grayscale_replicated_to_three_channels():
    gray = np.random.default_rng(0).random((5, 7)).astype(np.float32)
    out = to_chw3(gray)
    assert out.shape == (3, 5, 7) and np.array_equal(out[0], out[2])
    assert center_crop(np.zeros((10, 20)), 8).shape == (8, 8)


def _rows(counts: dict[str, int], seed: int = 0):
    rows = [{"task": t, "id": f"{t}-{i}"} for t, n in counts.items() for i in range(n)]
    np.random.default_rng(seed).shuffle(rows)
    return rows


def test_batches_are_exactly_balanced():
    batcher = BalancedBatcher(tasks=["a", "b", "c"], per_task=2)
    batches = list(batcher.batches(_rows({"a": 40, "b": 40, "c": 40})))
    assert len(batches) >= 15
    for batch in batches:
        assert collections.Counter(r["task"] for r in batch) == {"a": 2, "b": 2, "c": 2}


def test_rare_task_is_oversampled_and_all_fresh_samples_used():
    batcher = BalancedBatcher(tasks=["common", "rare"], per_task=2, max_pending=8)
    rows = _rows({"common": 200, "rare": 10})
    batches = list(batcher.batches(rows))
    for batch in batches:
        assert collections.Counter(r["task"] for r in batch) == {"common": 2, "rare": 2}
    used = {r["id"] for b in batches for r in b}
    assert sum(i.startswith("rare") for i in used) == 10
    assert sum(i.startswith("common") for i in used) == 200  # flush at the end of the pass uses every sample
    assert batcher.redrawn > 0


def test_unknown_tasks_ignored_and_absent_task_reported():
    batcher = BalancedBatcher(tasks=["a", "b"], per_task=1, max_pending=4)
    assert list(batcher.batches([{"task": "zero_shot"}] * 5)) == []
    with pytest.raises(ValueError, match=r"task\(s\) \['b'\]"):
        list(batcher.batches([{"task": "a"}] * 100))


def test_collate_stacks_tensors_and_keeps_metadata():
    rows = [{"lq": np.zeros((3, 4, 4), np.float32), "gt": np.ones((3, 4, 4), np.float32), "task": t} for t in "ab"]
    batch = collate(rows)
    assert batch["lq"].shape == (2, 3, 4, 4) and batch["task"] == ["a", "b"]
