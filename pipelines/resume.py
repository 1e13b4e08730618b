"""Resume: the config lock, each shard group's done marker, and clearing what an unfinished run left.

A group's task writes its done marker last (`write_done_marker`): its counts, the config hash, and the
sha256 and size of each file it wrote, hashed once, as they were written. A rerun of the same command skips
groups whose marker matches the config hash and whose files are all there at their recorded sizes (no
file is read: a rerun of a finished 100k-image build costs one listing of each folder and a read of each
marker), deletes stray temp files and redoes the rest, so an interrupted build ends with the same bytes
as an uninterrupted one. Content is re-hashed on demand by `prep verify`. On an object store the done
marker is what commits a group: objects appear whole (`prep.io.atomic_open`), and a group without its
marker is cleared and redone. `parts/build-config.json` (the lock) refuses a rerun with other
options in the same folders.
"""

from __future__ import annotations

import json

from pipelines import manifests as mf
from pipelines.errors import BuildError
from pipelines.plan import Plan, ShardGroup
from pipelines.shards import group_of_shard_index
from prep.io import remove_stray_temp_files, sha256_file, write_json_atomic
from prep.storage import Location

LOCK_FILE = "build-config.json"


def write_done_marker(manifests_dir: Location, group: ShardGroup, config_hash: str, counts: dict,
                      files: dict[str, dict]) -> None:
    """The group's last write: `files` maps `shards/<rel>` or `manifests/<rel>` to {"sha256", "bytes"}."""
    write_json_atomic(mf.part_path(manifests_dir, group.name, "done"),
                         {"config_hash": config_hash, "counts": counts, "files": files})


def file_listing(shards_dir: Location, manifests_dir: Location) -> dict[str, int]:
    """`shards/<rel>` and `manifests/<rel>` -> size of every file there: one listing per folder (on an object
    store, one paginated LIST instead of a request per file)."""
    return {**{f"shards/{rel}": size for rel, size in shards_dir.listing().items()},
            **{f"manifests/{rel}": size for rel, size in manifests_dir.listing().items()}}


def _resolve(entry: str, shards_dir: Location, manifests_dir: Location) -> Location:
    root, _, rel = entry.partition("/")
    return (shards_dir if root == "shards" else manifests_dir) / rel


def finished_counts(group: ShardGroup, config_hash: str, shards_dir: Location, manifests_dir: Location,
                    present: dict[str, int]) -> dict | None:
    """The counts of a group whose done marker matches the config and whose files are all there at their
    recorded sizes (`present`: `file_listing`); else None."""
    marker = mf.part_path(manifests_dir, group.name, "done")
    if f"manifests/{marker.relative_to(manifests_dir)}" not in present:
        return None
    try:
        done = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    if done.get("config_hash") != config_hash:
        return None
    for entry, recorded in done.get("files", {}).items():
        if entry not in present:
            return None
        if isinstance(recorded, str):  # a marker without sizes (older builds): compare the hash
            if sha256_file(_resolve(entry, shards_dir, manifests_dir)) != recorded:
                return None
        elif present[entry] != recorded["bytes"]:
            return None
    return done["counts"]


def clear_group(group: ShardGroup, build: str, shards_dir: Location, manifests_dir: Location) -> None:
    """Delete whatever an unfinished run of this group left: its tars (its index block) and its parts."""
    for tar in (shards_dir / group.split).glob(f"{build}-{group.split}-*.tar"):
        index = tar.name.removesuffix(".tar").rsplit("-", 1)[-1]
        if index.isdigit() and group_of_shard_index(int(index)) == group.group:
            tar.delete()
    for table in (*mf.TABLES, "done"):
        mf.part_path(manifests_dir, group.name, table).delete(missing_ok=True)


def wipe_build(build: str, shards_dir: Location, manifests_dir: Location) -> None:
    """--overwrite: remove this build's tars, parts and final manifests (nothing else)."""
    for tar in shards_dir.glob(f"*/{build}-*.tar"):
        tar.delete()
    (manifests_dir / mf.PARTS_DIR).remove_tree()
    for name in (*mf.TABLES, "build", "wids"):
        for suffix in (".parquet", ".json"):
            (manifests_dir / f"{name}{suffix}").delete(missing_ok=True)


def check_config(plan: Plan, build: str, manifests_dir: Location) -> None:
    """Refuse to mix configs in one build folder; write the lock that later runs compare against."""
    lock = manifests_dir / mf.PARTS_DIR / LOCK_FILE
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
    write_json_atomic(lock, {"config_hash": plan.config_hash, "build": build, "options": plan.options.to_dict()})


def resume_state(plan: Plan, build: str, shards_dir: Location, manifests_dir: Location,
                 overwrite: bool) -> tuple[list[dict], list[ShardGroup]]:
    """(counts of the groups already finished, groups to run); clears what unfinished groups left behind."""
    if overwrite:
        wipe_build(build, shards_dir, manifests_dir)
    check_config(plan, build, manifests_dir)
    for folder in (shards_dir, manifests_dir):
        remove_stray_temp_files(folder)
    done_counts, todo = [], []
    present = file_listing(shards_dir, manifests_dir)
    for group in plan.groups:
        counts = finished_counts(group, plan.config_hash, shards_dir, manifests_dir, present)
        if counts is None:
            clear_group(group, build, shards_dir, manifests_dir)
            todo.append(group)
        else:
            done_counts.append(counts)
    return done_counts, todo
