from __future__ import annotations

import numpy as np
import pytest
import torch

from vae_cli.core.errors import DataError, RecipeError
from vae_cli.core.recipe import DataConfig
from vae_cli.data import build_dataset, labelled_subset, stratified_split


def test_digits_dataset_shapes_and_range():
    d = build_dataset(DataConfig(), seed=0)
    assert d.image_shape == (1, 8, 8) and d.classes == [str(i) for i in range(10)]
    assert len(d.train_x) + len(d.holdout_x) + len(d.test_x) == 1797
    assert float(d.train_x.min()) >= 0.0 and float(d.train_x.max()) <= 1.0
    assert len(d.labelled) == len(d.train_x)


def test_holdout_is_stratified_fixed_and_kept_out_of_training():
    a, b = build_dataset(DataConfig(holdout_fraction=0.1), seed=0), build_dataset(DataConfig(holdout_fraction=0.1), 7)
    assert torch.equal(a.holdout_x, b.holdout_x) and torch.equal(a.train_x, b.train_x)  # not moved by the seed
    assert np.bincount(a.holdout_y.numpy()).min() >= 13  # ~14 of each class's ~144
    flat = {tuple(r) for r in a.train_x.flatten(1).tolist()}
    assert sum(tuple(r) in flat for r in a.holdout_x.flatten(1).tolist()) <= 2  # (the digits have 1 duplicate)
    none = build_dataset(DataConfig(holdout_fraction=0), seed=0)
    assert none.holdout_x is None and len(none.train_x) == len(a.train_x) + len(a.holdout_x)


def test_holdout_never_takes_a_class_s_last_image():
    y = np.array([0, 0, 0, 0, 1, 2, 2])
    keep, held = stratified_split(y, 0.5, 0, keep_one=True)
    assert set(y[keep]) == {0, 1, 2} and 1 not in set(y[held]) and len(held) == 3


@pytest.mark.parametrize("mode", ["threshold", "stochastic"])
def test_binarized_data_is_binary_and_fixed(mode):
    d = build_dataset(DataConfig(binarize=mode), seed=0)
    for t in (d.train_x, d.test_x, d.holdout_x):
        assert set(t.unique().tolist()) <= {0.0, 1.0}
    assert d.levels == 2
    assert torch.equal(d.test_x, build_dataset(DataConfig(binarize=mode), seed=3).test_x)
    assert (d.train_grey is not None) == (mode == "stochastic")
    if mode == "stochastic":  # the draw follows the grey level: mean of the draws ~ mean grey
        assert abs(d.train_x.mean().item() - d.train_grey.mean().item()) < 0.01


def test_test_split_is_stratified_and_independent_of_the_seed():
    a, b = build_dataset(DataConfig(), seed=0), build_dataset(DataConfig(), seed=5)
    assert np.array_equal(a.test_y.numpy(), b.test_y.numpy())
    counts = np.bincount(a.test_y.numpy())
    assert counts.min() >= 30 and counts.max() <= 40


def test_labelled_subset_is_stratified_seeded_and_reproducible():
    y = np.repeat(np.arange(10), 50)
    a = labelled_subset(y, per_class=3, fraction=None, seed=1)
    assert len(a) == 30 and np.all(np.bincount(y[a]) == 3)
    assert np.array_equal(a, labelled_subset(y, 3, None, seed=1))
    assert not np.array_equal(a, labelled_subset(y, 3, None, seed=2))
    f = labelled_subset(y, None, 0.1, seed=0)
    assert np.all(np.bincount(y[f]) == 5)
    with pytest.raises(DataError, match="has only 50"):
        labelled_subset(y, 51, None, 0)


def test_split_holds_out_every_class():
    y = np.array([0] * 10 + [1] * 3)
    keep, held = stratified_split(y, 0.2, 0)
    assert set(y[held]) == {0, 1} and len(set(keep) & set(held)) == 0 and len(keep) + len(held) == 13


def test_labels_per_class_reaches_the_dataset():
    d = build_dataset(DataConfig(labels_per_class=4), seed=0)
    assert len(d.labelled) == 40
    assert np.all(np.bincount(d.train_y[d.labelled].numpy()) == 4)


def test_unknown_dataset_suggests():
    with pytest.raises(RecipeError, match="did you mean 'digits'"):
        build_dataset(DataConfig(name="digit"), 0)
