"""The work of one planned pair: decode both images, `prep.pairs.process_pair`, shape the manifest rows.

`process_planned_pair` never raises for a bad pair: every failure becomes reject rows (with the reason and
the error text), so one unreadable film cannot stop a build. `estimate` times a few pairs the same way for
`--dry-run`.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

from pipelines import manifests as mf
from pipelines.plan import BuildOptions, Plan, PlannedPair, reject_row
from pipelines.shards import encode_sample
from prep.codec import sample_key
from prep.datasets import ImageRecord
from prep.decode import UnsupportedImage


@dataclass
class PairOutcome:
    images: list[dict]  # images.parquet rows (L, R)
    pair: dict | None  # pairs.parquet row (None when decoding failed)
    samples: list  # (samples row minus shard/offset, PatchSample)
    rejects: list[dict]
    timings: dict = field(default_factory=dict)


def image_row(record: ImageRecord, facts: dict, info: dict | None, status: str, reason: str | None) -> dict:
    """images.parquet row: labels from the adapter, allow-listed header facts, orientation results."""
    info = info or {}
    return {
        "dataset": record.dataset, "study_id": record.study_id, "series_id": record.series_id,
        "image_id": record.image_id, "rel_path": record.rel_path, "laterality": record.laterality,
        "view": record.view, "split": record.split, "manufacturer": facts.get("manufacturer"),
        "transfer_syntax": facts.get("transfer_syntax"), "photometric": facts.get("photometric"),
        "bits_stored": facts.get("bits_stored"), "rows": facts.get("rows"), "cols": facts.get("cols"),
        "spacing_mm": list(facts["spacing_mm"]) if facts.get("spacing_mm") else None,
        "spacing_source": facts.get("spacing_source"),
        "voi_kind": facts.get("voi_kind"), "inverted": facts.get("inverted"),
        "laterality_tag": facts.get("laterality_tag"), "view_tag": facts.get("view_tag"),
        "chest_wall_side": info.get("chest_wall_side"), "orientation_flag": info.get("orientation_flag"),
        "breast_area_mm2": info.get("breast_area_mm2"), "findings": record.findings,
        "breast_birads": record.breast_birads, "breast_density": record.breast_density,
        "status": status, "reason": reason,
    }


def rejected_image_row(record: ImageRecord, reason: str) -> dict:
    return image_row(record, record.header, None, "rejected", reason)


def plan_rejected_image_rows(plan: Plan) -> list[dict]:
    """images.parquet rows of the images the plan left out of every pair (each with its first plan reason)."""
    plan_reason: dict[str, str] = {}
    for row in plan.rejects:
        plan_reason.setdefault(row["image_id"], row["reason"])
    return [rejected_image_row(r, plan_reason.get(r.image_id, "rejected")) for r in plan.rejected_images]


def process_planned_pair(planned: PlannedPair, options: BuildOptions) -> PairOutcome:
    """Decode both images and run `process_pair`; every failure becomes reject rows, never an exception."""
    from prep.pairs import load_image_input, process_pair

    timings = {"decode_s": 0.0, "process_s": 0.0}
    records = {"L": planned.left, "R": planned.right}
    inputs, failures = {}, {}
    started = time.perf_counter()
    for side, record in records.items():
        try:
            inputs[side] = load_image_input(record, options.assume_spacing_mm)
        except UnsupportedImage as exc:
            failures[side] = (exc.reason, str(exc.detail)[:500])
        except Exception as exc:  # a decoder bug must not stop the build: record it with its text
            failures[side] = ("decode_failed", f"{type(exc).__name__}: {exc}"[:500])
    timings["decode_s"] = time.perf_counter() - started
    if failures:
        images, rejects = [], []
        for side, record in records.items():
            if side in failures:
                reason, detail = failures[side]
                rejects.append(reject_row(record, reason, detail, "image", stage="decode"))
            else:
                reason = "partner_rejected"
                rejects.append(reject_row(record, reason, f"partner rejected: {next(iter(failures.values()))[0]}",
                                          "pair", stage="decode"))
            facts = {**record.header, **(inputs[side].decoded.meta if side in inputs else {})}
            images.append(image_row(record, facts, None, "rejected", reason))
        return PairOutcome(images=images, pair=None, samples=[], rejects=rejects, timings=timings)

    started = time.perf_counter()
    try:
        result = process_pair(inputs["L"], inputs["R"], options.prep, planned.seed)
        error, pair_fields, infos, samples = result.error, result.pair, result.images, result.samples
    except Exception as exc:  # per-pair failures become rejects; the build goes on
        error, pair_fields, infos, samples = f"{type(exc).__name__}: {exc}", {}, {}, []
    timings["process_s"] = time.perf_counter() - started

    reason = None
    if error:
        failed = [s for s in ("L", "R") if infos.get(s, {}).get("status") not in (None, "ok")]
        reason = (infos[failed[0]]["status"] if failed else
                  "registration_failed" if pair_fields and not pair_fields.get("reg_ok") else "process_failed")
    images = []
    for side, record in records.items():
        decoded = inputs[side].decoded
        facts = {**record.header, **decoded.meta, "spacing_mm": decoded.spacing_mm}
        info = infos.get(side, {})
        status = "ok" if info.get("status") == "ok" else "rejected"
        images.append(image_row(record, facts, info, status, None if status == "ok" else info.get("status", reason)))
    pair_row = {**{f: None for f in mf.PAIRS_SCHEMA.names}, **pair_fields,
                "dataset": planned.left.dataset, "split": planned.split, "study_id": planned.study_id,
                "view": planned.view, "left_image_id": planned.left.image_id,
                "right_image_id": planned.right.image_id, "seed": planned.seed,
                "retake_choice": planned.retake_choice,
                "status": "ok" if reason is None else "rejected", "n_samples": len(samples)}
    if reason and not pair_row.get("reason"):
        pair_row["reason"] = reason
    rejects = [reject_row(r, reason, error[:500], "pair", stage="process") for r in records.values()] if reason else []
    return PairOutcome(images=images, pair=pair_row, samples=sample_rows(planned, samples), rejects=rejects,
                       timings=timings)


def sample_rows(planned: PlannedPair, samples: list) -> list:
    """(samples.parquet row minus shard/offset, PatchSample) per sample; keys count up per ipsi side."""
    rows, counters = [], Counter()
    for sample in samples:
        lat = sample.meta["ipsi_lat"]
        key = sample_key(planned.left.dataset, planned.study_id, planned.view, lat, counters[lat])
        counters[lat] += 1
        row = {"key": key, "dataset": planned.left.dataset, "split": planned.split,
               **{k: sample.meta.get(k) for k in mf.SAMPLE_META_KEYS}}
        rows.append((row, sample))
    return rows


def estimate(plan: Plan, sample_pairs: int = 3) -> dict:
    """Time a few pairs in this process (decode, process, encode; nothing written) and extrapolate."""
    chosen = plan.pairs[:: max(1, len(plan.pairs) // sample_pairs)][:sample_pairs]
    seconds, samples, nbytes = 0.0, 0, 0
    for planned in chosen:
        started = time.perf_counter()
        outcome = process_planned_pair(planned, plan.options)
        for row, sample in outcome.samples:
            nbytes += encode_sample(row, sample.ipsi, sample.contra, plan.options.codec).tar_bytes
        seconds += time.perf_counter() - started
        samples += len(outcome.samples)
    n = max(1, len(chosen))
    total_pairs = len(plan.pairs)
    return {"timed_pairs": len(chosen), "seconds_per_pair": seconds / n, "samples_per_pair": samples / n,
            "est_samples": round(samples / n * total_pairs), "est_bytes": round(nbytes / n * total_pairs),
            "est_cpu_seconds": seconds / n * total_pairs}
