"""Evaluation metrics against values computed by hand."""
from __future__ import annotations

import pytest
import torch

from evaluation.image_metrics import (ClipScorer, centroid_align, inspiration_tree_scores, load_callable, mask_iou,
                                      mean_pairwise_distance, pixel_features, segment_plain_background, silhouette_iou)


def box(h0, h1, w0, w1, size=10):
    m = torch.zeros(1, 1, size, size)
    m[..., h0:h1, w0:w1] = 1
    return m


def test_mask_iou_of_known_masks():
    a, b = box(0, 4, 0, 4), box(2, 6, 2, 6)        # 16 and 16 pixels, overlap 4
    assert mask_iou(a, b).item() == pytest.approx(4 / 28)
    assert mask_iou(a, a).item() == 1.0
    assert mask_iou(torch.zeros_like(a), torch.zeros_like(a)).item() == 0.0


def test_centroid_alignment_moves_masks_to_the_centre():
    corner = box(0, 3, 0, 3, size=9)                # centroid (1, 1) -> centre (4, 4)
    aligned = centroid_align(corner)
    assert torch.equal(aligned, box(3, 6, 3, 6, size=9))
    assert centroid_align(torch.zeros(1, 1, 9, 9)).sum() == 0


def test_silhouette_iou_is_translation_free_and_takes_the_best_view():
    generated = box(0, 3, 0, 3, size=9)             # same square, elsewhere
    views = torch.cat([box(5, 8, 5, 8, size=9), box(2, 7, 3, 5, size=9)])   # view 0 matches after alignment
    got = silhouette_iou(generated, views)
    assert got["centroid_iou"].item() == 1.0 and got["max_view_iou"].item() == 1.0
    other = silhouette_iou(box(2, 7, 3, 5, size=9), views)
    assert other["centroid_iou"].item() == pytest.approx(6 / 13)       # 3x3 vs 5x2 centred: overlap 6, union 13
    assert other["max_view_iou"].item() == 1.0


def test_plain_background_segmentation():
    images = torch.ones(1, 3, 12, 12)
    images[:, :, 3:8, 4:10] = torch.tensor([0.2, 0.4, 0.9])[:, None, None]
    assert torch.equal(segment_plain_background(images)[0, 0], box(3, 8, 4, 10, size=12)[0, 0])


def test_pairwise_distance_and_token_scores_on_known_features():
    features = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 4.0]])
    assert mean_pairwise_distance(features) == pytest.approx((5 + 4 + 3) / 3)
    assert mean_pairwise_distance(features[:1]) == 0.0
    scores = inspiration_tree_scores({"*s": torch.tensor([[1.0, 0.0], [1.0, 0.0]]),
                                      "*p": torch.tensor([[0.0, 1.0], [1.0, 1.0]])})
    assert scores["consistency/*s"] == pytest.approx(1.0)
    assert scores["consistency/*p"] == pytest.approx(2 ** -0.5)
    assert scores["distinctness/*p|*s"] == pytest.approx(1 - (0 + 2 ** -0.5) / 2)


def test_pixel_features_are_unit_norm():
    f = pixel_features(torch.rand(3, 3, 32, 32))
    assert f.shape == (3, 3 * 16 * 16) and torch.allclose(f.norm(dim=1), torch.ones(3))


def test_missing_clip_is_reported_not_fatal(tmp_path):
    assert not ClipScorer(None).available and "no CLIP model" in ClipScorer(None).reason
    missing = ClipScorer(str(tmp_path / "no-such-clip"))
    assert not missing.available and "could not be loaded" in missing.reason


def test_plugins_load_by_name():
    assert load_callable("evaluation.image_metrics:pixel_features", None) is pixel_features
    assert load_callable(None, mask_iou) is mask_iou
    with pytest.raises(ValueError, match="module:function"):
        load_callable("evaluation.image_metrics", None)
