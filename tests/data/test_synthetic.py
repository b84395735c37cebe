"""The synthetic set: deterministic, any resolution, classes told apart by colour, detail at pixel scale."""

from __future__ import annotations

import numpy as np
import pytest

from dip_scale.data.synthetic import SYNTHETIC_CLASSES, synthetic_image


def test_is_a_pure_function_of_seed_and_index() -> None:
    first, label = synthetic_image(123, 32, seed=5)
    again, label_again = synthetic_image(123, 32, seed=5)
    np.testing.assert_array_equal(first, again)
    assert label == label_again == 123 % len(SYNTHETIC_CLASSES)
    assert not np.array_equal(first, synthetic_image(123, 32, seed=6)[0])
    assert not np.array_equal(first, synthetic_image(133, 32, seed=5)[0])  # same class, other image


@pytest.mark.parametrize("resolution", [1, 7, 16, 64, 257])
def test_any_resolution(resolution: int) -> None:
    image, _ = synthetic_image(3, resolution)
    assert image.shape == (resolution, resolution, 3) and image.dtype == np.uint8


def test_ten_named_classes_balanced_by_index() -> None:
    assert len(SYNTHETIC_CLASSES) == len(set(SYNTHETIC_CLASSES)) == 10
    labels = [synthetic_image(i, 4)[1] for i in range(100)]
    assert np.bincount(labels).tolist() == [10] * 10


def test_classes_are_separable_by_a_nearest_mean_classifier() -> None:
    # Colour statistics alone (mean and spread per channel) must identify the class of unseen images.
    def features(index: int) -> np.ndarray:
        image = synthetic_image(index, 32)[0].reshape(-1, 3).astype(np.float64)
        return np.concatenate([image.mean(0), image.std(0)])

    train = np.array([features(i) for i in range(200)])
    means = np.array([train[i::10].mean(0) for i in range(10)])
    test_indices = range(1000, 1200)
    predicted = [int(np.argmin(((means - features(i)) ** 2).sum(1))) for i in test_indices]
    accuracy = np.mean([p == i % 10 for p, i in zip(predicted, test_indices)])
    assert accuracy >= 0.95


def test_every_class_has_pixel_scale_detail() -> None:
    # Most of each image's variation must be lost by 4x4 average pooling: detail inside a DiP patch.
    for label in range(10):
        image = synthetic_image(label, 64)[0].astype(np.float64)
        pooled = image.reshape(16, 4, 16, 4, 3).mean(axis=(1, 3))
        blurred = np.repeat(np.repeat(pooled, 4, axis=0), 4, axis=1)
        detail = np.abs(image - blurred).mean()
        assert detail > 15.0, f"class {SYNTHETIC_CLASSES[label]}: mean detail {detail:.1f} grey levels"


def test_rejects_negative_index_and_bad_resolution() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        synthetic_image(-1, 8)
    with pytest.raises(ValueError, match="resolution must be positive"):
        synthetic_image(0, 0)
