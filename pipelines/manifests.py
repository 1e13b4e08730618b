"""Parquet manifests of a build: explicit schemas, atomic writes, assembly from per-group parts.

Layout under the manifest folder (`data_manifests/<build>/` by default):
  images.parquet, pairs.parquet, samples.parquet, rejects.parquet, shards.parquet  (final, sorted)
  build.json, wids.json
  parts/<split>-g<group>.<table>.parquet + parts/<split>-g<group>.done.json        (one set per shard group)
  parts/build-config.json                                                           (the resume lock)

`finalize` assembles the final tables from the parts of every finished group (`pipelines.resume` writes
and reads the done markers).

`samples.parquet.shard` and `shards.parquet.shard` are paths relative to the shard folder
(`<split>/<build>-<split>-NNNNNN.tar`); `offset` is the sample's index inside that tar.
`wids.json` urls are relative to the manifest folder (wids resolves relative urls against the json's
own location), so a build can be moved as long as both folders move together.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq

from prep.io import atomic_open, write_bytes_atomic, write_json_atomic
from prep.storage import Location

TABLES = ("images", "pairs", "samples", "rejects", "shards")
PARTS_DIR = "parts"

# a finding without a location (CBIS-DDSM whose ROI mask was not downloaded) has null box fields
FINDING = pa.struct([("category", pa.string()), ("birads", pa.string()), ("xmin", pa.float64()),
                     ("ymin", pa.float64()), ("xmax", pa.float64()), ("ymax", pa.float64()),
                     ("pathology", pa.string())])  # malignant | benign | benign_without_callback | null

IMAGES_SCHEMA = pa.schema([
    ("dataset", pa.string()), ("study_id", pa.string()), ("series_id", pa.string()), ("image_id", pa.string()),
    ("rel_path", pa.string()), ("laterality", pa.string()), ("view", pa.string()), ("split", pa.string()),
    ("manufacturer", pa.string()), ("transfer_syntax", pa.string()), ("photometric", pa.string()),
    ("bits_stored", pa.int32()), ("rows", pa.int32()), ("cols", pa.int32()), ("spacing_mm", pa.list_(pa.float64())),
    ("spacing_source", pa.string()),  # header | assumed (--assume-spacing-mm); null when never decoded
    ("voi_kind", pa.string()), ("inverted", pa.bool_()), ("laterality_tag", pa.string()), ("view_tag", pa.string()),
    ("chest_wall_side", pa.string()), ("orientation_flag", pa.string()), ("breast_area_mm2", pa.float64()),
    ("findings", pa.list_(FINDING)), ("breast_birads", pa.string()), ("breast_density", pa.string()),
    ("status", pa.string()), ("reason", pa.string()),
])

PAIRS_SCHEMA = pa.schema([
    ("dataset", pa.string()), ("split", pa.string()), ("study_id", pa.string()), ("view", pa.string()),
    ("left_image_id", pa.string()), ("right_image_id", pa.string()),
    ("affine_l_to_r", pa.list_(pa.float64())), ("affine_r_to_l", pa.list_(pa.float64())),
    ("method", pa.string()), ("ecc_mask", pa.float64()), ("ecc_intensity", pa.float64()), ("dice", pa.float64()),
    ("area_ratio", pa.float64()), ("rotation_deg", pa.float64()), ("scale", pa.float64()), ("reg_ok", pa.bool_()),
    ("reason", pa.string()), ("n_samples", pa.int64()), ("seconds", pa.float64()), ("seed", pa.int64()),
    ("status", pa.string()),
    # the transform the patch centres map through (prep.register): "affine"
    ("transform", pa.string()),
    # QC's second criterion (mm, the worse direction) and the pair-identity flags (prep.register), null: none
    ("outline_p90_mm", pa.float64()), ("identity_flag", pa.string()),
    # which re-take each side's image is (pipelines.plan.retake_choice); null when each side had one image
    ("retake_choice", pa.string()),
])

# The label fields are read by evaluation only (ARCHITECTURE.md "Shards and manifests").
SAMPLE_FIELDS = [
    ("key", pa.string()), ("shard", pa.string()), ("offset", pa.int64()), ("dataset", pa.string()),
    ("split", pa.string()), ("study_id", pa.string()), ("view", pa.string()), ("ipsi_lat", pa.string()),
    ("ipsi_image_id", pa.string()), ("contra_image_id", pa.string()), ("patch_px", pa.int32()),
    ("mm_per_px", pa.float64()),
    ("ipsi_cx", pa.float64()), ("ipsi_cy", pa.float64()), ("contra_cx", pa.float64()), ("contra_cy", pa.float64()),
    ("ipsi_cx_orig", pa.float64()), ("ipsi_cy_orig", pa.float64()),
    ("contra_cx_orig", pa.float64()), ("contra_cy_orig", pa.float64()),
    ("tissue_frac_ipsi", pa.float64()), ("tissue_frac_contra", pa.float64()),
    ("ipsi_abnormal", pa.bool_()), ("contra_abnormal", pa.bool_()), ("lesion_overlap", pa.float64()),
    ("finding_categories", pa.list_(pa.string())), ("finding_birads", pa.list_(pa.string())),
    ("breast_birads_ipsi", pa.string()), ("breast_birads_contra", pa.string()), ("density", pa.string()),
    ("seed", pa.int64()), ("sampling", pa.string()),
]
SAMPLES_SCHEMA = pa.schema(SAMPLE_FIELDS)
# what process_pair's PatchSample.meta must provide (the rest is added by the build)
SAMPLE_META_KEYS = tuple(n for n, _ in SAMPLE_FIELDS if n not in ("key", "shard", "offset", "split", "dataset"))

REJECTS_SCHEMA = pa.schema([
    ("dataset", pa.string()), ("split", pa.string()), ("study_id", pa.string()), ("view", pa.string()),
    ("image_id", pa.string()), ("laterality", pa.string()), ("level", pa.string()),  # image | pair
    ("stage", pa.string()),  # plan | decode | process
    ("reason", pa.string()), ("detail", pa.string()),
])

SHARDS_SCHEMA = pa.schema([
    ("shard", pa.string()), ("split", pa.string()), ("group", pa.int64()), ("nsamples", pa.int64()),
    ("bytes", pa.int64()), ("sha256", pa.string()),
])

SCHEMAS = {"images": IMAGES_SCHEMA, "pairs": PAIRS_SCHEMA, "samples": SAMPLES_SCHEMA,
           "rejects": REJECTS_SCHEMA, "shards": SHARDS_SCHEMA}
SORT_KEYS = {"images": ["study_id", "image_id"], "pairs": ["split", "study_id", "view"],
             "samples": ["shard", "offset"], "rejects": ["study_id", "view", "image_id", "reason"],
             "shards": ["shard"]}


def part_path(manifests_dir: Location, group_name: str, table: str) -> Location:
    """`parts/<split>-g<group>.<table>.parquet`, or the group's `.done.json` marker for table "done"."""
    suffix = "done.json" if table == "done" else f"{table}.parquet"
    return manifests_dir / PARTS_DIR / f"{group_name}.{suffix}"


def write_table(path: Location, name: str, rows: list[dict]) -> dict:
    """Rows -> Parquet with the table's explicit schema, atomically; returns the done marker's record of the
    file ({"sha256", "bytes"}: a part is small, hashed in memory rather than read back)."""
    table = pa.Table.from_pylist(rows, schema=SCHEMAS[name])
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    data = buffer.getvalue()
    write_bytes_atomic(path, data)
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def read_table(path: Location, name: str) -> pa.Table:
    with path.open("rb") as handle:
        return pq.read_table(handle, schema=SCHEMAS[name])


def assemble(parts: list[Location], name: str, extra_rows: list[dict] | None = None) -> pa.Table:
    """Concatenate part files (given in sorted order) plus client-side rows, sorted by the table's key."""
    tables = [read_table(p, name) for p in parts]
    if extra_rows:
        tables.append(pa.Table.from_pylist(extra_rows, schema=SCHEMAS[name]))
    table = pa.concat_tables(tables) if tables else SCHEMAS[name].empty_table()
    return table.sort_by([(k, "ascending") for k in SORT_KEYS[name]])


def write_final_table(path: Location, table: pa.Table) -> None:
    with atomic_open(path) as handle:
        pq.write_table(table, handle)


def wids_url(shards_dir: Location, manifests_dir: Location, shard: str) -> str:
    """A shard's wids url: relative to the manifest folder on one filesystem, else the shard's full URL."""
    if shards_dir.protocol != manifests_dir.protocol:
        return (shards_dir / shard).url
    return posixpath.relpath((shards_dir / shard).path, manifests_dir.path)


def wids_index(shard_rows: list[dict], shards_dir: Location, manifests_dir: Location, name: str) -> dict:
    """The wids shard list; urls relative to the manifest folder."""
    shardlist = [{"url": wids_url(shards_dir, manifests_dir, r["shard"]), "nsamples": r["nsamples"]}
                 for r in sorted(shard_rows, key=lambda r: r["shard"])]
    return {"wids_version": 1, "name": name, "shardlist": shardlist}


def finalize(manifests_dir: Location, shards_dir: Location, build: str, extra: dict[str, list[dict]],
             pairs_planned: dict[str, int]) -> dict:
    """Assemble the final manifests from every finished group's parts (sorted) plus the client-side `extra`
    rows (the plan's rejects), write them and `wids.json`; return the build's counts."""
    parts = (manifests_dir / PARTS_DIR).glob("*.done.json")  # sorted
    stems = [p.name[: -len(".done.json")] for p in parts]
    tables = {}
    for name in TABLES:
        files = [manifests_dir / PARTS_DIR / f"{stem}.{name}.parquet" for stem in stems]
        tables[name] = assemble(files, name, extra.get(name))
        write_final_table(manifests_dir / f"{name}.parquet", tables[name])
    shard_rows = tables["shards"].to_pylist()
    write_json_atomic(manifests_dir / "wids.json", wids_index(shard_rows, shards_dir, manifests_dir, build))
    samples = tables["samples"].select(["split", "ipsi_abnormal", "contra_abnormal", "sampling"]).to_pylist()
    per_split: dict[str, Counter] = {}
    for s in samples:
        label = "ipsi_abnormal" if s["ipsi_abnormal"] else "contra_abnormal" if s["contra_abnormal"] else "normal"
        per_split.setdefault(s["split"], Counter())[label] += 1
    pairs = tables["pairs"].select(["split", "status"]).to_pylist()
    image_status = tables["images"].column("status").to_pylist()
    spacing_sources = Counter(tables["images"].column("spacing_source").to_pylist())
    return {
        "pairs_planned": pairs_planned,
        "pairs_ok": dict(Counter(p["split"] for p in pairs if p["status"] == "ok")),
        "samples": {k: dict(sorted(v.items())) for k, v in sorted(per_split.items())},
        "n_samples": len(samples),
        "images": len(image_status), "images_rejected": sum(s != "ok" for s in image_status),
        "images_spacing_assumed": spacing_sources.get("assumed", 0),
        "rejects": dict(sorted(Counter(tables["rejects"].column("reason").to_pylist()).items())),
        "shards": dict(Counter(r["split"] for r in shard_rows)),
        "n_shards": len(shard_rows), "bytes": sum(r["bytes"] for r in shard_rows),
    }
