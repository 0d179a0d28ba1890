"""Evaluation metrics against values computed by hand."""
from __future__ import annotations

import pytest
import torch

from guided_concepts.evaluation.image_metrics import (ClipScorer, centroid_align, inspiration_tree_scores,
                                                       load_callable, mask_iou, mean_pairwise_distance, pixel_features,
                                                       segment_plain_background, silhouette_iou)


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
    assert load_callable("guided_concepts.evaluation.image_metrics:pixel_features", None) is pixel_features
    assert load_callable(None, mask_iou) is mask_iou
    with pytest.raises(ValueError, match="module:function"):
        load_callable("evaluation.image_metrics", None)


# ----------------------------------------------------------------------------------------------
# Runs: evaluation CLI, sweeps, report
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sweep_trains_evaluates_and_reports(tmp_path):
    import csv
    import json
    from guided_concepts import sweep
    sweep_dir = sweep.main(["--sweep", "losses.shape.mask_weight=0,1", "--set", f"run.output_dir={tmp_path}",
                            "--set", "train.steps=2", "--set", "train.sample_every=0", "--set", "sample.steps=1",
                            "--eval-samples", "2", "--eval-steps", "2", "--name", "sw"])
    assert sweep_dir == tmp_path / "sw"
    runs = sorted(p.name for p in sweep_dir.iterdir() if p.is_dir())
    assert runs == ["losses.shape.mask_weight=0", "losses.shape.mask_weight=1"]
    for run in runs:
        config = (sweep_dir / run / "config.yaml").read_text()
        assert f"mask_weight: {float(run.split('=')[1])}" in config
    report = (sweep_dir / "report.md").read_text()
    assert "sweep of `losses.shape.mask_weight`" in report and "Backbone: `tiny`" in report
    assert "editability (CLIP-T) skipped" in report and "weights are random" in report
    table = [line for line in report.splitlines() if line.startswith("| ")]
    assert len(table) == 3 and "attention/shape/iou" in table[0]
    for name in ("metrics_vs_value.png", "samples_grid.png", "fidelity_vs_editability.png", "rows.csv", "results.json"):
        assert (sweep_dir / name).is_file(), name
    rows = list(csv.DictReader(open(sweep_dir / "rows.csv")))
    assert len(rows) == 2 * 2 * 4          # runs x held-out objects x prompts
    assert {r["prompt_key"] for r in rows} == {"base", "leopard", "red", "alone"}
    results = json.loads((sweep_dir / "results.json").read_text())
    assert all(0 <= r["summary"]["silhouette_iou"] <= 1 for r in results)
    # More steps: each run resumes from its checkpoint instead of failing on the existing folder.
    sweep.main(["--sweep", "losses.shape.mask_weight=0,1", "--set", f"run.output_dir={tmp_path}", "--set", "train.steps=3",
                "--set", "train.sample_every=0", "--eval-samples", "1", "--eval-steps", "1", "--name", "sw"])
    for run in runs:
        assert (sweep_dir / run / "checkpoints" / "step_000003").is_dir()
    # Run again: finished runs are reused, not retrained.
    mtime = (sweep_dir / runs[0] / "metrics.jsonl").stat().st_mtime
    sweep.main(["--sweep", "losses.shape.mask_weight=0,1", "--set", f"run.output_dir={tmp_path}", "--set", "train.steps=3",
                "--set", "train.sample_every=0", "--eval-samples", "1", "--eval-steps", "1", "--name", "sw"])
    assert (sweep_dir / runs[0] / "metrics.jsonl").stat().st_mtime == mtime


def test_bad_sweep_is_an_error_before_any_run(tmp_path):
    from guided_concepts import sweep, train
    with pytest.raises(SystemExit, match="python sweep.py --sweep"):      # its own entry point
        train.main(["--sweep", "losses.shape.mask_weight=0,1", "--set", f"run.output_dir={tmp_path}"])
    with pytest.raises(SystemExit, match="--help-config: run it with train.py"):
        sweep.main(["--sweep", "losses.shape.mask_weight=0,1", "--help-config", "--set", f"run.output_dir={tmp_path}"])
    with pytest.raises(SystemExit, match="expected section.key=v1,v2"):
        sweep.main(["--sweep", "mask_weight", "--set", f"run.output_dir={tmp_path}"])
    with pytest.raises(SystemExit, match="unknown key losses.shape.mask_wieght"):
        sweep.main(["--sweep", "losses.shape.mask_wieght=0,1", "--set", f"run.output_dir={tmp_path}"])
    assert not any(tmp_path.iterdir())


def test_clip_t_with_a_tiny_clip_model(tmp_path):
    """Editability runs end to end with a CLIP model given by path (a tiny one built from config)."""
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTextConfig, CLIPTokenizer,
                              CLIPVisionConfig)
    from guided_concepts.backbone.tiny import tiny_vocab_and_merges
    vocab, merges = tiny_vocab_and_merges()
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(
        text_config=CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                                   pad_token_id=1).to_dict(),
        vision_config=CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32,
                                       num_hidden_layers=1, num_attention_heads=2).to_dict(), projection_dim=8))
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32),
                              tokenizer=CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77))
    model.save_pretrained(tmp_path / "clip")
    processor.save_pretrained(tmp_path / "clip")
    scorer = ClipScorer(str(tmp_path / "clip"))
    assert scorer.available, scorer.reason
    images = torch.rand(2, 3, 64, 64)
    scores = scorer.text_image(images, ["a red chair", "a photo of a chair"])
    assert scores.shape == (2,) and ((scores >= -1) & (scores <= 1)).all()


def test_evaluation_cli_on_chosen_objects_with_an_extra_prompt(tmp_path, chairs_dir):
    import csv
    from guided_concepts import train
    from guided_concepts.evaluation.__main__ import main as evaluate_main
    run = train.main(["--name", "e", "--set", f"run.output_dir={tmp_path}", "--tokens", "pose",
                      "--set", "train.steps=1", "--set", "train.sample_every=0", "--set", "sample.steps=1"])
    report = evaluate_main([str(run), "--objects", str(chairs_dir / "chair_000"), "--num", "2", "--steps", "1",
                            "--prompt", "blue=a blue {category} {phrases}", "--out", str(tmp_path / "ev")])
    rows = list(csv.DictReader(open(tmp_path / "ev" / "rows.csv")))
    assert {r["prompt_key"] for r in rows} == {"base", "leopard", "red", "alone", "blue"}
    assert all(r["object"] == "chair_000" for r in rows)
    assert "a blue chair with pose *p" in {r["prompt"] for r in rows}
    text = report.read_text()
    assert "pose/azimuth_error_deg" in text and "attention/pose/iou" in text     # a pose-only run works
    with pytest.raises(SystemExit, match="KEY=TEMPLATE"):
        evaluate_main([str(run), "--prompt", "no-equals-sign"])
