"""Crops, augmentation and task-balanced batches."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from datprl.platform.data.sampler import BalancedBatcher, batches_per_pass, collate
from datprl.platform.data.transforms import center_crop, paired_augment, paired_random_crop, to_chw3, to_unit_float


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


def _balanced(batch, tasks, per_task):
    return collections.Counter(r["task"] for r in batch) == {t: per_task for t in tasks}


@pytest.mark.parametrize("counts", [{"a": 3, "b": 1}, {"a": 40, "b": 9}, {"a": 2, "b": 2}])
def test_fixed_batches_give_the_same_count_whatever_the_pass_holds(counts):
    # Data-parallel workers receive different mixes of tasks; each must take exactly as many steps per pass.
    batcher = BalancedBatcher(tasks=["a", "b"], per_task=2, seed=1)
    for pass_index in range(3):
        batches = list(batcher.fixed_batches(_rows(counts, seed=pass_index), num_batches=5))
        assert len(batches) == 5
        assert all(_balanced(b, ["a", "b"], 2) for b in batches)


def test_fixed_batches_carry_the_surplus_into_the_next_pass():
    batcher = BalancedBatcher(tasks=["a", "b"], per_task=2, max_pending=64)
    first = list(batcher.fixed_batches(_rows({"a": 20, "b": 20}, seed=0), num_batches=4))  # uses 8 + 8, keeps 12 + 12
    assert batcher.fresh_used == 16
    second = list(batcher.fixed_batches([], num_batches=6))  # an empty pass: the kept samples are used first
    assert len(first) == 4 and len(second) == 6
    assert batcher.fresh_used == 16 + 24
    ids = [r["id"] for b in first + second for r in b]
    assert len(set(ids)) == 40  # every sample once, none lost between passes


def test_fixed_batches_fill_a_task_this_worker_never_saw(caplog):
    batcher = BalancedBatcher(tasks=["a", "rare"], per_task=2, max_pending=8, seed=0)
    with caplog.at_level("WARNING"):
        batches = list(batcher.fixed_batches(_rows({"a": 200}), num_batches=30))
    assert len(batches) == 30 and all(len(b) == 4 for b in batches)
    assert all(r["task"] == "a" for b in batches for r in b)
    assert "rare" in caplog.text
    with pytest.raises(ValueError, match="no training sample"):
        list(BalancedBatcher(tasks=["a"], per_task=1).fixed_batches([], num_batches=2))


def test_batches_per_pass_covers_each_workers_share_of_the_largest_task():
    counts = {"a": 32, "b": 4, "c": 20}
    assert batches_per_pass(counts, ["a", "b", "c"], per_task=2, workers=1) == 16
    assert batches_per_pass(counts, ["a", "b", "c"], per_task=2, workers=2) == 8
    assert batches_per_pass(counts, ["b"], per_task=2, workers=4) == 1
    assert batches_per_pass({}, ["x"], per_task=2, workers=1) == 1


def test_collate_stacks_tensors_and_keeps_metadata():
    rows = [{"lq": np.zeros((3, 4, 4), np.float32), "gt": np.ones((3, 4, 4), np.float32), "task": t} for t in "ab"]
    batch = collate(rows)
    assert batch["lq"].shape == (2, 3, 4, 4) and batch["task"] == ["a", "b"]


def test_process_rng_is_not_inherited_by_forked_workers():
    """DataLoader workers are forked: a generator created in the parent must not hand them the parent's stream."""
    import multiprocessing

    from datprl.platform.data.transforms import process_rng

    parent = process_rng()
    assert process_rng() is parent  # one generator per process
    state = parent.bit_generator.state
    with multiprocessing.get_context("fork").Pool(2) as pool:
        children = pool.map(_draw_in_worker, range(2))
    parent.bit_generator.state = state
    mine = parent.integers(0, 2**62, 4).tolist()
    assert children[0] != mine and children[1] != mine and children[0] != children[1]


def _draw_in_worker(_):
    from datprl.platform.data.transforms import process_rng

    return process_rng().integers(0, 2**62, 4).tolist()
