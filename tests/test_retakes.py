"""Re-takes: a side with several usable images of one view still yields the view pair, chosen deterministically."""

from __future__ import annotations

from pipelines.plan import BuildOptions, PlannedPair, make_plan
from prep.config import PrepConfig
from prep.datasets import ImageRecord

OPTIONS = BuildOptions(dataset="vindr", prep=PrepConfig(mm_per_px=0.4, patch_px=64))


def record(lat: str, view: str, image: str) -> ImageRecord:
    return ImageRecord(dataset="vindr", study_id="p1", series_id="p1", image_id=image, path=f"/x/{image}",
                       rel_path=f"images/p1/{image}.dicom", laterality=lat, view=view, split="training",
                       header={"laterality_tag": lat, "view_tag": view})


# a patient whose CC view was re-taken on both sides (three L-CC, two R-CC) and whose MLO views were not
PATIENT = [record("L", "CC", "lcc-b"), record("L", "CC", "lcc-a"), record("L", "CC", "lcc-c"),
           record("R", "CC", "rcc-b"), record("R", "CC", "rcc-a"), record("L", "MLO", "lmlo"), record("R", "MLO", "rmlo")]


def test_a_view_re_taken_on_both_sides_yields_its_pair_and_rejects_only_the_other_re_takes():
    plan = make_plan(PATIENT, OPTIONS)
    assert [(p.view, p.left.image_id, p.right.image_id, p.retake_choice) for p in plan.pairs] == [
        ("CC", "lcc-a", "rcc-a", "first_image_id L1/3 R1/2"), ("MLO", "lmlo", "rmlo", None)]
    assert sorted((r["image_id"], r["reason"], r["level"]) for r in plan.rejects) == [
        ("lcc-b", "retake_not_chosen", "image"), ("lcc-c", "retake_not_chosen", "image"),
        ("rcc-b", "retake_not_chosen", "image")]
    assert all("the pair uses" in r["detail"] for r in plan.rejects)


def test_the_choice_does_not_depend_on_the_order_the_archive_lists_images():
    forward, backward = make_plan(PATIENT, OPTIONS), make_plan(PATIENT[::-1], OPTIONS)
    assert [(p.left.image_id, p.right.image_id) for p in forward.pairs] == [
        (p.left.image_id, p.right.image_id) for p in backward.pairs]
    assert forward.config_hash == backward.config_hash


def test_the_choice_travels_with_the_planned_pair_to_the_workers():
    planned = make_plan(PATIENT, OPTIONS).groups[0]
    restored = type(planned).from_dict(planned.to_dict())
    assert [p.retake_choice for p in restored.pairs] == [p.retake_choice for p in planned.pairs]
    assert isinstance(restored.pairs[0], PlannedPair)


def test_re_takes_of_a_view_without_a_partner_are_not_paired():
    plan = make_plan([record("L", "CC", "lcc-a"), record("L", "CC", "lcc-b"), record("R", "MLO", "rmlo")], OPTIONS)
    assert plan.pairs == []
    assert {r["image_id"]: r["reason"] for r in plan.rejects} == {
        "lcc-a": "missing_partner", "lcc-b": "missing_partner", "rmlo": "missing_partner"}
