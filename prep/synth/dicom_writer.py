"""Encode a displayed [0, 1] image as a mammography DICOM dataset (pydicom 3).

Stored values are designed backwards from the displayed image: the VOI transform (window, multi
window, SIGMOID window or VOI LUT) applied to the modality-rescaled stored values, normalised to
its output range, gives the displayed image again (to the stored quantisation). MONOCHROME1
stores `maxval - v` with the window/LUT mirrored to match, so `1 - VOI(stored)` of a MONOCHROME1
dataset equals `VOI(stored)` of the MONOCHROME2 dataset of the same image exactly.
"""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)

PLANTED_PATIENT_NAME = "SYNTHETIC^PHICANARY"
PLANTED_BIRTH_DATE = "19010101"
PLANTED_PATIENT_ID = "PHICANARY"

MAMMO_FOR_PRESENTATION = UID("1.2.840.10008.5.1.4.1.1.1.2")
MAMMO_FOR_PROCESSING = UID("1.2.840.10008.5.1.4.1.1.1.2.1")
TRANSFER_SYNTAXES = (ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless)
VOI_KINDS = ("window", "window_multi", "sigmoid", "lut")
PHOTOMETRICS = ("MONOCHROME2", "MONOCHROME1")
_ENCODER_PLUGIN = {JPEG2000Lossless: "pylibjpeg", RLELossless: "pydicom"}
_STORED_LOW, _STORED_HIGH = 0.04, 0.80  # fraction of maxval spanned by the displayed range 0..1
_SIGMOID_CLIP = 0.995
_LUT_BITS = 16


def _voi_and_stored(
    image01: np.ndarray, voi: str, maxval: int, slope: float, intercept: float, lut_gamma: float
) -> tuple[np.ndarray, dict]:
    """MONOCHROME2 stored values (int64) and the VOI parameters, in rescaled (modality) units."""
    lo, hi = round(_STORED_LOW * maxval), round(_STORED_HIGH * maxval)
    x_lo, x_hi = slope * lo + intercept, slope * hi + intercept
    d = np.clip(image01.astype(np.float64), 0.0, 1.0)
    if voi in ("window", "window_multi"):
        width = x_hi - x_lo + 1.0
        centre = x_lo + 0.5 + (width - 1.0) / 2.0  # DICOM LINEAR: x_lo -> 0, x_hi -> 1
        x = x_lo + d * (x_hi - x_lo)
        params = {"centres": [centre], "widths": [width], "function": "LINEAR"}
        if voi == "window_multi":  # IMS-style: extra, harder windows after the first
            params["centres"] += [centre + 0.1 * (width - 1), centre]
            params["widths"] += [0.7 * width, 0.5 * width]
    elif voi == "sigmoid":
        centre = (x_lo + x_hi) / 2.0
        logit_max = np.log(_SIGMOID_CLIP / (1 - _SIGMOID_CLIP))
        width = 4.0 * (x_hi - x_lo) / (2.0 * logit_max)  # d in [0.005, 0.995] fills x_lo..x_hi
        dc = np.clip(d, 1 - _SIGMOID_CLIP, _SIGMOID_CLIP)
        x = centre + width / 4.0 * np.log(dc / (1 - dc))
        params = {"centres": [centre], "widths": [width], "function": "SIGMOID"}
    elif voi == "lut":
        if slope != 1.0 or intercept < 0:
            raise ValueError("a VOI LUT is indexed by integer modality values: use slope 1, intercept >= 0")
        first, n = int(x_lo), int(x_hi - x_lo) + 1
        t = np.arange(n) / (n - 1)
        ymax = 2**_LUT_BITS - 1
        params = {"first": first, "data": np.round(ymax * t**lut_gamma).astype(np.int64)}
        x = x_lo + d ** (1.0 / lut_gamma) * (x_hi - x_lo)
    else:
        raise ValueError(f"voi must be one of {VOI_KINDS}, got {voi!r}")
    stored = np.clip(np.round((x - intercept) / slope), 0, maxval).astype(np.int64)
    return stored, params


def _mirror_voi(voi: str, params: dict, mirror_sum: float) -> dict:
    """VOI parameters for MONOCHROME1 storage (modality values x1 = mirror_sum - x2)."""
    if voi == "lut":
        data = params["data"]
        return {"first": int(mirror_sum - (params["first"] + len(data) - 1)), "data": (2**_LUT_BITS - 1) - data[::-1]}
    # LINEAR: 1 - y(K - x; c1) = y(x; c2) when c1 = K - c2 + 1; SIGMOID: when c1 = K - c2
    shift = 1.0 if params["function"] == "LINEAR" else 0.0
    return {**params, "centres": [mirror_sum - c + shift for c in params["centres"]]}


def to_dicom_dataset(
    image01: np.ndarray,
    spacing_mm: float,
    *,
    photometric: str = "MONOCHROME2",
    transfer_syntax: str = ExplicitVRLittleEndian,
    voi: str = "window",
    bits_stored: int = 12,
    rescale: tuple[float, float] = (1.0, 0.0),
    lut_gamma: float = 0.8,
    padding_mask: np.ndarray | None = None,
    laterality: str = "L",
    view: str = "CC",
    manufacturer: str = "SIEMENS",
    model: str = "Mammomat Inspiration",
    presentation_intent: str = "FOR PRESENTATION",
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    patient_id: str = PLANTED_PATIENT_ID,
    patient_age: str = "050Y",
) -> Dataset:
    """A complete MG DICOM Dataset (with file meta) whose displayed image is `image01`.

    image01: 2-D float in [0, 1], bright = dense (the image after VOI and any MONOCHROME1 inversion).
    padding_mask: pixels stored as PixelPaddingValue (default: pixels where image01 <= 0).
    rescale: (RescaleSlope, RescaleIntercept); the LUT VOI needs slope 1 and intercept >= 0.
    transfer_syntax: Explicit VR Little Endian, JPEG 2000 Lossless (pylibjpeg) or RLE Lossless.
    UIDs default to ones derived from the pixel content, so the same call gives the same bytes.
    """
    if image01.ndim != 2:
        raise ValueError(f"image01 must be 2-D, got shape {image01.shape}")
    if photometric not in PHOTOMETRICS:
        raise ValueError(f"photometric must be one of {PHOTOMETRICS}, got {photometric!r}")
    if bits_stored not in (12, 14, 16):
        raise ValueError(f"bits_stored must be 12, 14 or 16, got {bits_stored}")
    transfer_syntax = UID(transfer_syntax)
    if transfer_syntax not in TRANSFER_SYNTAXES:
        raise ValueError(f"transfer_syntax must be one of {[str(t) for t in TRANSFER_SYNTAXES]}")
    maxval = 2**bits_stored - 1
    slope, intercept = float(rescale[0]), float(rescale[1])
    stored, params = _voi_and_stored(image01, voi, maxval, slope, intercept, lut_gamma)
    padding_value = 0
    if photometric == "MONOCHROME1":
        stored = maxval - stored
        params = _mirror_voi(voi, params, slope * maxval + 2 * intercept)
        padding_value = maxval
    padding = image01 <= 0 if padding_mask is None else padding_mask
    stored[padding] = padding_value

    if sop_uid is None:
        entropy = [str(image01.shape), np.asarray(image01, np.float32).tobytes().hex()[:4096]]
        study_uid = study_uid or generate_uid(entropy_srcs=["study", *entropy])
        series_uid = series_uid or generate_uid(entropy_srcs=["series", *entropy])
        sop_uid = generate_uid(entropy_srcs=["sop", *entropy])
    sop_class = MAMMO_FOR_PROCESSING if presentation_intent == "FOR PROCESSING" else MAMMO_FOR_PRESENTATION

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "CONTRALAT_SYN"

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid or generate_uid(entropy_srcs=["study", sop_uid])
    ds.SeriesInstanceUID = series_uid or generate_uid(entropy_srcs=["series", sop_uid])
    ds.Modality = "MG"
    ds.Manufacturer = manufacturer
    ds.ManufacturerModelName = model
    # planted PHI canaries: downstream outputs must never contain them
    ds.PatientName = PLANTED_PATIENT_NAME
    ds.PatientID = patient_id
    ds.PatientBirthDate = PLANTED_BIRTH_DATE
    ds.PatientSex = "F"
    ds.PatientAge = patient_age
    ds.BodyPartExamined = "BREAST"
    ds.ViewPosition = view
    ds.ImagerPixelSpacing = [spacing_mm, spacing_mm]
    ds.PresentationIntentType = presentation_intent
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Laterality = laterality
    ds.ImageLaterality = laterality
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = int(image01.shape[0]), int(image01.shape[1])
    ds.PixelSpacing = [spacing_mm, spacing_mm]
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelPaddingValue = padding_value
    ds.RescaleIntercept = intercept
    ds.RescaleSlope = slope
    ds.RescaleType = "US"
    ds.LossyImageCompression = "00"
    if voi == "lut":
        item = Dataset()
        data = params["data"]
        item.LUTDescriptor = [len(data) % 65536, params["first"], _LUT_BITS]
        item.LUTExplanation = "NORMAL"
        item.add_new(0x00283006, "OW", data.astype("<u2").tobytes())  # LUTData
        ds.VOILUTSequence = [item]
    else:
        multi = len(params["centres"]) > 1
        ds.WindowCenter = [round(c, 4) for c in params["centres"]] if multi else round(params["centres"][0], 4)
        ds.WindowWidth = [round(w, 4) for w in params["widths"]] if multi else round(params["widths"][0], 4)
        ds.WindowCenterWidthExplanation = ["NORMAL", "HARDER", "SOFTER"][: len(params["centres"])] if multi else "NORMAL"
        if params["function"] != "LINEAR":
            ds.VOILUTFunction = params["function"]
    ds.PresentationLUTShape = "INVERSE" if photometric == "MONOCHROME1" else "IDENTITY"
    ds.PixelData = stored.astype("<u2").tobytes()
    ds["PixelData"].VR = "OW"
    if transfer_syntax != ExplicitVRLittleEndian:
        ds.compress(transfer_syntax, encoding_plugin=_ENCODER_PLUGIN[transfer_syntax], generate_instance_uid=False)
    return ds
