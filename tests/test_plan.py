"""Planning: pairing, rejects with reasons (every synthetic trap), deterministic shard groups."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from pipelines.plan import BuildOptions, make_plan, pair_images
from prep.config import PrepConfig
from prep.datasets import ImageRecord, get_adapter

OPTIONS = BuildOptions(dataset="vindr", prep=PrepConfig(mm_per_px=0.4, patch_px=64), group_pairs=2)


def record(study: str, lat: str, view: str, image: str | None = None, split: str = "training", **kw) -> ImageRecord:
    image = image or f"{study}{lat}{view}"
    header = {"laterality_tag": lat, "view_tag": view}
    return ImageRecord(dataset="vindr", study_id=study, series_id=study, image_id=image, path=f"/x/{image}",
                       rel_path=f"images/{study}/{image}.dicom", laterality=lat, view=view, split=split,
                       header=kw.pop("header", header), **kw)


def four_views(study: str, split: str = "training") -> list[ImageRecord]:
    return [record(study, lat, view, split=split) for lat in "LR" for view in ("CC", "MLO")]


def reasons(rejects: list[dict]) -> dict[str, str]:
    return {r["image_id"]: r["reason"] for r in rejects}


def test_complete_studies_give_one_pair_per_view():
    pairs, rejects = pair_images(four_views("s1") + four_views("s2"))
    assert rejects == []
    assert [(l.study_id, l.view, l.laterality, r.laterality) for l, r in pairs] == [
        ("s1", "CC", "L", "R"), ("s1", "MLO", "L", "R"), ("s2", "CC", "L", "R"), ("s2", "MLO", "L", "R")]


def test_a_missing_view_rejects_the_other_side_and_re_takes_still_pair():
    # VinDr's dbca9d28 study: L-CC twice, R-CC, R-MLO, no L-MLO
    images = [record("s", "L", "CC", "lcc2"), record("s", "L", "CC", "lcc1"), record("s", "R", "CC", "rcc"),
              record("s", "R", "MLO", "rmlo")]
    pairs, rejects = pair_images(images)
    assert [(l.image_id, r.image_id) for l, r in pairs] == [("lcc1", "rcc")]
    assert reasons(rejects) == {"lcc2": "retake_not_chosen", "rmlo": "missing_partner"}


def test_header_problems_reject_the_image_and_its_partner():
    images = four_views("s")
    images[0] = replace(images[0], header_error="for_processing", header_detail="FOR PROCESSING")
    images[1] = replace(images[1], flags=["laterality_disagreement"])
    pairs, rejects = pair_images(images)
    assert pairs == []
    got = reasons(rejects)
    assert got["sLCC"] == "for_processing" and got["sRCC"] == "partner_rejected"
    assert got["sLMLO"] == got["sRMLO"] == "laterality_disagreement"
    assert {r["level"] for r in rejects if r["reason"] == "for_processing"} == {"image"}


def test_a_refused_twin_beside_a_usable_image_is_not_a_duplicate():
    # OPTIMAM stores the FOR PROCESSING image of a view beside its FOR PRESENTATION twin
    images = four_views("s") + [record("s", "L", "CC", "raw", header_error="for_processing")]
    pairs, rejects = pair_images(images)
    assert [(l.view, l.image_id, r.image_id) for l, r in pairs] == [("CC", "sLCC", "sRCC"), ("MLO", "sLMLO", "sRMLO")]
    assert reasons(rejects) == {"raw": "for_processing"}
    # two usable images of one side are re-takes: one pairs, whatever else is refused beside them
    images.append(record("s", "L", "CC", "again"))
    pairs, rejects = pair_images(images)
    assert [(l.view, l.image_id, r.image_id) for l, r in pairs] == [("CC", "again", "sRCC"), ("MLO", "sLMLO", "sRMLO")]
    assert reasons(rejects) == {"raw": "for_processing", "sLCC": "retake_not_chosen"}
    # an image refused only for its missing spacing is usable once a spacing is assumed: then it is a re-take
    images = four_views("s") + [record("s", "L", "CC", "nospacing", header_error="no_pixel_spacing")]
    assert reasons(pair_images(images)[1]) == {"nospacing": "no_pixel_spacing"}
    assert reasons(pair_images(images, assume_spacing_mm=0.05)[1]) == {"sLCC": "retake_not_chosen"}


def test_unknown_laterality_is_rejected_not_dropped():
    images = four_views("s") + [record("s", "", "CC", "odd")]
    pairs, rejects = pair_images(images)
    assert len(pairs) == 2
    assert reasons(rejects) == {"odd": "unknown_laterality"}


def test_groups_hold_whole_studies_stay_within_a_split_and_are_deterministic():
    images = [r for i in range(12) for r in four_views(f"study{i:02d}", "test" if i % 4 == 0 else "training")]
    plan = make_plan(images, OPTIONS)
    again = make_plan(list(reversed(images)), OPTIONS)
    assert [g.to_dict() for g in plan.groups] == [g.to_dict() for g in again.groups]
    assert plan.config_hash == again.config_hash
    study_group = {}
    for group in plan.groups:
        assert {p.split for p in group.pairs} == {group.split}
        for p in group.pairs:
            assert study_group.setdefault(p.study_id, (group.split, group.group)) == (group.split, group.group)
    assert len(plan.pairs) == 24
    assert sum(len(g.pairs) for g in plan.groups if g.split == "training") == 18
    # seeds differ per pair and do not depend on the order the archive lists images in
    assert len({p.seed for p in plan.pairs}) == 24


def test_plan_hash_follows_config_and_inputs():
    images = four_views("a") + four_views("b")
    base = make_plan(images, OPTIONS).config_hash
    assert make_plan(images, replace(OPTIONS, codec="png")).config_hash != base
    assert make_plan(images, replace(OPTIONS, prep=replace(OPTIONS.prep, patch_px=32))).config_hash != base
    assert make_plan(images[:4], OPTIONS).config_hash != base
    assert make_plan(images, OPTIONS).default_build_name() == f"vindr-{base[:8]}"


def test_group_spec_round_trips_through_json():
    plan = make_plan(four_views("a"), OPTIONS)
    spec = json.loads(json.dumps(plan.groups[0].to_dict()))
    assert type(plan.groups[0]).from_dict(spec).to_dict() == plan.groups[0].to_dict()
    assert BuildOptions.from_dict(json.loads(json.dumps(OPTIONS.to_dict()))) == OPTIONS


@pytest.fixture(scope="module")
def archive_plan(synth_archive):
    return make_plan(get_adapter("vindr")(synth_archive).images(), OPTIONS)


def test_every_synthetic_trap_is_rejected_with_its_reason(synth_archive, archive_plan):
    truth = json.loads((synth_archive / "ground_truth" / "truth.json").read_text())
    traps = truth["traps"]
    by_image = {}
    for r in archive_plan.rejects:
        by_image.setdefault(r["image_id"], set()).add(r["reason"])
    for study in traps["missing_view"]:
        study_reasons = {r["reason"] for r in archive_plan.rejects if r["study_id"] == study}
        assert "missing_partner" in study_reasons
    # the re-taken view pairs: one of the side's two images, the other rejected as a re-take not chosen
    for image in traps["duplicate_view"]:
        study = next(r.study_id for r in archive_plan.records if r.image_id == image)
        retakes = [r.image_id for r in archive_plan.records if (r.study_id, r.laterality, r.view) == (study, "L", "CC")]
        cc = [p for p in archive_plan.pairs if (p.study_id, p.view) == (study, "CC")]
        assert len(retakes) == 2 and len(cc) == 1 and cc[0].left.image_id in retakes
        assert cc[0].retake_choice == "first_image_id L1/2 R1/1"
        unchosen = [i for i in retakes if i != cc[0].left.image_id]
        assert [by_image.get(i) for i in unchosen] == [{"retake_not_chosen"}]
    for image in traps["wrong_laterality_tag"]:
        assert by_image[image] == {"laterality_disagreement"}
    assert traps["for_processing"]
    for image in traps["for_processing"]:
        assert by_image[image] == {"for_processing"}
    # boxes outside the image are clipped, not a reason to reject
    for image in traps["box_outside"]:
        assert image not in by_image
    planned = {r.image_id for p in archive_plan.pairs for r in (p.left, p.right)}
    assert planned.isdisjoint(by_image)
    assert len(planned) + len(archive_plan.rejected_images) == len(archive_plan.records)


def test_a_study_with_one_side_only_is_unpaired_and_nothing_paired_names_the_fix():
    from pipelines.plan import no_pairs_hint

    pairs, rejects = pair_images([record("s", "L", "CC"), record("s", "L", "MLO")])
    assert pairs == [] and set(reasons(rejects).values()) == {"unpaired"}
    assert "--pair-by patient" in no_pairs_hint(rejects)


def test_no_pixel_spacing_is_cleared_only_by_an_assumed_spacing_which_joins_the_config_hash():
    from pipelines.plan import no_pairs_hint

    images = [replace(r, header_error="no_pixel_spacing", header_detail="no spacing") for r in four_views("s")]
    pairs, rejects = pair_images(images)
    assert pairs == [] and set(reasons(rejects).values()) == {"no_pixel_spacing"}
    assert "--assume-spacing-mm" in no_pairs_hint(rejects)
    assumed = replace(OPTIONS, assume_spacing_mm=0.05)
    plan = make_plan(images, assumed)
    assert len(plan.pairs) == 2 and plan.rejects == []
    assert plan.config_hash != make_plan(images, OPTIONS).config_hash
    # other header errors are not cleared by it
    images[0] = replace(images[0], header_error="for_processing")
    assert reasons(make_plan(images, assumed).rejects)["sLCC"] == "for_processing"
    # builds without the new options keep their config keys (and so their hash)
    assert set(OPTIONS.to_dict()) == {"dataset", "prep", "codec", "shard_max_samples", "shard_max_bytes",
                                      "group_pairs"}
    assert BuildOptions.from_dict(json.loads(json.dumps(assumed.to_dict()))) == assumed
    with pytest.raises(ValueError):
        replace(OPTIONS, assume_spacing_mm=30.0)
    with pytest.raises(ValueError):
        replace(OPTIONS, pair_by="episode")
