"""Plan a build: images table -> (study, view) pairs -> rejects with reasons -> shard groups per split.

Everything here runs in the client and reads headers only (through the dataset adapter; `read_headers`
hands them to the cluster's workers once it is up). The plan is deterministic for given inputs and
options; its hash names the build and guards resumes.

Plan-stage reject reasons (rejects.parquet `stage == "plan"`):
  image level: the `prep.decode.UnsupportedImage` reason of the header check (unreadable, for_processing,
    multi_frame, colour, bad_geometry, no_pixel_spacing unless `--assume-spacing-mm`, ...), `missing_file`,
    `unknown_laterality`, `unknown_view`
  pair level: `retake_not_chosen` (a side has several usable images of the view, re-takes: the pair uses one
    of them, chosen by `choose_retake`, and the others are rejected; a refused one beside a usable one keeps its
    own image-level reason), `unpaired` (the study -- the
    pairing unit: a patient for CBIS-DDSM or `--pair-by patient` -- has images of one side only),
    `missing_partner` (the other side has images, but none of this view), `laterality_disagreement` /
    `view_disagreement` (labels vs header tags; the whole pair is rejected), `partner_rejected` (the other
    image of the pair was rejected).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.errors import BuildError
from pipelines.shards import derive_seed
from prep.codec import CODECS
from prep.config import PrepConfig
from prep.datasets import ADAPTERS, DatasetError, ImageRecord, get_adapter, read_header_checked
from prep.decode import MAX_SPACING_MM, MIN_SPACING_MM
from prep.knobs import check_knobs, knob

if TYPE_CHECKING:
    from pipelines.cluster import DaskSession

PLAN_VERSION = 1
LATERALITIES = ("L", "R")
VIEWS = ("CC", "MLO")
PAIR_FLAGS = ("laterality_disagreement", "view_disagreement")
PAIR_BY = ("study", "patient")

# What a user can do about the most common reason when nothing pairs (the build's `no_pairs` message).
REJECT_FIXES = {
    "no_pixel_spacing": "the DICOMs state no pixel spacing and it is never guessed: give the archive's with "
                        "--assume-spacing-mm MM (recorded in build.json and as images.parquet spacing_source; "
                        "CBIS-DDSM: see docs/USAGE.md)",
    "unknown_view": "no CC/MLO view in the labels or the tags (ViewPosition, ViewCodeSequence, PatientOrientation): "
                    "use the archive's own adapter (--dataset) so the view comes from its tables",
    "unknown_laterality": "no L/R laterality in the labels or the tags (ImageLaterality, Laterality): use the "
                          "archive's own adapter (--dataset)",
    "unpaired": "every study holds one side only; if the archive stores each image as its own study, pair by "
                "patient: --pair-by patient (dicom-dir), or use the archive's own adapter (--dataset)",
    "missing_partner": "no study has both sides of a view: check --dataset and --pair-by",
    "unreadable": "the files do not read as DICOM: check --root and --dataset",
    "missing_file": "the tables list files that are not under --root: check --root (a partial download?)",
    "unsupported_transfer_syntax": "install the codecs (pip install -e '.') or convert the files",
}
HEADER_CHUNK = 256  # header reads per cluster task: enough work per round trip, still many tasks


@dataclass(frozen=True)
class BuildOptions:
    """Everything that changes the bytes of a build (its hash guards resumes)."""

    dataset: str = knob("vindr", "Dataset adapter: " + " | ".join(sorted(ADAPTERS))
                        + " (docs/USAGE.md: what each reads).", "Input")
    prep: PrepConfig = field(default_factory=PrepConfig)  # the image core's knobs (their own options)
    codec: str = knob("npy", f"Patch codec: {' | '.join(CODECS)}.", "Shards", choices=CODECS)
    shard_max_samples: int = knob(10_000, "Samples per shard at most.", "Shards", min=1)
    shard_max_bytes: int = knob(500_000_000, "Bytes per shard at most (500000000 = 500 MB).", "Shards", min=1)
    group_pairs: int = knob(100, "Pairs per shard group (one Dask task), on average.", "Shards", min=1)
    assume_spacing_mm: float | None = knob(
        None, "Pixel spacing (mm) for images whose header states none (CBIS-DDSM never does). Never guessed: "
        "without this flag they are rejected as no_pixel_spacing. Recorded in build.json and images.parquet "
        "(spacing_source = assumed); part of the config hash. Default: none.", "Input",
        min=MIN_SPACING_MM, max=MAX_SPACING_MM)
    pair_by: str | None = knob(None, "dicom-dir: pair L/R within a study (StudyInstanceUID) or a patient "
                               "(PatientID, for archives that store each view as its own study). Default: study.",
                               "Input", choices=PAIR_BY)

    def __post_init__(self) -> None:
        """Refuses a bad value with `prep.knobs.ConfigError` (a ValueError) naming the flag."""
        check_knobs(self)

    def to_dict(self) -> dict:
        # the two optional keys appear only when set, so builds that use neither keep their config hash
        optional = {k: v for k, v in (("assume_spacing_mm", self.assume_spacing_mm), ("pair_by", self.pair_by))
                    if v is not None}
        return {"dataset": self.dataset, "prep": self.prep.to_dict(), "codec": self.codec,
                "shard_max_samples": self.shard_max_samples, "shard_max_bytes": self.shard_max_bytes,
                "group_pairs": self.group_pairs, **optional}

    @classmethod
    def from_dict(cls, data: dict) -> "BuildOptions":
        return cls(**{**data, "prep": PrepConfig.from_dict(data["prep"])})


@dataclass
class PlannedPair:
    split: str
    study_id: str
    view: str
    group: int
    seed: int
    left: ImageRecord
    right: ImageRecord
    # how the images were chosen among a side's re-takes (pairs.parquet `retake_choice`); None: one image a side
    retake_choice: str | None = None


@dataclass
class ShardGroup:
    split: str
    group: int
    pairs: list[PlannedPair]

    @property
    def name(self) -> str:
        return f"{self.split}-g{self.group:06d}"

    def to_dict(self) -> dict:
        return {"split": self.split, "group": self.group,
                "pairs": [{**dataclasses.asdict(p), "left": p.left.to_dict(), "right": p.right.to_dict()}
                          for p in self.pairs]}

    @classmethod
    def from_dict(cls, data: dict) -> "ShardGroup":
        pairs = [PlannedPair(**{**p, "left": ImageRecord.from_dict(p["left"]),
                                "right": ImageRecord.from_dict(p["right"])}) for p in data["pairs"]]
        return cls(split=data["split"], group=data["group"], pairs=pairs)


@dataclass
class Plan:
    options: BuildOptions
    records: list[ImageRecord]
    groups: list[ShardGroup]
    rejects: list[dict]  # rejects.parquet rows, stage "plan"
    rejected_images: list[ImageRecord]
    config_hash: str

    @property
    def pairs(self) -> list[PlannedPair]:
        return [p for g in self.groups for p in g.pairs]

    def default_build_name(self) -> str:
        return f"{self.options.dataset}-{self.config_hash[:8]}"

    def counts(self) -> dict:
        pairs_per_split = Counter(p.split for p in self.pairs)
        return {"images": len(self.records), "pairs": dict(sorted(pairs_per_split.items())),
                "groups": dict(sorted(Counter(g.split for g in self.groups).items())),
                "rejects": dict(sorted(Counter(r["reason"] for r in self.rejects).items()))}


def reject_row(record: ImageRecord, reason: str, detail: str, level: str, stage: str = "plan") -> dict:
    return {"dataset": record.dataset, "split": record.split, "study_id": record.study_id, "view": record.view,
            "image_id": record.image_id, "laterality": record.laterality, "level": level, "stage": stage,
            "reason": reason, "detail": detail}


def image_reject_reason(record: ImageRecord, assume_spacing_mm: float | None = None) -> tuple[str, str] | None:
    """Why this image cannot be used on its own, from its header and labels; None when it can."""
    if refusal := record.header_refusal(assume_spacing_mm):
        return refusal, record.header_detail or ""
    if record.laterality not in LATERALITIES:
        return "unknown_laterality", f"laterality {record.laterality!r}"
    if record.view not in VIEWS:
        return "unknown_view", f"view {record.view!r}"
    return None


RETAKE_RULE = "first_image_id"


def choose_retake(images: list[ImageRecord]) -> ImageRecord:
    """The image a pair uses among one side's usable images of a view (re-takes): the first by image_id.

    Deterministic and header-only (the plan reads no pixels). The headers the plan keeps carry no acquisition
    time, so the rule claims no order of acquisition; every re-take of a screening view shows the same breast,
    and the pair's registration QC still judges whichever image is chosen.
    """
    return min(images, key=lambda m: m.image_id)


def retake_choice(sides: dict[str, list[ImageRecord]]) -> str | None:
    """pairs.parquet `retake_choice`: the rule and the candidates per side ("first_image_id L1/2 R1/1"), None
    when each side has one image."""
    if all(len(sides[lat]) == 1 for lat in LATERALITIES):
        return None
    return f"{RETAKE_RULE} " + " ".join(f"{lat}1/{len(sides[lat])}" for lat in LATERALITIES)


def pair_images(records: list[ImageRecord], assume_spacing_mm: float | None = None,
                ) -> tuple[list[tuple[ImageRecord, ImageRecord]], list[dict]]:
    """(left, right) per (study, view) and the plan rejects of every image that is not in a pair."""
    pairs, rejects = plan_pairs(records, assume_spacing_mm)
    return [(left, right) for left, right, _ in pairs], rejects


def plan_pairs(records: list[ImageRecord], assume_spacing_mm: float | None = None,
               ) -> tuple[list[tuple[ImageRecord, ImageRecord, str | None]], list[dict]]:
    """`pair_images` with each pair's `retake_choice`."""
    by_pair: dict[tuple[str, str], list[ImageRecord]] = {}
    rejects: list[dict] = []
    reason_of = functools.partial(image_reject_reason, assume_spacing_mm=assume_spacing_mm)
    for record in records:
        problem = reason_of(record)
        if problem and problem[0] in ("unknown_laterality", "unknown_view"):
            rejects.append(reject_row(record, *problem, level="image"))
            continue
        by_pair.setdefault((record.study_id, record.view), []).append(record)
    # every image of a study counts, an unknown side too: a study is one-sided only when all its images are
    # known to be of the same side
    sides_of_study: dict[str, set[str]] = {}
    for record in records:
        sides_of_study.setdefault(record.study_id, set()).add(record.laterality)

    pairs = []
    for (study_id, view), members in sorted(by_pair.items()):
        sides = {lat: [m for m in members if m.laterality == lat] for lat in LATERALITIES}
        # an image the header check refused beside a usable one of the same side and view (OPTIMAM's FOR
        # PROCESSING twin of a FOR PRESENTATION image) is rejected for its own reason, not as a re-take
        for lat in LATERALITIES:
            refused = [(m, reason_of(m)) for m in sides[lat] if reason_of(m)]
            if refused and len(refused) < len(sides[lat]):
                rejects += [reject_row(m, *problem, level="image") for m, problem in refused]
                sides[lat] = [m for m in sides[lat] if not reason_of(m)]
                members = [m for m in members if not any(m is r for r, _ in refused)]
        choice = None
        if sides["L"] and sides["R"]:
            choice = retake_choice(sides)
            for lat in LATERALITIES:
                if len(sides[lat]) > 1:
                    chosen = choose_retake(sides[lat])
                    detail = f"{lat}-{view} re-take; the pair uses {chosen.image_id} ({RETAKE_RULE})"
                    rejects += [reject_row(m, *reason_of(m), level="image") if reason_of(m) else
                                reject_row(m, "retake_not_chosen", detail, "image")
                                for m in sides[lat] if m is not chosen]
                    sides[lat] = [chosen]
        if not sides["L"] or not sides["R"]:
            one_sided = len(sides_of_study[study_id]) == 1
            for m in members:
                problem = reason_of(m)
                rejects.append(reject_row(m, *problem, level="image") if problem else
                               reject_row(m, "unpaired", "no image of the other side in this study", "pair")
                               if one_sided else
                               reject_row(m, "missing_partner", f"no {view} image of the other side", "pair"))
            continue
        left, right = sides["L"][0], sides["R"][0]
        problems = {m.image_id: reason_of(m) for m in (left, right)}
        if any(problems.values()):
            for m in (left, right):
                if problems[m.image_id]:
                    rejects.append(reject_row(m, *problems[m.image_id], level="image"))
                else:
                    other = next(p for p in problems.values() if p)
                    rejects.append(reject_row(m, "partner_rejected", f"partner rejected: {other[0]}", "pair"))
            continue
        flags = [f for f in PAIR_FLAGS if f in left.flags or f in right.flags]
        if flags:
            detail = "; ".join(f"{m.laterality}: labels {m.laterality}-{m.view}, header "
                               f"{m.header.get('laterality_tag')}-{m.header.get('view_tag')}" for m in (left, right))
            rejects += [reject_row(m, flags[0], detail, "pair") for m in (left, right)]
            continue
        pairs.append((left, right, choice))
    return pairs, rejects


def no_pairs_hint(rejects: list[dict]) -> str:
    """The most common reject reason and what fixes it (`partner_rejected` only follows another reason)."""
    counts = Counter(r["reason"] for r in rejects if r["reason"] != "partner_rejected") or Counter(
        r["reason"] for r in rejects)
    if not counts:
        return "the archive lists no images: check --root and --dataset"
    reason, n = min(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return f"top reason {reason} ({n} images): {REJECT_FIXES.get(reason, 'see the detail column of rejects.parquet')}"


def study_bucket(study_id: str) -> int:
    return int(hashlib.sha256(study_id.encode()).hexdigest()[:12], 16)


def pair_seed(options: BuildOptions, left: ImageRecord) -> int:
    """The sampling seed of the (study, view) pair whose left image is `left`: the build's, and `prep inspect`'s."""
    return derive_seed(options.prep.seed, options.dataset, left.study_id, left.view)


def make_plan(records: list[ImageRecord], options: BuildOptions) -> Plan:
    """Pair, reject and group the images; groups are hash(study) buckets within each split."""
    pairs, rejects = plan_pairs(records, options.assume_spacing_mm)
    groups: list[ShardGroup] = []
    for split in sorted({left.split for left, _, _ in pairs}):
        split_pairs = [p for p in pairs if p[0].split == split]
        n_groups = max(1, math.ceil(len(split_pairs) / options.group_pairs))
        buckets: dict[int, list[PlannedPair]] = {}
        for left, right, choice in split_pairs:
            group = study_bucket(left.study_id) % n_groups
            buckets.setdefault(group, []).append(
                PlannedPair(split=split, study_id=left.study_id, view=left.view, group=group,
                            seed=pair_seed(options, left),
                            left=left, right=right, retake_choice=choice))
        groups += [ShardGroup(split, g, sorted(ps, key=lambda p: (p.study_id, p.view)))
                   for g, ps in sorted(buckets.items())]
    paired = {r.image_id for g in groups for p in g.pairs for r in (p.left, p.right)}
    rejected_images = [r for r in records if r.image_id not in paired]
    rejects.sort(key=lambda r: (r["study_id"], r["view"], r["image_id"], r["reason"]))
    return Plan(options=options, records=records, groups=groups, rejects=rejects,
                rejected_images=rejected_images, config_hash=plan_hash(options, groups))


def plan_hash(options: BuildOptions, groups: list[ShardGroup]) -> str:
    """16 hex chars over the options and the exact pair -> group assignment (inputs by id and path)."""
    layout = [[g.split, g.group, [[p.study_id, p.view, p.left.image_id, p.left.rel_path, p.right.image_id,
                                   p.right.rel_path] for p in g.pairs]] for g in groups]
    blob = json.dumps({"version": PLAN_VERSION, "options": options.to_dict(), "groups": layout},
                      sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------- headers


def read_header_chunk(records: list[ImageRecord]) -> list[ImageRecord]:
    """The cluster task of planning: fill each record's header facts and flags."""
    return [read_header_checked(r) for r in records]


def read_headers(records: list[ImageRecord], dask: DaskSession | None) -> list[ImageRecord]:
    """Header reads (file I/O + pydicom parsing), in order: in this process while the cluster is starting,
    on its workers once it is up (a large archive's planning then scales with the workers)."""
    chunks = [records[i: i + HEADER_CHUNK] for i in range(0, len(records), HEADER_CHUNK)]
    if dask is not None and len(chunks) > 1:
        dask.start()  # work for the cluster: start it (if the build has not) while this process reads
    done: list[ImageRecord] = []
    while chunks and (dask is None or len(chunks) == 1 or not dask.has_workers()):
        done += read_header_chunk(chunks.pop(0))
    if chunks:
        client = dask.client()
        futures = client.map(read_header_chunk, chunks, pure=False)  # unique keys: a scheduler may be shared
        done += [r for part in client.gather(futures) for r in part]
    return done


def load_records(dataset: str, root: Path, dask: DaskSession | None = None,
                 pair_by: str | None = None, study_id: str | None = None) -> list[ImageRecord]:
    """The adapter's images table (only `study_id`'s images when given: their headers alone are read); headers
    read through `read_headers` when the adapter can defer them."""
    adapter = get_adapter(dataset)
    accepts = inspect.signature(adapter).parameters
    kwargs = {}
    if pair_by is not None:
        if "pair_by" not in accepts:
            raise BuildError("bad_input", f"--pair-by: the {dataset} adapter pairs its own way (dicom-dir only)")
        kwargs["pair_by"] = pair_by

    def wanted(records: list[ImageRecord]) -> list[ImageRecord]:
        return records if study_id is None else [r for r in records if r.study_id == study_id]

    try:
        if "read_headers" not in accepts:
            return wanted(adapter(root, **kwargs).images())
        return read_headers(wanted(adapter(root, read_headers=False, **kwargs).images()), dask)
    except DatasetError as exc:
        raise BuildError("bad_input", str(exc)) from exc


def plan_build(root: Path, options: BuildOptions, dask: DaskSession | None = None) -> Plan:
    """Read the archive's images table (`options.dataset`'s adapter; headers on the cluster when it is up) and
    plan it."""
    return make_plan(load_records(options.dataset, root, dask, options.pair_by), options)
