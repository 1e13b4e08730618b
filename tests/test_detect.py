"""`train detect`: the detector's geometry on a planted lesion, the FROC arithmetic on a hand-counted case, and
the command's outputs on a small archive."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from pydicom.uid import generate_uid
from typer.testing import CliRunner

from train.detect_metrics import false_mark_scores, froc, hits, lateralisation, lesion_scores, weighted_froc
from train.metrics import Bootstrap

pytestmark = pytest.mark.usefixtures("one_torch_thread")
slow = pytest.mark.slow


# ---------------------------------------------------------------- FROC arithmetic, counted by hand


def test_froc_sensitivity_matches_a_hand_counted_case():
    # image 0 holds finding A (box 10..20), image 1 finding B (box 50..60), image 2 nothing.
    # marks (x, y, score, image): on A at 0.9, near B (4 px outside its box, radius 5) at 0.4, a second mark
    # on A at 0.7 (not a false mark), false marks at 0.8 (image 0), 0.5 (image 1), 0.3 and 0.3 (image 2)
    boxes = {0: np.array([[10, 10, 20, 20]]), 1: np.array([[50, 50, 60, 60]]), 2: np.zeros((0, 4))}
    marks = {0: ([[15, 15], [12, 18], [80, 80]], [0.9, 0.7, 0.8]), 1: ([[64, 55], [5, 5]], [0.4, 0.5]),
             2: ([[30, 30], [40, 40]], [0.3, 0.3])}
    found, false = [], []
    for image, (points, scores) in marks.items():
        hit = hits(np.array(points), boxes[image], radius=5.0)
        found += list(lesion_scores(np.array(scores), hit))
        false += list(false_mark_scores(np.array(scores), hit))
    assert found == [0.9, 0.4] and sorted(false) == [0.3, 0.3, 0.5, 0.8]
    # a threshold in (0.8, 0.9] keeps no false mark and finds A: 1/2 at 0.25 false marks per image;
    # (0.5, 0.8] keeps one (1/3 per image), still A only: 1/2 at 0.5; (0.3, 0.5] keeps two (2/3) and finds B
    # at 0.4: 1 at 1; at 0.3 the two tied false marks enter together (4/3 per image).
    result = weighted_froc(np.array(found), np.ones(2), np.array(false), np.ones(4), np.ones(3), (0.25, 0.5, 1.0, 2.0))
    assert result[0].tolist() == [0.5, 0.5, 1.0, 1.0]
    # with B's mark at 0.3 (tied with the two false marks of image 2) B is found only at 4/3 per image
    tied = weighted_froc(np.array([0.9, 0.3]), np.ones(2), np.array(false), np.ones(4), np.ones(3), (1.0, 2.0))
    assert tied[0].tolist() == [0.5, 1.0]
    # the same through the bootstrap wrapper: point values, and CIs from study-level resamples
    out = froc(np.array(found), np.array(["s0", "s1"]), np.array(false), np.array(["s0", "s1", "s2", "s2"]),
               np.array(["s0", "s1", "s2"]), Bootstrap(200, 0))
    assert (out["sensitivity@0.5"], out["sensitivity@1"], out["sensitivity@2"]) == (0.5, 1.0, 1.0)
    assert out["n_findings"] == 2 and out["n_images"] == 3 and out["sensitivity@2_ci"] is not None


def test_lateralisation_counts_the_higher_breast_and_ties_as_half():
    result = lateralisation(np.array([True, True, False, False]), np.array([3.0, 1.0, 0.0, 2.0]),
                            np.array([1.0, 1.0, 1.0, 1.0]), np.array(list("abcd")), Bootstrap(100, 0))
    # a: L wins, right; b: tie, half; c: R wins, right; d: L wins, wrong
    assert result["accuracy"] == pytest.approx(2.5 / 4) and result["n_exams"] == 4


# ---------------------------------------------------------------- a planted lesion


def _write_study(folder, study, plant=None):
    """Write one synthetic study (4 views) as DICOMs; `plant` = (image index, (x, y) stored px, radius px)."""
    from prep.synth import to_dicom_dataset

    folder.mkdir(parents=True)
    uid = generate_uid()
    for i, image in enumerate(study.images):
        pixels = image.image.copy()
        if plant is not None and plant[0] == i:
            disc = np.zeros(pixels.shape, np.uint8)
            cv2.circle(disc, plant[1], plant[2], 1, -1)
            pixels = np.where(disc > 0, np.clip(pixels + 0.5, 0, 1), pixels).astype(np.float32)
        ds = to_dicom_dataset(pixels, image.spacing_mm, laterality=image.laterality, view=image.view,
                              study_uid=uid, patient_id=f"P{folder.name}")
        ds.save_as(folder / f"{i}.dcm", enforce_file_format=True)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Four normal synthetic studies as a DICOM folder; one of them again with a bright 12 mm disc deep in its
    left CC breast ("planted"), the unchanged one being its lesion-free twin."""
    from prep.synth import make_study

    root = tmp_path_factory.mktemp("planted")
    twin = make_study(11, "small", finding=None, artefacts=False, burned_label=False)
    index = next(i for i, im in enumerate(twin.images) if (im.laterality, im.view) == ("L", "CC"))
    image = twin.images[index]
    # deepest inside the breast, the canvas edge (the chest wall) counting as outside
    depth = cv2.distanceTransform(np.pad(image.breast_mask.astype(np.uint8), 1), cv2.DIST_L2, 5)[1:-1, 1:-1]
    y, x = np.unravel_index(np.argmax(depth), depth.shape)
    radius = int(round(6.0 / image.spacing_mm))
    _write_study(root / "planted", twin, plant=(index, (int(x), int(y)), radius))
    _write_study(root / "twin", twin)
    for seed in (12, 13, 14):
        _write_study(root / f"normal{seed}", make_study(seed, "small", finding=None, artefacts=False,
                                                        burned_label=False))
    return root, np.array([x, y]) * image.spacing_mm


def test_a_planted_lesion_is_marked_lateralised_and_outscores_its_twin(planted):
    """Geometry, not skill: the raw-pixel baseline (no model, no training) through the detector's whole path."""
    from prep.datasets import get_adapter
    from train.detect import DetectConfig, breast_scores, detect, image_marks

    root, disc_mm = planted
    cfg = DetectConfig(root=str(root), dataset="dicom-dir", mm_per_px=0.8, patch_px=32, bank_studies=0, n_boot=0)
    det = detect(cfg.validate())
    names = {r.study_id: r.path.split("/")[-2] for r in get_adapter("dicom-dir")(root).images()}
    pos = det.positions.assign(folder=det.positions["study_id"].map(names))
    # stride <= half a patch over the whole breast: neighbouring centres 16 px apart
    first = pos[pos["image_key"] == 0]
    assert np.diff(np.unique(first["cx"])).max() <= 16
    column = "raw-pixel:combined"
    mine = pos[pos["folder"] == "planted"]
    marks = image_marks(mine, column, radius_px=16, limit=5)
    top = marks.sort_values("score", ascending=False).iloc[0]
    assert (top["side"], top["view"]) == ("L", "CC")
    half_patch_mm = 32 * 0.8 / 2
    assert np.hypot(top["x_mm"] - disc_mm[0], top["y_mm"] - disc_mm[1]) <= half_patch_mm
    scores = breast_scores(pos, column, k=3).assign(folder=lambda t: t["study_id"].map(names)).set_index("folder")
    assert scores.loc["planted", "score_L"] > scores.loc["planted", "score_R"]
    assert scores.loc["planted", "score"] > scores.loc["twin", "score"]
    # the pair distance alone cannot say which breast: the one-sided score can, and so the combination
    one_sided = breast_scores(pos, "raw-pixel:one-sided", k=3).assign(folder=lambda t: t["study_id"].map(names))
    assert one_sided.set_index("folder").loc["planted", "score_L"] > one_sided.set_index("folder").loc["planted", "score_R"]


def test_detect_command_writes_marks_and_overlays_without_labels(planted, tmp_path):
    from train.cli import app

    root, _ = planted
    out = tmp_path / "det"
    result = CliRunner().invoke(app, ["detect", "--root", str(root), "--dataset", "dicom-dir", "--mm-per-px", "0.8",
                                      "--patch-px", "32", "--bank-studies", "0", "--out", str(out), "--overlays", "1"])
    assert result.exit_code == 0, result.output
    marks = pd.read_parquet(out / "detections.parquet")
    assert {"study_id", "image_id", "side", "view", "x_mm", "y_mm", "score"} <= set(marks.columns)
    assert set(marks["variant"]) == {"pair", "one-sided", "combined"} and marks["study_id"].nunique() == 5
    summary = json.loads((out / "detect.json").read_text())
    assert summary["labelled"] is False and "exam" not in summary["metrics"]["raw-pixel"]["combined"]
    assert "no labels" in (out / "detect.md").read_text()
    assert (out / "overlays" / "top_1.png").stat().st_size > 10_000 and (out / "overlays" / "bottom_1.png").is_file()
    # no patient data: the folder names (here standing in for patient names) appear nowhere
    assert not marks.isin(["planted", "twin"]).any().any()


def test_detect_command_scores_a_single_study(planted, tmp_path):
    """One study and no bank: the one-sided score has no other study to compare with (no marks); the pair score
    still marks every image and the run writes all its outputs, saying why the other variants are empty."""
    from prep.datasets import get_adapter
    from train.cli import app

    root, _ = planted
    study = next(r.study_id for r in get_adapter("dicom-dir")(root).images() if r.path.split("/")[-2] == "twin")
    out = tmp_path / "one"
    result = CliRunner().invoke(app, ["detect", "--root", str(root), "--dataset", "dicom-dir", "--mm-per-px", "0.8",
                                      "--patch-px", "32", "--where", f"study_id == '{study}'",
                                      "--bank-studies", "0", "--out", str(out), "--overlays", "1"])
    assert result.exit_code == 0, result.output
    marks = pd.read_parquet(out / "detections.parquet")
    assert set(marks["variant"]) == {"pair"} and marks["study_id"].nunique() == 1
    assert marks.groupby(["method", "side", "view"]).ngroups == 2 * 4  # both baselines mark all four views
    assert len(pd.read_parquet(out / "exams.parquet")) == 2 * 3  # one exam row per method and variant
    summary = json.loads((out / "detect.json").read_text())
    assert any("pair score stands alone" in n for n in summary["notes"])
    assert (out / "overlays" / "top_1.png").is_file() and "pair score stands alone" in (out / "detect.md").read_text()


def test_detect_command_refuses_a_bad_option(tmp_path):
    from train.cli import app

    result = CliRunner().invoke(app, ["detect", "--root", str(tmp_path), "--stride", "0.8", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "--stride must be <= 0.5" in result.output
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- train compare's detection section


@slow
def test_compare_tests_detectors_across_seeds_against_the_pixel_baselines(synth_archive, tmp_path):
    from train.compare import detection_section
    from train.detect import DetectConfig
    from train.detect_report import run_detection
    from train.models import create_backbone, save_encoder

    for seed in (0, 1):
        torch.manual_seed(seed)
        encoder = tmp_path / f"enc{seed}" / "encoder.safetensors"
        encoder.parent.mkdir()
        save_encoder(create_backbone("test_resnet"), {"timm_name": "test_resnet", "mm_per_px": 0.8, "patch_px": 32,
                                                      "method": "random", "seed": seed}, encoder)
        run_detection(DetectConfig(root=str(synth_archive), encoder=str(encoder), out=str(tmp_path / f"det{seed}"),
                                   n_boot=50, overlays=1, device="cpu").validate())
    md, tests = detection_section([tmp_path], Bootstrap(50, 0))
    text = "\n".join(md)
    assert "| random | " in text and "| baseline: raw-pixel | " in text
    assert {t.metric for t in tests} == {"exam_auc", "lateralisation_auc", "froc_sensitivity@1"}
    assert {(t.a, t.b) for t in tests} == {("random", "baseline: raw-pixel"), ("random", "baseline: mean-intensity")}
    assert all(t.seeds == [0, 1] for t in tests) and all(t.p_holm is None or t.p_holm >= t.result["p"] for t in tests)
    summary = json.loads((tmp_path / "det0" / "detect.json").read_text())
    exam = summary["metrics"]["random"]["combined"]["exam"]
    assert exam["n_pos"] + exam["n_neg"] == summary["counts"]["studies"] and len(exam["auc_ci"]) == 2


# ---------------------------------------------------------------- the demo's closing screen


@slow
def test_demo_closing_screen_carries_the_detection_table_computed_from_the_detections(synth_archive, tmp_path):
    """`make demo` ends with exam-level AUC, lateralisation and FROC per method: the numbers it prints are those
    of the `train detect` run's own tables (exams.parquet), not a second computation."""
    from sklearn.metrics import roc_auc_score

    from pipelines.demo import detection_lines
    from train.detect import DetectConfig
    from train.detect_report import run_detection
    from train.models import create_backbone, save_encoder

    torch.manual_seed(0)
    encoder = tmp_path / "enc" / "encoder.safetensors"
    encoder.parent.mkdir()
    save_encoder(create_backbone("test_resnet"), {"timm_name": "test_resnet", "mm_per_px": 0.8, "patch_px": 32,
                                                  "method": "random", "seed": 0}, encoder)
    out = tmp_path / "detect" / "random"
    run_detection(DetectConfig(root=str(synth_archive), encoder=str(encoder), out=str(out), bank_studies=0,
                               n_boot=50, overlays=0, device="cpu").validate())
    lines = detection_lines([out, tmp_path / "detect" / "not-run"])
    header = next(line for line in lines if line.startswith("method"))
    assert "exam AUC" in header and "lateral. accuracy" in header and "FROC sens. @1 FP/image" in header
    rows = {line.split()[0]: line.split() for line in lines[lines.index(header) + 1:]}
    assert list(rows) == ["random", "raw-pixel", "mean-intensity"]
    exams = pd.read_parquet(out / "exams.parquet")
    for method, cells in rows.items():
        mine = exams[(exams["method"] == method) & (exams["variant"] == "combined")]
        assert float(cells[1]) == pytest.approx(roc_auc_score(mine["has_finding"], mine["score"]), abs=5e-4)
        one_side = mine[mine["lesion_side"].isin(["L", "R"])]
        right = np.where(one_side["score_L"] == one_side["score_R"], 0.5,
                         (one_side["score_L"] > one_side["score_R"]) == (one_side["lesion_side"] == "L"))
        assert float(cells[4]) == pytest.approx(right.mean(), abs=5e-4)
    summary = json.loads((out / "detect.json").read_text())
    froc = summary["metrics"]["random"]["combined"]["froc"]
    assert rows["random"][10] == f"{froc['sensitivity@1']:.3f}"
