"""`build_shards`: plan an archive, run one Dask task per shard group, assemble the manifests.

Each task (`run_group`) decodes its pairs (`prep.decode`), calls `prep.pairs.process_pair`, writes its own
tars and Parquet parts and, last, a done marker holding its counts, the sha256 of each of its files and the
config hash; it returns a small counts dict (arrays never travel through the scheduler). A rerun of the same
command skips groups whose marker matches the config hash and whose files hash-verify, deletes stray temp
files and redoes the rest, so an interrupted build ends with the same bytes as an uninterrupted one.

Wall time (docs/PERFORMANCE.md "Prep: Dask scaling"): the Dask session starts in the background while the
client plans (`pipelines.cluster`); header reads move to the workers once they are up; groups are submitted
largest first so that no worker is left alone with a big group at the end; the workers shut down while
the client assembles the manifests. None of this changes a byte of the output.
"""

from __future__ import annotations

import concurrent.futures
import importlib.metadata
import importlib.util
import inspect
import json
import os
import shutil
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from rich.console import Console
from rich.table import Table

from pipelines import manifests as mf
from pipelines.cluster import DaskSession
from pipelines.plan import BuildOptions, Plan, PlannedPair, ShardGroup, make_plan, no_pairs_hint, reject_row
from pipelines.progress import make_progress
from pipelines.shards import ShardRoller, encode_sample, group_of_shard_index
from prep.codec import sample_key
from prep.datasets import DatasetError, ImageRecord, get_adapter, read_header_checked
from prep.decode import UnsupportedImage, decode_dicom, read_dicom

MIN_SHARDS_PER_SPLIT = 8  # a typical GPUs x loader workers; fewer leaves workers idle
PARTS_DIR = "parts"
LOCK_FILE = "build-config.json"
VERSION_PACKAGES = ("contralateral", "numpy", "pydicom", "opencv-python-headless", "scikit-image", "pyarrow",
                    "webdataset", "dask", "distributed")


class BuildError(Exception):
    """A build that cannot start or finish. `reason`: config_changed, bad_input, no_pairs, group_failed."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# ----------------------------------------------------------------------------------------------- per pair


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


def process_planned_pair(planned: PlannedPair, options: BuildOptions) -> PairOutcome:
    """Decode both images and run `process_pair`; every failure becomes reject rows, never an exception."""
    from prep.pairs import ImageInput, process_pair

    timings = {"decode_s": 0.0, "process_s": 0.0}
    records = {"L": planned.left, "R": planned.right}
    decoded, failures = {}, {}
    started = time.perf_counter()
    for side, record in records.items():
        try:
            decoded[side] = decode_dicom(read_dicom(record.path), assumed_spacing_mm=options.assume_spacing_mm)
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
            facts = {**record.header, **(decoded[side].meta if side in decoded else {})}
            images.append(image_row(record, facts, None, "rejected", reason))
        return PairOutcome(images=images, pair=None, samples=[], rejects=rejects, timings=timings)

    inputs = {side: ImageInput(image_id=r.image_id, laterality=r.laterality, view=r.view, decoded=decoded[side],
                               findings=r.findings, breast_birads=r.breast_birads, breast_density=r.breast_density,
                               study_id=r.study_id) for side, r in records.items()}
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
        facts = {**record.header, **decoded[side].meta, "spacing_mm": decoded[side].spacing_mm}
        info = infos.get(side, {})
        status = "ok" if info.get("status") == "ok" else "rejected"
        images.append(image_row(record, facts, info, status, None if status == "ok" else info.get("status", reason)))
    pair_row = {**{f: None for f in mf.PAIRS_SCHEMA.names}, **pair_fields,
                "dataset": planned.left.dataset, "split": planned.split, "study_id": planned.study_id,
                "view": planned.view, "left_image_id": planned.left.image_id,
                "right_image_id": planned.right.image_id, "seed": planned.seed,
                "status": "ok" if reason is None else "rejected", "n_samples": len(samples)}
    if reason and not pair_row.get("reason"):
        pair_row["reason"] = reason
    rejects = [reject_row(r, reason, error[:500], "pair", stage="process") for r in records.values()] if reason else []

    rows, counters = [], Counter()
    for sample in samples:
        lat = sample.meta["ipsi_lat"]
        key = sample_key(planned.left.dataset, planned.study_id, planned.view, lat, counters[lat])
        counters[lat] += 1
        row = {"key": key, "dataset": planned.left.dataset, "split": planned.split,
               **{k: sample.meta.get(k) for k in mf.SAMPLE_META_KEYS}}
        rows.append((row, sample))
    return PairOutcome(images=images, pair=pair_row, samples=rows, rejects=rejects, timings=timings)


# ----------------------------------------------------------------------------------------------- per group


def part_path(manifests_dir: Path, group: ShardGroup | dict, table: str) -> Path:
    split, index = (group.split, group.group) if isinstance(group, ShardGroup) else (group["split"], group["group"])
    suffix = "done.json" if table == "done" else f"{table}.parquet"
    return Path(manifests_dir) / PARTS_DIR / f"{split}-g{index:06d}.{suffix}"


def limit_native_threads() -> None:
    """One thread per worker process: OpenCV's pool would oversubscribe the cores. (OpenMP/BLAS pools read
    their variables at import, before any task runs: Dask's nanny sets those for the worker process.)"""
    import cv2

    cv2.setNumThreads(1)


def run_group(group_spec: dict, context: dict) -> dict:
    """The Dask task: process one shard group, write its tars, parts and (last) its done marker."""
    limit_native_threads()
    group = ShardGroup.from_dict(group_spec)
    options = BuildOptions.from_dict(context["options"])
    shards_dir, manifests_dir = Path(context["shards_dir"]), Path(context["manifests_dir"])
    roller = ShardRoller(shards_dir=shards_dir, build=context["build"], split=group.split, group=group.group,
                         seed=options.prep.seed, max_samples=options.shard_max_samples,
                         max_bytes=options.shard_max_bytes)
    images, pairs, rejects = [], [], []
    timings = Counter()
    for planned in group.pairs:
        outcome = process_planned_pair(planned, options)
        images += outcome.images
        rejects += outcome.rejects
        if outcome.pair is not None:
            pairs.append(outcome.pair)
        timings.update(outcome.timings)
        started = time.perf_counter()
        for row, sample in outcome.samples:
            roller.add(encode_sample(row, sample.ipsi, sample.contra, options.codec))
        timings["write_s"] += time.perf_counter() - started
    started = time.perf_counter()
    roller.flush()
    tables = {"images": images, "pairs": pairs, "samples": roller.rows, "rejects": rejects, "shards": roller.shards}
    for name, rows in tables.items():
        mf.write_table(part_path(manifests_dir, group, name), name, rows)
    timings["write_s"] += time.perf_counter() - started
    counts = {"split": group.split, "group": group.group, "pairs": len(group.pairs),
              "pairs_ok": sum(p["status"] == "ok" for p in pairs), "samples": len(roller.rows),
              "rejects": len({r["image_id"] for r in rejects}), "shards": len(roller.shards),
              "bytes": sum(s["bytes"] for s in roller.shards), "timings": dict(timings)}
    files = {f"shards/{s['shard']}": s["sha256"] for s in roller.shards}
    for name in tables:
        path = part_path(manifests_dir, group, name)
        files[f"manifests/{path.relative_to(manifests_dir).as_posix()}"] = mf.sha256_file(path)
    mf.write_json_atomic(part_path(manifests_dir, group, "done"),
                         {"config_hash": context["config_hash"], "counts": counts, "files": files})
    return counts


def _resolve(entry: str, shards_dir: Path, manifests_dir: Path) -> Path:
    root, _, rel = entry.partition("/")
    return (shards_dir if root == "shards" else manifests_dir) / rel


def finished_counts(group: ShardGroup, config_hash: str, shards_dir: Path, manifests_dir: Path) -> dict | None:
    """The counts of a group whose done marker matches the config and whose files hash-verify; else None."""
    marker = part_path(manifests_dir, group, "done")
    try:
        done = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    if done.get("config_hash") != config_hash:
        return None
    for entry, digest in done.get("files", {}).items():
        path = _resolve(entry, shards_dir, manifests_dir)
        if not path.is_file() or mf.sha256_file(path) != digest:
            return None
    return done["counts"]


def clear_group(group: ShardGroup, build: str, shards_dir: Path, manifests_dir: Path) -> None:
    """Delete whatever an unfinished run of this group left: its tars (its index block) and its parts."""
    for tar in (Path(shards_dir) / group.split).glob(f"{build}-{group.split}-*.tar"):
        index = tar.stem.rsplit("-", 1)[-1]
        if index.isdigit() and group_of_shard_index(int(index)) == group.group:
            tar.unlink()
    for table in (*mf.TABLES, "done"):
        part_path(manifests_dir, group, table).unlink(missing_ok=True)


def wipe_build(build: str, shards_dir: Path, manifests_dir: Path) -> None:
    """--overwrite: remove this build's tars, parts and final manifests (nothing else)."""
    for tar in Path(shards_dir).glob(f"*/{build}-*.tar"):
        tar.unlink()
    shutil.rmtree(Path(manifests_dir) / PARTS_DIR, ignore_errors=True)
    for name in (*mf.TABLES, "build", "wids"):
        for suffix in (".parquet", ".json"):
            (Path(manifests_dir) / f"{name}{suffix}").unlink(missing_ok=True)


def check_config(plan: Plan, build: str, manifests_dir: Path) -> None:
    """Refuse to mix configs in one build folder; write the lock that later runs compare against."""
    lock = Path(manifests_dir) / PARTS_DIR / LOCK_FILE
    if lock.is_file():
        previous = json.loads(lock.read_text())
        if previous.get("config_hash") != plan.config_hash:
            old, new = previous.get("options", {}), plan.options.to_dict()
            changed = sorted(k for k in {**old.get("prep", {}), **new["prep"]}
                             if old.get("prep", {}).get(k) != new["prep"].get(k))
            changed += sorted(k for k in new if k != "prep" and old.get(k) != new[k])
            raise BuildError("config_changed",
                             f"build {build!r} in {manifests_dir} was made with config {previous.get('config_hash')}, "
                             f"this run has {plan.config_hash} (changed: {', '.join(changed) or 'inputs'}); "
                             "use --overwrite to rebuild or another --build/--out/--manifests")
    mf.write_json_atomic(lock, {"config_hash": plan.config_hash, "build": build, "options": plan.options.to_dict()})


# ----------------------------------------------------------------------------------------------- build


def default_dirs(build: str, out: Path | None, manifests: Path | None) -> tuple[Path, Path]:
    return (Path(out or Path("shards") / build).resolve(), Path(manifests or Path("data_manifests") / build).resolve())


HEADER_CHUNK = 256  # header reads per cluster task: ~0.3-1 s of work, few round trips


def read_header_chunk(records: list[ImageRecord]) -> list[ImageRecord]:
    """The cluster task of planning: fill each record's header facts and flags."""
    return [read_header_checked(r) for r in records]


def read_headers(records: list[ImageRecord], dask: DaskSession | None) -> list[ImageRecord]:
    """Header reads (file I/O + pydicom parsing), in order: in this process while the cluster is starting,
    on its workers once it is up (a large archive's planning then scales with the workers)."""
    chunks = [records[i: i + HEADER_CHUNK] for i in range(0, len(records), HEADER_CHUNK)]
    done: list[ImageRecord] = []
    while chunks and (dask is None or len(chunks) == 1 or not dask.has_workers()):
        done += read_header_chunk(chunks.pop(0))
    if chunks:
        client = dask.client()
        futures = client.map(read_header_chunk, chunks, pure=False)  # unique keys: a scheduler may be shared
        done += [r for part in client.gather(futures) for r in part]
    return done


def load_records(dataset: str, root: Path, dask: DaskSession | None = None,
                 pair_by: str | None = None) -> list[ImageRecord]:
    """The adapter's images table; headers read through `read_headers` when the adapter can defer them."""
    adapter = get_adapter(dataset)
    accepts = inspect.signature(adapter).parameters
    kwargs = {}
    if pair_by is not None:
        if "pair_by" not in accepts:
            raise BuildError("bad_input", f"--pair-by: the {dataset} adapter pairs its own way (dicom-dir only)")
        kwargs["pair_by"] = pair_by
    try:
        if "read_headers" not in accepts:
            return adapter(root, **kwargs).images()
        return read_headers(adapter(root, read_headers=False, **kwargs).images(), dask)
    except DatasetError as exc:
        raise BuildError("bad_input", str(exc)) from exc


def plan_build(dataset: str, root: Path, options: BuildOptions, dask: DaskSession | None = None) -> Plan:
    return make_plan(load_records(dataset, root, dask, options.pair_by), options)


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


def package_versions() -> dict:
    versions = {}
    for name in VERSION_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def finalize(plan: Plan, build: str, shards_dir: Path, manifests_dir: Path) -> dict:
    """Assemble the final manifests from the parts (sorted) and the plan's rejects; return the counts."""
    parts = sorted((manifests_dir / PARTS_DIR).glob("*.done.json"))
    stems = [p.name[: -len(".done.json")] for p in parts]
    plan_reason = {}
    for row in plan.rejects:
        plan_reason.setdefault(row["image_id"], row["reason"])
    extra = {"images": [rejected_image_row(r, plan_reason.get(r.image_id, "rejected")) for r in plan.rejected_images],
             "rejects": plan.rejects}
    tables = {}
    for name in mf.TABLES:
        files = [manifests_dir / PARTS_DIR / f"{stem}.{name}.parquet" for stem in stems]
        tables[name] = mf.assemble(files, name, extra.get(name))
        mf.write_final_table(manifests_dir / f"{name}.parquet", tables[name])
    shard_rows = tables["shards"].to_pylist()
    mf.write_json_atomic(manifests_dir / "wids.json", mf.wids_index(shard_rows, shards_dir, manifests_dir, build))
    samples = tables["samples"].select(["split", "ipsi_abnormal", "contra_abnormal", "sampling"]).to_pylist()
    per_split: dict[str, Counter] = {}
    for s in samples:
        label = "ipsi_abnormal" if s["ipsi_abnormal"] else "contra_abnormal" if s["contra_abnormal"] else "normal"
        per_split.setdefault(s["split"], Counter())[label] += 1
    pairs = tables["pairs"].select(["split", "status"]).to_pylist()
    image_status = tables["images"].column("status").to_pylist()
    spacing_sources = Counter(tables["images"].column("spacing_source").to_pylist())
    return {
        "pairs_planned": dict(Counter(p.split for p in plan.pairs)),
        "pairs_ok": dict(Counter(p["split"] for p in pairs if p["status"] == "ok")),
        "samples": {k: dict(sorted(v.items())) for k, v in sorted(per_split.items())},
        "n_samples": len(samples),
        "images": len(image_status), "images_rejected": sum(s != "ok" for s in image_status),
        "images_spacing_assumed": spacing_sources.get("assumed", 0),
        "rejects": dict(sorted(Counter(tables["rejects"].column("reason").to_pylist()).items())),
        "shards": dict(Counter(r["split"] for r in shard_rows)),
        "n_shards": len(shard_rows), "bytes": sum(r["bytes"] for r in shard_rows),
    }


def reject_problem(summary: dict, max_fraction: float | None) -> str | None:
    """The message for a build that rejected more than `max_fraction` of its images; None when within it.

    The build itself is complete (manifests written): this is for callers that must not go on silently
    with an archive that is mostly unusable (a wrong adapter, an unreadable mount, a missing codec).
    """
    images, rejected = summary.get("images", 0), summary.get("images_rejected", 0)
    if max_fraction is None or not images or rejected / images <= max_fraction:
        return None
    top = sorted(summary["rejects"].items(), key=lambda kv: (-kv[1], kv[0]))[:3]
    reasons = ", ".join(f"{reason} {n}" for reason, n in top)
    return (f"{rejected} of {images} images rejected ({rejected / images:.0%}, above --max-reject-fraction "
            f"{max_fraction:g}); top reasons: {reasons}; every reject with its detail: "
            f"{Path(summary['manifests_dir']) / 'rejects.parquet'}. The manifests and shards of the usable "
            "pairs were written.")


def build_shards(dataset: str, root: Path | str, **kwargs) -> dict:
    """Plan, run (resumably) and finalize a build; returns the summary printed at the end.

    Keyword arguments are those of `run_build`. `dry_run` plans and times a few pairs, writes nothing and
    returns the plan summary. An output folder that cannot be written is a `BuildError("cannot_write")`.
    """
    try:
        return run_build(dataset, root, **kwargs)
    except OSError as exc:
        raise BuildError("cannot_write", str(exc)) from exc


def run_build(dataset: str, root: Path | str, *, options: BuildOptions | None = None, out: Path | None = None,
              manifests: Path | None = None, build: str | None = None, workers: int | None = None,
              scheduler: str | None = None, scheduler_file: str | None = None, memory_limit: str | None = None,
              overwrite: bool = False, dry_run: bool = False, console: Console | None = None) -> dict:
    """The Dask session starts first, in the background, so that it is up by the time planning is done."""
    uses_dask = not dry_run and (workers != 0 or bool(scheduler or scheduler_file))
    dask = DaskSession(workers, scheduler, scheduler_file, memory_limit) if uses_dask else None
    try:
        return build_in_session(dataset, Path(root), options or BuildOptions(dataset=dataset), dask,
                                out=out, manifests=manifests, build=build, workers=workers, overwrite=overwrite,
                                dry_run=dry_run, console=console or Console(stderr=True))
    finally:
        if dask is not None:
            dask.close()


def build_in_session(dataset: str, root: Path, options: BuildOptions, dask: DaskSession | None, *,
                     out: Path | None, manifests: Path | None, build: str | None, workers: int | None,
                     overwrite: bool, dry_run: bool, console: Console) -> dict:
    timings = {}
    build_started = started = time.perf_counter()
    plan = plan_build(dataset, root, options, dask)
    timings["plan_s"] = time.perf_counter() - started
    build = build or plan.default_build_name()
    shards_dir, manifests_dir = default_dirs(build, out, manifests)
    if not plan.groups and dry_run:
        raise BuildError("no_pairs", f"no usable L/R pair in {root} (rejects: {plan.counts()['rejects']}); "
                                     f"{no_pairs_hint(plan.rejects)}")
    if dry_run:
        summary = {"build": build, "shards_dir": str(shards_dir), "manifests_dir": str(manifests_dir),
                   "config_hash": plan.config_hash, **plan.counts(), "estimate": estimate(plan),
                   "workers": workers or os.cpu_count()}
        print_plan(summary, console)
        return summary

    started = time.perf_counter()
    done_counts, todo = resume_state(plan, build, shards_dir, manifests_dir, overwrite)
    timings["resume_check_s"] = time.perf_counter() - started
    context = {"options": options.to_dict(), "build": build, "shards_dir": str(shards_dir),
               "manifests_dir": str(manifests_dir), "config_hash": plan.config_hash}

    started = time.perf_counter()
    run_counts, failures = execute(todo, context, dask, console)
    timings["execute_s"] = time.perf_counter() - started
    if dask is not None:
        dask.close(wait=False)  # the workers exit while this process assembles the manifests
    if failures:
        raise BuildError("group_failed", f"{len(failures)} shard group(s) failed (rerun to resume): "
                                         + "; ".join(failures[:3]))

    started = time.perf_counter()
    counts = finalize(plan, build, shards_dir, manifests_dir)
    timings["finalize_s"] = time.perf_counter() - started
    for c in done_counts + run_counts:
        for k, v in c["timings"].items():
            timings[f"tasks_{k}"] = timings.get(f"tasks_{k}", 0.0) + v
    summary = {"build": build, "shards_dir": str(shards_dir), "manifests_dir": str(manifests_dir),
               "config_hash": plan.config_hash, "groups_run": len(todo), "groups_skipped": len(done_counts),
               **counts, "seconds": round(time.perf_counter() - build_started, 3)}
    mf.write_json_atomic(manifests_dir / "build.json", {
        "build": build, "dataset": dataset, "root": str(root.resolve()), "config_hash": plan.config_hash,
        "config": options.to_dict(), "plan": plan.counts(), "counts": counts, "labels": label_counts(plan),
        "pixel_spacing": {"assume_spacing_mm": options.assume_spacing_mm,
                          "images_assumed": counts["images_spacing_assumed"]},
        "timings": {k: round(v, 3) for k, v in timings.items()}, "versions": package_versions(),
        "git_commit": git_commit(), "shard_scheme": "see pipelines/shards.py",
        "wids_urls": "relative to this folder"})
    if not plan.groups:  # manifests (all rejects) are written first, so the user can read why
        raise BuildError("no_pairs", f"no usable L/R pair in {root}: all {len(plan.records)} images rejected, "
                                     f"{no_pairs_hint(plan.rejects)}; every reject with its detail: "
                                     f"{manifests_dir / 'rejects.parquet'}")
    print_summary(summary, console)
    return summary


def label_counts(plan: Plan) -> dict:
    """Findings the archive gave, and how many of them without a location (no box: no patch label)."""
    findings = [f for r in plan.records for f in r.findings]
    return {"findings": len(findings), "findings_without_box": sum(f.get("xmin") is None for f in findings)}


def resume_state(plan: Plan, build: str, shards_dir: Path, manifests_dir: Path,
                 overwrite: bool) -> tuple[list[dict], list[ShardGroup]]:
    """(counts of the groups already finished, groups to run); clears what unfinished groups left behind."""
    if overwrite:
        wipe_build(build, shards_dir, manifests_dir)
    check_config(plan, build, manifests_dir)
    for folder in (shards_dir, manifests_dir):
        mf.remove_stray_temp_files(folder)
    done_counts, todo = [], []
    for group in plan.groups:
        counts = finished_counts(group, plan.config_hash, shards_dir, manifests_dir)
        if counts is None:
            clear_group(group, build, shards_dir, manifests_dir)
            todo.append(group)
        else:
            done_counts.append(counts)
    return done_counts, todo


def group_cost(group: ShardGroup) -> int:
    """A group's relative work: the pixels of its images (decode, resampling, segmentation, registration)."""
    return sum(max(1, (r.height or 0) * (r.width or 0)) for p in group.pairs for r in (p.left, p.right))


def execute(groups: list[ShardGroup], context: dict, dask: DaskSession | None,
            console: Console) -> tuple[list[dict], list[str]]:
    """Submit one task per group, largest first, and report progress from as_completed."""
    if not groups:
        return [], []
    if dask is None:
        return track(((g.name, _run_now(g, context)) for g in groups), groups, console)
    from dask.distributed import as_completed

    client = dask.client()
    link = client.dashboard_link if importlib.util.find_spec("bokeh") else "not available (pip install -e '.[dashboard]')"
    console.print(f"Dask: {len(client.scheduler_info()['workers'])} workers, dashboard: {link}", markup=False)
    # Largest first: the scheduler starts tasks in submission order, so the last ones to start are the
    # small groups and no worker is left alone with a big one at the end (bytes do not depend on order).
    ordered = sorted(groups, key=group_cost, reverse=True)
    futures = [client.submit(run_group, g.to_dict(), context, key=f"group-{context['config_hash']}-{g.name}",
                             pure=False) for g in ordered]
    return track(((f.key, f) for f in as_completed(futures, loop=client.loop)), groups, console)


def _run_now(group: ShardGroup, context: dict) -> concurrent.futures.Future:
    """workers=0: run a group in this process (debugging, tests): the same task code, no cluster."""
    future: concurrent.futures.Future = concurrent.futures.Future()
    try:
        future.set_result(run_group(group.to_dict(), context))
    except Exception as exc:
        future.set_exception(exc)
    return future


def track(finished: Iterator, groups: list[ShardGroup], console: Console) -> tuple[list[dict], list[str]]:
    """Consume (name, finished future) pairs; report progress (a live bar, or plain lines in a log)."""
    results, failures = [], []
    samples = rejects = done = 0
    with make_progress(console, sum(len(g.pairs) for g in groups)) as progress:
        for name, outcome in finished:
            try:
                counts = outcome.result()
            except Exception as exc:  # keep the other groups going; a rerun redoes this one
                failures.append(f"{name}: {type(exc).__name__}: {exc}")
                continue
            results.append(counts)
            samples, rejects, done = samples + counts["samples"], rejects + counts["rejects"], done + counts["pairs"]
            progress.update(done, samples, rejects)
    return results, failures


# ----------------------------------------------------------------------------------------------- printing


def print_plan(summary: dict, console: Console) -> None:
    est = summary["estimate"]
    table = Table(title=f"Plan for {summary['build']} (dry run: nothing written)")
    table.add_column("item")
    table.add_column("value", justify="right")
    table.add_row("images", str(summary["images"]))
    for split, n in summary["pairs"].items():
        table.add_row(f"pairs {split}", f"{n} in {summary['groups'][split]} groups")
    for reason, n in summary["rejects"].items():
        table.add_row(f"rejected images: {reason}", str(n))
    table.add_row("est. samples", f"{est['est_samples']} ({est['samples_per_pair']:.1f}/pair)")
    table.add_row("est. disk", f"{est['est_bytes'] / 1e6:.1f} MB")
    workers = max(1, summary["workers"] or 1)
    table.add_row("est. time", f"{est['est_cpu_seconds'] / workers:.0f} s on {workers} workers "
                               f"({est['seconds_per_pair']:.2f} s/pair, {est['timed_pairs']} pairs timed)")
    table.add_row("shards", summary["shards_dir"])
    table.add_row("manifests", summary["manifests_dir"])
    console.print(table)


def print_summary(summary: dict, console: Console) -> None:
    table = Table(title=f"Build {summary['build']}")
    table.add_column("item")
    table.add_column("value", justify="right")
    for split, n in summary["pairs_planned"].items():
        table.add_row(f"pairs {split}", f"{summary['pairs_ok'].get(split, 0)} ok / {n} planned")
    for split, labels in summary["samples"].items():
        table.add_row(f"samples {split}", ", ".join(f"{k} {v}" for k, v in labels.items()))
    for reason, n in summary["rejects"].items():
        table.add_row(f"rejects: {reason}", str(n))
    table.add_row("shards", f"{summary['n_shards']} ({summary['bytes'] / 1e6:.1f} MB)")
    table.add_row("groups run / skipped", f"{summary['groups_run']} / {summary['groups_skipped']}")
    table.add_row("seconds", f"{summary['seconds']:.1f}")
    table.add_row("shards dir", summary["shards_dir"])
    table.add_row("manifests dir", summary["manifests_dir"])
    console.print(table)
    for split, n in summary["shards"].items():
        if n < MIN_SHARDS_PER_SPLIT:
            console.print(f"[yellow]warning:[/] split {split} has {n} shard(s) (< {MIN_SHARDS_PER_SPLIT}, a typical "
                          "GPUs x loader workers): lower --shard-max-samples for training on many workers")
