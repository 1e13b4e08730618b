"""`build_shards`: plan an archive, run one Dask task per shard group, assemble the manifests.

plan (`pipelines.plan`: adapter -> pairs -> shard groups; headers read on the workers once they are up)
-> resume (`pipelines.resume`: skip the groups whose done marker matches, clear the rest)
-> execute (here: one `pipelines.worker.run_group` task per group, largest first, progress from
   `as_completed`)
-> finalize (`pipelines.manifests.finalize`: final tables, wids.json; build.json with
   `pipelines.provenance`), printing through `pipelines.progress`.

The Dask session starts in the background while the client plans (`pipelines.cluster`), and the workers
shut down while the client assembles the manifests. None of the ordering changes a byte of the output.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import os
import time
from collections import Counter
from pathlib import Path
from typing import Iterator

from rich.console import Console

from pipelines import manifests as mf
from pipelines.cluster import DaskSession
from pipelines.errors import BuildError
from pipelines.pair_work import estimate, plan_rejected_image_rows
from pipelines.plan import BuildOptions, Plan, ShardGroup, no_pairs_hint, plan_build
from pipelines.progress import build_progress, print_cluster, print_line, print_plan, print_summary
from pipelines.provenance import git_commit, package_versions
from pipelines.resume import LOCK_FILE, resume_state
from pipelines.worker import GroupTask, run_group
from prep.io import write_json_atomic
from prep.storage import Location, StorageError, check_storage, location

__all__ = ["BuildError", "build_shards", "run_build", "plan_build", "reject_problem"]


def default_dirs(build: str, out: Path | str | None, manifests: Path | str | None) -> tuple[Location, Location]:
    """The shard and manifest folders (a local folder or a URL, `prep.storage`), resolved once."""
    return location(out or Path("shards") / build), manifests_folder(build, manifests)


def manifests_folder(build: str | None, manifests: Path | str | None) -> Location:
    return location(manifests or Path("data_manifests") / build)


def finished_build_at(build: str | None, manifests: Path | str | None) -> bool:
    """A finished build's `build.json` in the manifest folder, when that folder is known before planning
    (given, or named by --build; the default name needs the plan's hash)."""
    if manifests is None and build is None:
        return False
    return (manifests_folder(build, manifests) / "build.json").is_file()


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
            f"{summary['manifests_dir']}/rejects.parquet. The manifests and shards of the usable "
            "pairs were written.")


def build_shards(root: Path | str, options: BuildOptions, **kwargs) -> dict:
    """Plan, run (resumably) and finalize a build of the archive at `root` (read with `options.dataset`'s
    adapter); returns the summary printed at the end.

    Keyword arguments are those of `run_build`. `dry_run` plans and times a few pairs, writes nothing and
    returns the plan summary. An output folder that cannot be written is a `BuildError("cannot_write")`; an
    unserved URL scheme, a missing bucket or refused credentials a `BuildError` with the storage's reason.
    """
    try:
        return run_build(root, options, **kwargs)
    except StorageError as exc:
        raise BuildError(exc.reason, exc.detail) from None
    except OSError as exc:
        raise BuildError("cannot_write", str(exc)) from exc


def run_build(root: Path | str, options: BuildOptions, *,
              out: Path | str | None = None, manifests: Path | str | None = None, build: str | None = None,
              workers: int | None = None,
              scheduler: str | None = None, scheduler_file: str | None = None, memory_limit: str | None = None,
              overwrite: bool = False, dry_run: bool = False, console: Console | None = None) -> dict:
    """The Dask session starts first, in the background, so that it is up by the time planning is done;
    except on a rerun of a finished build (`build.json` in a manifest folder known before planning), where
    it starts only once there is work for it (many headers to read, or groups to redo)."""
    for given in (out, manifests):  # an unserved scheme or an unreachable bucket fails before any work
        if given is not None:
            check_storage(location(given))
    uses_dask = not dry_run and (workers != 0 or bool(scheduler or scheduler_file))
    dask = DaskSession(workers, scheduler, scheduler_file, memory_limit) if uses_dask else None
    if dask is not None and not finished_build_at(build, manifests):
        dask.start()
    try:
        return build_in_session(Path(root), options, dask,
                                out=out, manifests=manifests, build=build, workers=workers, overwrite=overwrite,
                                dry_run=dry_run, console=console or Console(stderr=True))
    finally:
        if dask is not None:
            dask.close()


def build_in_session(root: Path, options: BuildOptions, dask: DaskSession | None, *,
                     out: Path | str | None, manifests: Path | str | None, build: str | None, workers: int | None,
                     overwrite: bool, dry_run: bool, console: Console) -> dict:
    timings = {}
    build_started = started = time.perf_counter()
    plan = plan_build(root, options, dask)
    timings["plan_s"] = time.perf_counter() - started
    if options.prep.reg_offset_mm:
        print_line(console, f"[yellow]warning:[/] --reg-offset-mm {options.prep.reg_offset_mm:g}: every registration "
                            "is moved that far off its fit on purpose (an instrument, benchmarks/"
                            "registration_tolerance.py): these shards misalign every pair", markup=True)
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

    started = time.perf_counter()
    tasks = [GroupTask(group=g, options=options, build=build, shards_dir=shards_dir, manifests_dir=manifests_dir,
                       config_hash=plan.config_hash) for g in todo]
    run_counts, failures = execute(tasks, dask, console)
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
    write_json_atomic(manifests_dir / "build.json", {
        "build": build, "dataset": options.dataset, "root": str(root.resolve()), "config_hash": plan.config_hash,
        "config": options.to_dict(), "plan": plan.counts(), "counts": counts, "labels": label_counts(plan),
        "pixel_spacing": {"assume_spacing_mm": options.assume_spacing_mm,
                          "images_assumed": counts["images_spacing_assumed"]},
        "timings": {k: round(v, 3) for k, v in timings.items()}, "versions": package_versions(),
        "git_commit": git_commit(), "shard_scheme": "see pipelines/shards.py",
        "wids_urls": "relative to this folder"})
    if not plan.groups:  # manifests (all rejects) are written first, so the user can read why
        # nothing was built: the rerun with the fix (a changed config) must not be refused as config_changed
        (manifests_dir / mf.PARTS_DIR / LOCK_FILE).delete(missing_ok=True)
        raise BuildError("no_pairs", f"no usable L/R pair in {root}: all {len(plan.records)} images rejected, "
                                     f"{no_pairs_hint(plan.rejects)}; every reject with its detail: "
                                     f"{manifests_dir / 'rejects.parquet'}")
    print_summary(summary, console)
    return summary


def label_counts(plan: Plan) -> dict:
    """Findings the archive gave, and how many of them without a location (no box: no patch label)."""
    findings = [f for r in plan.records for f in r.findings]
    return {"findings": len(findings), "findings_without_box": sum(f.get("xmin") is None for f in findings)}


def finalize(plan: Plan, build: str, shards_dir: Location, manifests_dir: Location) -> dict:
    """The final manifests: every finished group's parts plus the plan's rejects (client-side rows)."""
    extra = {"images": plan_rejected_image_rows(plan), "rejects": plan.rejects}
    return mf.finalize(manifests_dir, shards_dir, build, extra, dict(Counter(p.split for p in plan.pairs)))


# ----------------------------------------------------------------------------------------------- execute


def group_cost(group: ShardGroup) -> int:
    """A group's relative work: the pixels of its images (decode, resampling, segmentation, registration)."""
    return sum(max(1, (r.height or 0) * (r.width or 0)) for p in group.pairs for r in (p.left, p.right))


def execute(tasks: list[GroupTask], dask: DaskSession | None, console: Console) -> tuple[list[dict], list[str]]:
    """Submit one task per group, largest first, and report progress from as_completed."""
    if not tasks:
        return [], []
    groups = [t.group for t in tasks]
    if dask is None:
        return track(((t.group.name, run_now(t)) for t in tasks), groups, console)
    from dask.distributed import as_completed

    client = dask.client()
    link = client.dashboard_link if importlib.util.find_spec("bokeh") else "not available (pip install -e '.[dashboard]')"
    print_cluster(console, len(client.scheduler_info()["workers"]), link)
    # Largest first: the scheduler starts tasks in submission order, so the last ones to start are the
    # small groups and no worker is left alone with a big one at the end (bytes do not depend on order).
    ordered = sorted(tasks, key=lambda t: group_cost(t.group), reverse=True)
    futures = [client.submit(run_group, t, key=t.key, pure=False) for t in ordered]
    return track(((f.key, f) for f in as_completed(futures, loop=client.loop)), groups, console)


def run_now(task: GroupTask) -> concurrent.futures.Future:
    """workers=0: run a group in this process (debugging, tests): the same task code, no cluster."""
    future: concurrent.futures.Future = concurrent.futures.Future()
    try:
        future.set_result(run_group(task))
    except Exception as exc:
        future.set_exception(exc)
    return future


def track(finished: Iterator, groups: list[ShardGroup], console: Console) -> tuple[list[dict], list[str]]:
    """Consume (name, finished future) pairs; report progress (a live bar, or plain lines in a log)."""
    results, failures = [], []
    samples = rejects = done = 0
    with build_progress(console, sum(len(g.pairs) for g in groups)) as progress:
        for name, outcome in finished:
            try:
                counts = outcome.result()
            except Exception as exc:  # keep the other groups going; a rerun redoes this one
                failures.append(f"{name}: {type(exc).__name__}: {exc}")
                continue
            results.append(counts)
            samples, rejects, done = samples + counts["samples"], rejects + counts["rejects"], done + counts["pairs"]
            progress.update(done, samples=samples, rejects=rejects)
    return results, failures
