"""The decoder on real encoded files (the `pydicom-data` wheel): JPEG Lossless (what RSNA-2022 uses), JPEG-LS, RLE,
JPEG 2000, a VOI LUT, a modality LUT and a truncated file, through `prep.decode.read_dicom` / `decode_dicom`.

These are CT/MR/secondary-capture test images, not mammograms: several are multi-frame or carry no (or a CT-sized)
pixel spacing, which the pipeline rightly refuses. To reach the codec, a test keeps the file's real encoded bytes
and changes only the header around them (the first frame of a multi-frame file, a mammography-like spacing).
"""

from __future__ import annotations

import numpy as np
import pytest
from pydicom import uid
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate, generate_frames

from prep.decode import UnsupportedImage, decode_dicom, read_dicom


def real_file(name: str):
    path = get_testdata_file(name)
    assert path is not None, f"{name} not found: install the test extra (pydicom-data)"
    return read_dicom(path)


def as_mammogram_geometry(ds, spacing_mm: float = 0.1):
    """The header change that lets a non-mammography test image through the geometry check; pixels untouched."""
    ds.ImagerPixelSpacing = [spacing_mm, spacing_mm]
    return ds


def first_frame(ds):
    """A single-frame dataset holding the first frame's real encoded bytes (or raw bytes when uncompressed)."""
    frames = int(ds.NumberOfFrames)
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.PixelData = encapsulate([next(generate_frames(ds.PixelData, number_of_frames=frames))])
    else:
        frame_bytes = int(ds.Rows) * int(ds.Columns) * int(ds.BitsAllocated) // 8
        ds.PixelData = ds.PixelData[:frame_bytes]
    ds.NumberOfFrames = 1
    return as_mammogram_geometry(ds)


def neighbour_ratio(pixels: np.ndarray) -> float:
    """Mean |difference| of horizontal neighbours over that of pixels far apart: ~0 for an image, ~1 for noise
    (a codec that mis-decodes a lossless stream produces streaks and noise, not a smooth image)."""
    near = np.abs(np.diff(pixels, axis=1)).mean()
    far = np.abs(pixels - np.roll(pixels, (pixels.shape[0] // 2, pixels.shape[1] // 2), axis=(0, 1))).mean()
    return float(near / far)


@pytest.fixture(scope="module")
def emri_reference():
    """The uncompressed MR series the compressed emri_small_* files encode (frame 0), decoded."""
    return decode_dicom(first_frame(real_file("emri_small.dcm")))


@pytest.mark.parametrize("name, syntax", [("emri_small_RLE.dcm", uid.RLELossless),
                                          ("emri_small_jpeg_ls_lossless.dcm", uid.JPEGLSLossless),
                                          ("emri_small_jpeg_2k_lossless.dcm", uid.JPEG2000Lossless)])
def test_lossless_codecs_decode_to_the_uncompressed_reference(name, syntax, emri_reference):
    decoded = decode_dicom(first_frame(real_file(name)))
    assert decoded.meta["transfer_syntax"] == syntax
    assert decoded.pixels.shape == emri_reference.pixels.shape == (64, 64)
    assert np.array_equal(decoded.pixels, emri_reference.pixels)  # lossless: bit-identical after the same chain
    assert decoded.pixels.min() == 0.0 and decoded.pixels.max() == 1.0


def test_the_multi_frame_originals_are_refused_cleanly():
    with pytest.raises(UnsupportedImage) as refused:
        decode_dicom(real_file("emri_small_RLE.dcm"))
    assert refused.value.reason == "multi_frame"


@pytest.mark.parametrize("name, shape, signed", [("JPEG-LL.dcm", (1024, 256), True),
                                                 ("JPGLosslessP14SV1_1s_1f_8b.dcm", (768, 1024), False)])
def test_jpeg_lossless_process_14_decodes_to_an_image(name, shape, signed):
    ds = real_file(name)
    assert ds.file_meta.TransferSyntaxUID == uid.JPEGLosslessSV1
    assert (int(ds.PixelRepresentation) == 1) == signed
    decoded = decode_dicom(as_mammogram_geometry(ds))
    assert decoded.pixels.shape == shape and decoded.pixels.dtype == np.float32
    assert np.isfinite(decoded.pixels).all() and 0.0 <= decoded.pixels.min() < decoded.pixels.max() <= 1.0
    assert np.unique(decoded.pixels).size > 50 and neighbour_ratio(decoded.pixels) < 0.3


def test_a_ct_sized_pixel_spacing_is_refused_not_decoded():
    with pytest.raises(UnsupportedImage) as refused:
        decode_dicom(real_file("JPEG-LL.dcm"))  # PixelSpacing 2.26 mm: no mammography detector
    assert refused.value.reason == "bad_geometry"


def test_voi_lut_sequence_is_applied_as_the_files_table():
    ds = real_file("vlut_04.dcm")
    item = ds.VOILUTSequence[0]
    n_entries, first, bits = (int(v) for v in item.LUTDescriptor)
    table = np.asarray(item.LUTData, dtype=np.float64)
    assert n_entries == table.size and np.all(np.diff(table) >= 0)  # the file's LUT is monotone
    stored = ds.pixel_array.astype(np.int64)
    decoded = decode_dicom(as_mammogram_geometry(ds))
    assert decoded.meta["voi_kind"] == "lut"
    expected = (table[np.clip(stored - first, 0, n_entries - 1)] - table.min()) / (table.max() - table.min())
    assert np.abs(decoded.pixels - expected).max() < 1e-5
    # monotone: a brighter stored value never displays darker
    order = np.argsort(stored.ravel(), kind="stable")
    assert np.all(np.diff(decoded.pixels.ravel()[order]) >= 0)


def test_modality_lut_keeps_the_order_of_signed_stored_values():
    ds = real_file("mlut_18.dcm")
    assert "ModalityLUTSequence" in ds and int(ds.PixelRepresentation) == 1
    stored = ds.pixel_array.astype(np.int64)
    assert stored.min() < 0  # signed values: read as unsigned they would wrap and break the order below
    decoded = decode_dicom(as_mammogram_geometry(ds))
    assert decoded.meta["voi_kind"] == "none"
    flat = decoded.pixels.ravel()[np.argsort(stored.ravel(), kind="stable")]
    assert np.all(np.diff(flat) >= 0) and flat[0] == 0.0 and flat[-1] == 1.0


def test_a_truncated_real_file_is_unreadable_and_its_message_names_no_path():
    path = get_testdata_file("emri_small_jpeg_2k_lossless_too_short.dcm")
    with pytest.raises(UnsupportedImage) as refused:
        read_dicom(path)
    assert refused.value.reason == "unreadable" and "truncated" in refused.value.detail
    assert str(path) not in str(refused.value)
