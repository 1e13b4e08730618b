"""Corrupted inputs become rejects with a reason, never a crash or a hang.

1. Archive level, through the real build: a copy of the synthetic archive gets extra studies whose left
   image is broken in one way each (truncated, garbage pixel data, wrong VR, absurd Rows/Columns, missing
   laterality, zero bytes, a directory named `x.dicom`); rejects.parquet must name each with its reason.
2. Byte level, hypothesis-driven: valid DICOM bytes mutated (bit flips, truncation, spliced garbage, header
   byte edits) go through `read_dicom` + `decode_dicom` in a separate process under a time limit; the only
   allowed outcomes are a valid image or `UnsupportedImage` with a known reason.
"""

from __future__ import annotations

import concurrent.futures
import csv
import io
import json
import multiprocessing
import shutil
import tempfile
import traceback
from datetime import timedelta
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless

from pipelines.build import build_shards
from pipelines.plan import BuildOptions
from prep.config import PrepConfig
from prep.datasets.vindr import BREAST_CSV
from prep.decode import REASONS, UnsupportedImage, decode_dicom, read_dicom
from prep.synth.dicom_writer import to_dicom_dataset

OPTIONS = BuildOptions(dataset="vindr", prep=PrepConfig(mm_per_px=0.4, patch_px=64, grid_patches_per_direction=2),
                       group_pairs=4, shard_max_samples=64)
# the same time limit as a Dask task would get from an impatient user: generous for a 64 x 48 image
DECODE_TIME_LIMIT_S = 20


# ----------------------------------------------------------------------------------------------- archive level


def _explicit_vr_edit(raw: bytes, tag: bytes, old_vr: bytes, new_vr: bytes) -> bytes:
    """Rewrite the VR of one explicit-VR little-endian element in place (same length field size)."""
    at = raw.find(tag + old_vr)
    assert at > 0, f"element {tag.hex()} with VR {old_vr!r} not found"
    return raw[: at + 4] + new_vr + raw[at + 6 :]


def _truncate(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) * 3 // 5])  # cut inside Pixel Data: the header still reads


def _garbage_pixels(path: Path) -> None:
    """Replace the (compressed) frame by random bytes of the same length; the header stays intact."""
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID.is_compressed
    frame_len = len(ds.PixelData)
    ds.PixelData = encapsulate([np.random.default_rng(0).bytes(frame_len - 64)])
    ds.save_as(path, enforce_file_format=True)


def _wrong_vr_spacing(path: Path) -> None:
    """ImagerPixelSpacing (0018,1164) recorded as US instead of DS: pydicom reads numbers, just wrong ones."""
    path.write_bytes(_explicit_vr_edit(path.read_bytes(), b"\x18\x00\x64\x11", b"DS", b"US"))


def _wrong_vr_rows(path: Path) -> None:
    """Rows (0028,0010) recorded as UL with a 2-byte value: pydicom cannot convert the value at all."""
    path.write_bytes(_explicit_vr_edit(path.read_bytes(), b"\x28\x00\x10\x00", b"US", b"UL"))


def _absurd_geometry(path: Path) -> None:
    ds = pydicom.dcmread(path)
    ds.Rows, ds.Columns = 65535, 1
    ds.save_as(path, enforce_file_format=True)


def _no_laterality(path: Path) -> None:
    ds = pydicom.dcmread(path)
    del ds.ImageLaterality, ds.Laterality
    ds.save_as(path, enforce_file_format=True)


def _zero_bytes(path: Path) -> None:
    path.write_bytes(b"")


def _directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


# kind -> (corruption of the left image file, needs a compressed source, reason(s) rejects.parquet must give)
CORRUPTIONS = {
    "truncated": (_truncate, False, {"unreadable"}),
    "garbage_pixels": (_garbage_pixels, True, {"decode_failed"}),
    "wrong_vr_spacing": (_wrong_vr_spacing, False, {"bad_geometry"}),
    "absurd_rows_columns": (_absurd_geometry, False, {"bad_geometry"}),
    "missing_laterality": (_no_laterality, False, {"unknown_laterality"}),
    "zero_bytes": (_zero_bytes, False, {"unreadable"}),
    "directory": (_directory, False, {"missing_file"}),
    # a value pydicom cannot convert at all (BytesLengthException inside pydicom)
    "wrong_vr_rows": (_wrong_vr_rows, False, {"unreadable", "decode_failed", "bad_geometry"}),
}


def _source_pairs(root: Path) -> dict[bool, list[dict]]:
    """Breast-level rows of clean (trap-free) L/R pairs, keyed by whether the left image is compressed."""
    truth = json.loads((root / "ground_truth" / "truth.json").read_text())
    trapped = {x for ids in truth["traps"].values() for x in ids}
    with open(root / BREAST_CSV, newline="") as handle:
        rows = list(csv.DictReader(handle))
    by_pair: dict[tuple[str, str], dict[str, dict]] = {}
    for row in rows:
        if row["study_id"] not in trapped and row["image_id"] not in trapped:
            by_pair.setdefault((row["study_id"], row["view_position"]), {})[row["laterality"]] = row
    found: dict[bool, list[dict]] = {True: [], False: []}
    for sides in by_pair.values():
        if set(sides) == {"L", "R"}:
            left = pydicom.dcmread(root / "images" / sides["L"]["study_id"] / f"{sides['L']['image_id']}.dicom",
                                   stop_before_pixels=True)
            found[left.file_meta.TransferSyntaxUID.is_compressed].append(sides)
    return found


def corrupt_archive(source: Path, dest: Path, kinds: list[str]) -> dict[str, str]:
    """Copy the archive and add one study per corruption kind (a clean pair whose left image is broken).

    Returns {kind: corrupted image_id}. Nothing of the original studies changes.
    """
    shutil.copytree(source, dest)
    sources = _source_pairs(dest)
    csv_path = dest / BREAST_CSV
    with open(csv_path, newline="") as handle:
        reader = csv.DictReader(handle)
        columns, rows = reader.fieldnames, list(reader)
    corrupted = {}
    for n, kind in enumerate(kinds):
        corrupt, needs_compressed, _ = CORRUPTIONS[kind]
        pair = sources[needs_compressed][0]
        study = f"fault{n:02d}{kind.replace('_', '')}"
        for lat, row in pair.items():
            clone = {**row, "study_id": study, "series_id": f"{study}s", "image_id": f"{study}{lat}"}
            target = dest / "images" / study / f"{clone['image_id']}.dicom"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(dest / "images" / row["study_id"] / f"{row['image_id']}.dicom", target)
            if lat == "L":
                corrupt(target)
                corrupted[kind] = clone["image_id"]
                if kind == "missing_laterality":
                    clone["laterality"] = ""
            rows.append(clone)
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return corrupted


def build_and_read_rejects(archive: Path, out: Path) -> tuple[dict, dict[str, list[dict]]]:
    summary = build_shards(archive, OPTIONS, out=out / "shards", manifests=out / "manifests",
                           build="c", workers=0)
    by_image: dict[str, list[dict]] = {}
    for row in pq.read_table(out / "manifests" / "rejects.parquet").to_pylist():
        by_image.setdefault(row["image_id"], []).append(row)
    return summary, by_image


HANDLED = list(CORRUPTIONS)


def assert_rejected_with_reason(corrupted: dict[str, str], rejects: dict[str, list[dict]], out: Path) -> None:
    for kind, image_id in corrupted.items():
        rows = rejects.get(image_id, [])
        assert [r["reason"] for r in rows if r["level"] == "image"], f"{kind}: no image-level reject row"
        assert {r["reason"] for r in rows} <= CORRUPTIONS[kind][2], (kind, rows)
        assert all(r["detail"] for r in rows), (kind, rows)
        partner = image_id[:-1] + "R"
        assert [r["reason"] for r in rejects.get(partner, [])] in (["partner_rejected"], ["missing_partner"]), kind
    images = {r["image_id"]: r for r in pq.read_table(out / "manifests" / "images.parquet").to_pylist()}
    assert all(images[i]["status"] == "rejected" and images[i]["reason"] for i in corrupted.values())


@pytest.mark.slow
def test_every_corrupted_input_is_a_reject_with_its_reason(synth_archive, tmp_path):
    corrupted = corrupt_archive(synth_archive, tmp_path / "archive", HANDLED)
    summary, rejects = build_and_read_rejects(tmp_path / "archive", tmp_path / "out")
    assert summary["n_samples"] > 0  # the clean studies still made it
    assert_rejected_with_reason(corrupted, rejects, tmp_path / "out")


# ----------------------------------------------------------------------------------------------- byte level


def _base_files() -> list[bytes]:
    """Small valid mammogram files: native/J2K/RLE, window/LUT/sigmoid VOI, both photometrics."""
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:64, 0:48]
    breast = ((xx / 40.0) ** 2 + ((yy - 32) / 30.0) ** 2 < 1).astype(float)
    image = breast * (0.3 + 0.5 * rng.random((64, 48)))
    variants = [dict(transfer_syntax=ExplicitVRLittleEndian, voi="window"),
                dict(transfer_syntax=JPEG2000Lossless, voi="lut", photometric="MONOCHROME1"),
                dict(transfer_syntax=RLELossless, voi="sigmoid")]
    files = []
    for variant in variants:
        buffer = io.BytesIO()
        to_dicom_dataset(image, 0.1, **variant).save_as(buffer, enforce_file_format=True)
        files.append(buffer.getvalue())
    return files


BASES = _base_files()


def decode_outcome(data: bytes) -> tuple:
    """Runs in the worker process: read + decode a file with these bytes and describe the outcome."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.dicom"
        path.write_bytes(data)
        try:
            image = decode_dicom(read_dicom(path))
        except UnsupportedImage as exc:
            return ("unsupported", exc.reason)
        except BaseException as exc:  # noqa: BLE001 -- what the test exists to catch
            return ("error", f"{type(exc).__name__}: {exc}"[:300], traceback.format_exc()[-1500:])
    px = image.pixels
    finite = bool(np.isfinite(px).all())
    return ("image", str(px.dtype), px.ndim, finite, float(px.min()) if finite else None,
            float(px.max()) if finite else None)


@st.composite
def mutated_files(draw) -> bytes:
    data = bytearray(BASES[draw(st.integers(0, len(BASES) - 1))])
    pixel_start = bytes(data).find(b"\xe0\x7f\x10\x00")  # (7FE0,0010): header bytes lie before it
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["bit_flip", "truncate", "splice", "header_byte"]))
        if kind == "bit_flip":
            at = draw(st.integers(0, len(data) - 1))
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del data[draw(st.integers(0, len(data))):]
        elif kind == "splice":
            at = draw(st.integers(0, len(data)))
            garbage = draw(st.binary(min_size=1, max_size=64))
            data[at : at + draw(st.integers(0, len(garbage)))] = garbage
        else:
            at = draw(st.integers(128, max(128, pixel_start + 8)))  # after the preamble, up to the pixel tag
            if at < len(data):
                data[at] = draw(st.integers(0, 255))
        if not data:
            break
    return bytes(data)


@pytest.fixture(scope="module")
def decoder_process():
    """One spawned worker: a hang is cut by a timeout, a crash shows as a broken pool (not a dead pytest)."""
    pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    yield pool
    workers = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in workers:
        process.kill()  # a hung decoder must not outlive the test session


def test_the_unmutated_bases_decode(decoder_process):
    for data in BASES:
        outcome = decoder_process.submit(decode_outcome, data).result(timeout=DECODE_TIME_LIMIT_S)
        assert outcome[:4] == ("image", "float32", 2, True) and 0.0 <= outcome[4] < outcome[5] <= 1.0, outcome


def decode_in_worker(pool: concurrent.futures.ProcessPoolExecutor, data: bytes) -> tuple:
    """`decode_outcome` in the worker, failing the test on a hang or on a dead worker process."""
    future = pool.submit(decode_outcome, data)
    try:
        outcome = future.result(timeout=DECODE_TIME_LIMIT_S)
    except concurrent.futures.TimeoutError:
        pytest.fail(f"read_dicom + decode_dicom hung for > {DECODE_TIME_LIMIT_S} s on {len(data)} bytes")
    except concurrent.futures.process.BrokenProcessPool:
        pytest.fail("read_dicom + decode_dicom killed the process (a native crash)")
    if outcome[0] == "image":
        _, dtype, ndim, finite, low, high = outcome
        assert (dtype, ndim, finite) == ("float32", 2, True) and 0.0 <= low <= high <= 1.0, outcome
    return outcome


FUZZ = settings(max_examples=100, derandomize=True, database=None,
                deadline=timedelta(seconds=DECODE_TIME_LIMIT_S + 5), suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(data=mutated_files())
def test_mutated_dicom_bytes_decode_or_raise_unsupported_image(decoder_process, data):
    outcome = decode_in_worker(decoder_process, data)
    if outcome[0] == "unsupported":
        assert outcome[1] in REASONS
    else:
        assert outcome[0] == "image", f"neither an image nor UnsupportedImage: {outcome[1]}\n{outcome[2]}"
