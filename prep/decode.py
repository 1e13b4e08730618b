"""DICOM -> float32 "bright = dense" image in [0, 1], with allow-listed header facts.

`read_dicom` / `read_header` are the only functions here that touch the file system; everything else
works on an in-memory `pydicom.Dataset` (or NumPy arrays), so the synthetic generator can hand us
datasets directly.

Intensity chain (DICOM PS3.3 C.11): stored values (high bits masked to BitsStored) -> modality LUT
-> VOI (first VOI LUT Sequence item, else first window, LINEAR / LINEAR_EXACT / SIGMOID; none -> a
robust percentile window) -> divide by the VOI's *output* range (never the image maximum, so one
image's normalisation does not depend on its content) -> MONOCHROME1 inverted as ``1 - x`` -> padding
pixels set to 0.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pydicom.pixels
from pydicom import uid
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from prep.errors import ContralateralError

REASONS = (
    "unreadable",
    "no_pixel_data",
    "multi_frame",
    "for_processing",
    "colour",
    "unsupported_transfer_syntax",
    "bad_geometry",
    "no_pixel_spacing",
    "decode_failed",
)

# Transfer syntax -> pydicom decoding plugin ("" = pydicom's own native decoder).
UNCOMPRESSED_SYNTAXES = frozenset(
    {
        uid.ImplicitVRLittleEndian,
        uid.ExplicitVRLittleEndian,
        uid.ExplicitVRBigEndian,
        uid.DeflatedExplicitVRLittleEndian,
    }
)
COMPRESSED_SYNTAXES = frozenset(
    {
        uid.JPEG2000Lossless,
        uid.JPEG2000,
        uid.HTJ2KLossless,
        uid.HTJ2KLosslessRPCL,
        uid.HTJ2K,
        uid.JPEGLosslessSV1,
        uid.JPEGLossless,
        uid.JPEGLSLossless,  # pylibjpeg-libjpeg decodes JPEG-LS too
        uid.JPEGLSNearLossless,
        uid.RLELossless,
    }
)
SUPPORTED_SYNTAXES = UNCOMPRESSED_SYNTAXES | COMPRESSED_SYNTAXES

UNDEFINED_LENGTH = 0xFFFFFFFF

# Geometry sanity bounds: FFDM detectors are ~1000-5000 px at 0.05-0.2 mm/px.
MIN_SIDE_PX = 32
MAX_SIDE_PX = 16384
MIN_SPACING_MM = 0.005
MAX_SPACING_MM = 2.0
SPACING_TAGS = ("ImagerPixelSpacing", "PixelSpacing")  # in order of preference

# Used only when an image carries no VOI at all.
FALLBACK_PERCENTILES = (0.5, 99.5)

# ViewCodeSequence code values / meanings (SNOMED-RT and SNOMED CT) for the two screening views.
_VIEW_CODES = {
    "R-10242": "CC",
    "399162004": "CC",
    "R-10226": "MLO",
    "399368009": "MLO",
}
_VIEW_MEANINGS = {"cranio-caudal": "CC", "medio-lateral oblique": "MLO"}
# PatientOrientation is two direction letters per the standard (e.g. "A\\R"); CBIS-DDSM writes the view name
# there instead. A single value that is exactly a view name cannot be a direction pair, so it is read as the view.
_ORIENTATION_VIEWS = {"CC", "MLO"}


class UnsupportedImage(ContralateralError):
    """An image the pipeline refuses, with a machine-readable `reason` (one of `REASONS`)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown UnsupportedImage reason {reason!r}; choose one of {REASONS}")
        super().__init__(reason, detail)


@dataclass(frozen=True)
class DecodedImage:
    """`pixels`: float32 HxW in [0, 1], bright = dense, padding 0. `spacing_mm`: (row, col)."""

    pixels: np.ndarray
    spacing_mm: tuple[float, float]
    meta: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- file access


def _describe(exc: Exception, limit: int = 300) -> str:
    """One line for a reject's detail column (pydicom messages can embed whole tracebacks)."""
    first_line = next((line for line in str(exc).splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {first_line}"[:limit]


def read_dicom(path: str | os.PathLike) -> Dataset:
    """Read a whole DICOM file (pixels included). Raises UnsupportedImage("unreadable") on anything
    that is not a complete DICOM file: missing, directory, zero-byte, truncated header, non-DICOM."""
    return _read(path, stop_before_pixels=False)


def read_header(path: str | os.PathLike) -> Dataset:
    """Read only the header (stops before PixelData); same errors as `read_dicom`."""
    return _read(path, stop_before_pixels=True)


def _unreadable(path: Path, text: str) -> UnsupportedImage:
    # details end up in rejects.parquet; a path can name a patient ("DOE^JANE/..."), so it never goes in, even
    # where pydicom's own message quotes it: callers know which file they asked for
    return UnsupportedImage("unreadable", text.replace(str(path), "<file>"))


def _read(path: str | os.PathLike, *, stop_before_pixels: bool) -> Dataset:
    path = Path(path)
    if not path.is_file():
        raise _unreadable(path, "not a file")
    if path.stat().st_size == 0:
        raise _unreadable(path, "empty file (0 bytes)")
    try:
        # pydicom reports a file cut inside an encapsulated element only as a warning.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # force=False: a file without the DICM preamble is not ours to guess at.
            ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError as exc:
        raise _unreadable(path, f"not a DICOM file ({exc})") from exc
    except Exception as exc:  # pydicom has no common base for corrupt-stream errors
        raise _unreadable(path, _describe(exc)) from exc
    for warning in caught:
        if "End of file" in str(warning.message):
            raise _unreadable(path, f"truncated ({warning.message})")
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    _check_not_truncated(ds, path)  # before conversion: it needs the raw element's declared length
    try:
        # pydicom converts values lazily; convert every element now so a corrupt value (wrong VR,
        # bad length) is an unreadable file here rather than a surprise in a later step.
        ds.walk(lambda _ds, _elem: None)
    except Exception as exc:
        raise _unreadable(path, _describe(exc)) from exc
    return ds


def _check_not_truncated(ds: Dataset, path: Path) -> None:
    """pydicom silently shortens a value cut by end-of-file; the last element read is the one a cut
    file ends in, so compare its value with its declared length."""
    tags = list(ds.keys())
    if not tags:
        return
    raw = ds.get_item(max(tags))
    declared = getattr(raw, "length", None)
    value = getattr(raw, "value", None)
    if declared is None or declared == UNDEFINED_LENGTH or not isinstance(value, bytes):
        return  # encapsulated data: a cut stream surfaces as the EOF warning above
    if len(value) < declared:
        raise _unreadable(path, f"truncated {raw.tag} ({len(value)} of {declared} bytes)")


# --------------------------------------------------------------------------- header facts


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        value = value[0] if len(value) else None
        if value is None:
            return None
    return str(value).strip() or None


def _int(ds: Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    try:
        return int(value) if value is not None and value != "" else None
    except (TypeError, ValueError):
        return None


def transfer_syntax(ds: Dataset) -> str | None:
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    return str(ts) if ts else None


def view_tag(ds: Dataset) -> str | None:
    """ViewPosition, else the ViewCodeSequence code mapped to CC/MLO (other views kept verbatim), else a
    PatientOrientation that is exactly "CC" or "MLO" (CBIS-DDSM's only view tag)."""
    position = _text(ds, "ViewPosition")
    if position:
        return position.upper()
    for item in ds.get("ViewCodeSequence") or []:
        code = str(item.get("CodeValue", "")).strip()
        meaning = str(item.get("CodeMeaning", "")).strip().lower()
        if code in _VIEW_CODES:
            return _VIEW_CODES[code]
        if meaning in _VIEW_MEANINGS:
            return _VIEW_MEANINGS[meaning]
        if meaning:
            return meaning
    orientation = ds.get("PatientOrientation")
    if isinstance(orientation, str) and orientation.strip().upper() in _ORIENTATION_VIEWS:
        return orientation.strip().upper()
    return None


def laterality_tag(ds: Dataset) -> str | None:
    value = _text(ds, "ImageLaterality") or _text(ds, "Laterality")
    return value.upper() if value else None


def declared_voi_kind(ds: Dataset) -> str:
    """The VOI the header declares: "lut" | "window" | "sigmoid" | "none"."""
    seq = ds.get("VOILUTSequence")
    if seq and seq[0].get("LUTDescriptor") is not None and seq[0].get("LUTData") is not None:
        return "lut"
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        function = (_text(ds, "VOILUTFunction") or "LINEAR").upper()
        return "sigmoid" if function == "SIGMOID" else "window"
    return "none"


def header_facts(ds: Dataset) -> dict[str, Any]:
    """Allow-listed, PHI-free header facts; needs no pixel data (works on `read_header` output)."""
    photometric = _text(ds, "PhotometricInterpretation")
    return {
        "transfer_syntax": transfer_syntax(ds),
        "photometric": photometric,
        "bits_stored": _int(ds, "BitsStored"),
        "rows": _int(ds, "Rows"),
        "cols": _int(ds, "Columns"),
        "voi_kind": declared_voi_kind(ds),
        "inverted": photometric == "MONOCHROME1",
        "manufacturer": _text(ds, "Manufacturer"),
        "laterality_tag": laterality_tag(ds),
        "view_tag": view_tag(ds),
        "presentation_intent": (_text(ds, "PresentationIntentType") or "").upper() or None,
        # "header" when the file states its spacing; `decode_dicom` says "assumed" when it used the caller's value
        "spacing_source": "header" if any(ds.get(k) not in (None, "") for k in SPACING_TAGS) else None,
    }


def header_spacing_mm(ds: Dataset) -> tuple[float, float] | None:
    """(row, col) spacing in mm from ImagerPixelSpacing, else PixelSpacing; None when neither is present;
    bad_geometry when present but not two plausible numbers."""
    for keyword in SPACING_TAGS:
        value = ds.get(keyword)
        if value is None or value == "":
            continue
        try:
            row, col = (float(v) for v in value)
        except (TypeError, ValueError) as exc:
            raise UnsupportedImage("bad_geometry", f"{keyword}={value!r} is not two numbers") from exc
        if not all(plausible_spacing(v) for v in (row, col)):
            raise UnsupportedImage("bad_geometry", f"{keyword}={value!r} mm is implausible")
        return row, col
    return None


def plausible_spacing(mm: float) -> bool:
    return bool(np.isfinite(mm) and MIN_SPACING_MM <= mm <= MAX_SPACING_MM)


def pixel_spacing_mm(ds: Dataset, assumed_mm: float | None = None) -> tuple[float, float]:
    """The header's (row, col) spacing; without one, `(assumed_mm, assumed_mm)` when the caller gives it.

    Never guessed: no spacing and no `assumed_mm` is `no_pixel_spacing` (CBIS-DDSM has none, and its scanners
    differ by 20 %); an implausible `assumed_mm` is a ValueError (a configuration error, not an image's).
    """
    spacing = header_spacing_mm(ds)
    if spacing is not None:
        return spacing
    if assumed_mm is None:
        raise UnsupportedImage("no_pixel_spacing", "neither ImagerPixelSpacing nor PixelSpacing present")
    assumed = check_assumed_spacing(assumed_mm)
    return assumed, assumed


def check_assumed_spacing(mm: float) -> float:
    """A caller-supplied spacing as float; ValueError when outside the plausible range."""
    if not plausible_spacing(float(mm)):
        raise ValueError(f"assumed spacing {mm} mm is outside [{MIN_SPACING_MM}, {MAX_SPACING_MM}] mm")
    return float(mm)


# --------------------------------------------------------------------------- checks


def check_supported(ds: Dataset, *, assumed_spacing_mm: float | None = None) -> None:
    """Raise UnsupportedImage for anything `decode_dicom` refuses, without decoding pixels.

    `no_pixel_spacing` is checked last, so an image refused for it passed every other check: the planner
    relies on that to accept such images when the build is given an assumed spacing.
    """
    if "PixelData" not in ds:
        raise UnsupportedImage("no_pixel_data", "no (7FE0,0010) Pixel Data element")
    frames = _int(ds, "NumberOfFrames") or 1
    if frames > 1:
        raise UnsupportedImage("multi_frame", f"NumberOfFrames={frames}")
    intent = (_text(ds, "PresentationIntentType") or "").upper()
    if intent == "FOR PROCESSING":
        raise UnsupportedImage("for_processing", "PresentationIntentType is FOR PROCESSING")
    samples = _int(ds, "SamplesPerPixel") or 1
    photometric = _text(ds, "PhotometricInterpretation")
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise UnsupportedImage("colour", f"SamplesPerPixel={samples}, PhotometricInterpretation={photometric}")
    ts = transfer_syntax(ds)
    if ts not in SUPPORTED_SYNTAXES:
        name = uid.UID(ts).name if ts else "missing"
        raise UnsupportedImage("unsupported_transfer_syntax", f"TransferSyntaxUID {ts} ({name})")
    rows, cols = _int(ds, "Rows"), _int(ds, "Columns")
    if rows is None or cols is None or not (
        MIN_SIDE_PX <= rows <= MAX_SIDE_PX and MIN_SIDE_PX <= cols <= MAX_SIDE_PX
    ):
        raise UnsupportedImage("bad_geometry", f"Rows x Columns = {rows} x {cols}")
    bits_stored, bits_allocated = _int(ds, "BitsStored"), _int(ds, "BitsAllocated")
    if bits_stored is None or bits_allocated is None or not 1 <= bits_stored <= bits_allocated <= 16:
        raise UnsupportedImage("decode_failed", f"BitsStored={bits_stored}, BitsAllocated={bits_allocated}")
    pixel_spacing_mm(ds, assumed_spacing_mm)  # last: see the docstring


# --------------------------------------------------------------------------- pixel steps (pure)


def mask_stored_bits(stored: np.ndarray, bits_stored: int, signed: bool) -> np.ndarray:
    """Drop anything above BitsStored (overlay bits, garbage) in unsigned stored values."""
    if signed or bits_stored >= stored.dtype.itemsize * 8:
        return stored
    return stored & np.asarray((1 << bits_stored) - 1, dtype=stored.dtype)


def padding_mask(stored: np.ndarray, padding_value: int | None, range_limit: int | None) -> np.ndarray | None:
    """Pixels equal to PixelPaddingValue, or inside [value, range limit] (either order); None if no padding."""
    if padding_value is None:
        return None
    if range_limit is None:
        return stored == padding_value
    low, high = sorted((padding_value, range_limit))
    return (stored >= low) & (stored <= high)


def percentile_window(values: np.ndarray, exclude: np.ndarray | None) -> tuple[float, float]:
    """Robust (low, high) intensity window over non-padding pixels (subsampled: it only sets two numbers)."""
    sample = values[::4, ::4]
    if exclude is not None:
        sample = sample[~exclude[::4, ::4]]
    sample = sample[np.isfinite(sample)] if sample.size else sample
    if sample.size == 0:
        return 0.0, 1.0
    low, high = np.percentile(sample, FALLBACK_PERCENTILES)
    return float(low), float(high)


def rescale_to_unit(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Linear map of [low, high] to [0, 1], clipped, float32, NaN-free."""
    span = high - low
    if not np.isfinite(span) or span <= 0:
        return np.zeros(values.shape, dtype=np.float32)
    out = (np.asarray(values, dtype=np.float32) - np.float32(low)) * np.float32(1.0 / span)
    np.clip(out, 0.0, 1.0, out=out)
    return np.nan_to_num(out, copy=False, nan=0.0)


def map_through_table(values: np.ndarray, elementwise) -> np.ndarray:
    """`elementwise(values)` for an elementwise map; 8/16-bit integers go through a table of the map over
    the whole dtype range: one gather per pixel instead of float arithmetic on every pixel."""
    if values.dtype.kind not in "ui" or values.dtype.itemsize > 2:
        return elementwise(values)
    unsigned = np.dtype(f"u{values.dtype.itemsize}")
    # every bit pattern once, ordered so the unsigned view of a pixel is its index in the table
    domain = np.arange(np.iinfo(unsigned).max + 1, dtype=unsigned).view(values.dtype)
    return np.asarray(elementwise(domain))[values.view(unsigned)]


def _modality(stored: np.ndarray, ds: Dataset) -> np.ndarray:
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    if "ModalityLUTSequence" not in ds and slope == 1.0 and intercept == 0.0:
        # Identity: keep integers so a VOI LUT indexes them exactly.
        return stored
    return pydicom.pixels.apply_modality_lut(stored, ds)


def _apply_voi(values: np.ndarray, ds: Dataset, kind: str) -> tuple[np.ndarray, tuple[float, float]]:
    """Apply the declared VOI and return (output, (out_min, out_max)) of the VOI's output range."""
    if kind == "lut":
        item = ds.VOILUTSequence[0]
        n_entries = int(item.LUTDescriptor[0]) or 2**16
        first = int(item.LUTDescriptor[1])
        # Feeding the LUT its own input domain yields the LUT table, i.e. its output range.
        table = pydicom.pixels.apply_voi(np.arange(first, first + n_entries, dtype=np.int64), ds, index=0)
        out = pydicom.pixels.apply_voi(values, ds, index=0)
        return out, (float(table.min()), float(table.max()))
    # Window: pydicom maps to [y_min, y_max] of the stored/rescaled range; probe both ends for it.
    with np.errstate(over="ignore"):
        ends = pydicom.pixels.apply_windowing(np.array([-1e30, 1e30]), ds, index=0)
    out = pydicom.pixels.apply_windowing(values, ds, index=0)
    return out, (float(ends[0]), float(ends[1]))


def _voi_to_unit(values: np.ndarray, ds: Dataset, kind: str) -> np.ndarray:
    out, (out_min, out_max) = _apply_voi(values, ds, kind)
    if not out_max > out_min:
        raise ValueError(f"VOI output range [{out_min}, {out_max}] is empty")
    return rescale_to_unit(out, out_min, out_max)


def decode_dicom(ds: Dataset, *, decoding_plugin: str = "pylibjpeg",
                 assumed_spacing_mm: float | None = None) -> DecodedImage:
    """Decode and normalise one single-frame mammogram. Raises UnsupportedImage (see `REASONS`).

    `assumed_spacing_mm` is used only for an image whose header has no spacing (`meta["spacing_source"]`
    then says "assumed"); without it such an image is refused as `no_pixel_spacing`.

    `decoding_plugin` is the pydicom plugin for compressed syntaxes (pydicom's native decoder is
    always used for uncompressed data); naming it avoids pydicom's slower default plugin order.
    """
    check_supported(ds, assumed_spacing_mm=assumed_spacing_mm)
    spacing = pixel_spacing_mm(ds, assumed_spacing_mm)
    ts = transfer_syntax(ds)
    plugin = "" if ts in UNCOMPRESSED_SYNTAXES else decoding_plugin
    try:
        stored = pydicom.pixels.pixel_array(ds, decoding_plugin=plugin)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001 -- a Rust codec panic (pyo3 PanicException) is a BaseException
        raise UnsupportedImage("decode_failed", _describe(exc)) from exc
    rows, cols = int(ds.Rows), int(ds.Columns)
    if stored.shape != (rows, cols):
        raise UnsupportedImage("decode_failed", f"decoded shape {stored.shape} != Rows x Columns {rows} x {cols}")

    signed = _int(ds, "PixelRepresentation") == 1
    stored = mask_stored_bits(stored, int(ds.BitsStored), signed)
    padding = padding_mask(stored, _int(ds, "PixelPaddingValue"), _int(ds, "PixelPaddingRangeLimit"))

    facts = header_facts(ds)
    try:
        values = _modality(stored, ds)
    except Exception as exc:  # malformed Modality LUT / rescale attributes
        raise UnsupportedImage("decode_failed", f"modality LUT: {_describe(exc)}") from exc
    kind = facts["voi_kind"]
    pixels = None
    if kind != "none":
        try:
            pixels = map_through_table(values, lambda v: _voi_to_unit(v, ds, kind))
        except (ValueError, NotImplementedError, AttributeError, IndexError, TypeError):
            kind = "none"  # unusable VOI (width <= 0, unknown function, bad LUT): treated as absent
    if pixels is None:
        window = percentile_window(values, padding)
        pixels = map_through_table(values, lambda v: rescale_to_unit(v, *window))

    if facts["photometric"] == "MONOCHROME1":
        np.subtract(np.float32(1.0), pixels, out=pixels)
    if padding is not None:
        pixels[padding] = 0.0
    facts["voi_kind"] = kind
    facts["spacing_source"] = facts["spacing_source"] or "assumed"
    return DecodedImage(pixels=pixels, spacing_mm=spacing, meta=facts)
