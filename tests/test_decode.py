"""prep.decode: DICOM reading, refusal reasons, intensity normalisation, header allow-list."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom import uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence

from prep.decode import (
    REASONS,
    UnsupportedImage,
    decode_dicom,
    header_facts,
    map_through_table,
    read_dicom,
    read_header,
)
from prep.synth import PHOTOMETRICS, TRANSFER_SYNTAXES, VOI_KINDS, make_study, to_dicom_dataset

BITS = 12
MAX_STORED = 2**BITS - 1
ALLOWED_META = {
    "transfer_syntax", "photometric", "bits_stored", "rows", "cols", "voi_kind", "inverted",
    "manufacturer", "laterality_tag", "view_tag", "presentation_intent", "spacing_source",
}


def breast_values(shape=(96, 80), seed=0) -> np.ndarray:
    """12-bit "bright = dense" stored values: textured half-ellipse breast on a dark background."""
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    breast = (xx / (0.75 * w)) ** 2 + ((yy - h / 2) / (0.45 * h)) ** 2 < 1
    tissue = 1200 + rng.integers(0, 2400, size=shape)
    return np.where(breast, tissue, 150 + rng.integers(0, 40, size=shape)).astype(np.uint16)


def make_dataset(stored: np.ndarray, photometric: str = "MONOCHROME2", **attrs) -> Dataset:
    """A minimal single-frame MG dataset (Explicit VR LE) around `stored` values."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.set_pixel_data(stored, photometric, BITS)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.2"  # Digital Mammography X-Ray - For Presentation
    ds.SOPInstanceUID = uid.generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Modality = "MG"
    ds.ImagerPixelSpacing = [0.085, 0.085]
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def add_lut(ds: Dataset, table: np.ndarray, first_mapped: int = 0, bits: int = 16) -> Dataset:
    item = Dataset()
    item.LUTDescriptor = [len(table), first_mapped, bits]
    item.add_new("LUTData", "US", [int(v) for v in table])
    ds.VOILUTSequence = Sequence([item])
    return ds


def gamma_lut(n: int = MAX_STORED + 1, out_max: int = 4000) -> np.ndarray:
    """A monotone, non-linear display LUT whose output does not span the full 16-bit range."""
    return np.round(out_max * (np.arange(n) / (n - 1)) ** 0.7).astype(np.uint16)


# --------------------------------------------------------------------------- normalisation


def test_window_normalises_by_window_output_range_not_image_max():
    stored = breast_values()
    ds = make_dataset(stored, WindowCenter=2048, WindowWidth=4096)
    out = decode_dicom(ds).pixels
    assert out.dtype == np.float32 and out.shape == stored.shape
    # DICOM LINEAR window: y = ((x - (c - 0.5)) / (w - 1) + 0.5), clipped to [0, 1].
    expected = np.clip((stored - 2047.5) / 4095 + 0.5, 0, 1)
    np.testing.assert_allclose(out, expected, atol=1e-5)
    # Content that is twice as faint must stay twice as faint (no per-image max stretching).
    faint = decode_dicom(make_dataset(stored // 2, WindowCenter=2048, WindowWidth=4096)).pixels
    assert faint.max() < 0.5 * out.max() + 1e-3


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16])
def test_table_mapping_equals_the_elementwise_map(dtype):
    """The VOI is applied through a table over the dtype's range: identical to applying it pixel by pixel."""
    rng = np.random.default_rng(0)
    info = np.iinfo(dtype)
    values = rng.integers(info.min, info.max, size=(64, 48), endpoint=True).astype(dtype)
    window = lambda v: np.clip((np.asarray(v, np.float32) - 100.0) / 3000.0, 0.0, 1.0)
    np.testing.assert_array_equal(map_through_table(values, window), window(values))
    floats = values.astype(np.float32)
    np.testing.assert_array_equal(map_through_table(floats, window), window(floats))


def test_lut_normalised_by_lut_output_range():
    stored = breast_values()
    table = gamma_lut()
    decoded = decode_dicom(add_lut(make_dataset(stored), table))
    assert decoded.meta["voi_kind"] == "lut"
    np.testing.assert_allclose(decoded.pixels, table[stored] / table.max(), atol=1e-6)


def test_first_of_several_windows_is_used():
    stored = breast_values()
    first = decode_dicom(make_dataset(stored, WindowCenter=[1800, 3000], WindowWidth=[2000, 500])).pixels
    alone = decode_dicom(make_dataset(stored, WindowCenter=1800, WindowWidth=2000)).pixels
    np.testing.assert_array_equal(first, alone)


def test_sigmoid_window_is_reported_and_monotone():
    stored = breast_values()
    decoded = decode_dicom(make_dataset(stored, WindowCenter=2048, WindowWidth=1500, VOILUTFunction="SIGMOID"))
    assert decoded.meta["voi_kind"] == "sigmoid"
    order = np.argsort(stored, axis=None)
    assert np.all(np.diff(decoded.pixels.ravel()[order]) >= 0)


def _mono1_pair(kind: str):
    """The same picture encoded as MONOCHROME2 and as MONOCHROME1 (stored and VOI mirrored)."""
    stored = breast_values(seed=3)
    inverse = (MAX_STORED - stored).astype(np.uint16)
    if kind == "lut":
        table = gamma_lut()
        mono2 = add_lut(make_dataset(stored), table)
        # MONOCHROME1 displays low LUT output as white: mirror both the index and the output.
        mono1 = add_lut(make_dataset(inverse, "MONOCHROME1"), table.max() - table[::-1])
    else:
        function = {"window": "LINEAR", "window_exact": "LINEAR_EXACT", "sigmoid": "SIGMOID"}[kind]
        centre, width = 1900.0, 2600.0
        # LINEAR's half-pixel offset makes the mirrored centre c' = max - c + 1 (PS3.3 C.11.2.1.2.1).
        mirrored = MAX_STORED - centre + (1 if function == "LINEAR" else 0)
        mono2 = make_dataset(stored, WindowCenter=centre, WindowWidth=width, VOILUTFunction=function)
        mono1 = make_dataset(inverse, "MONOCHROME1", WindowCenter=mirrored, WindowWidth=width,
                             VOILUTFunction=function)
    return mono2, mono1


@pytest.mark.parametrize("kind", ["window", "window_exact", "sigmoid", "lut"])
def test_monochrome1_and_monochrome2_encodings_normalise_to_the_same_array(kind):
    mono2, mono1 = _mono1_pair(kind)
    a, b = decode_dicom(mono2), decode_dicom(mono1)
    assert b.meta["inverted"] and not a.meta["inverted"]
    assert np.abs(a.pixels - b.pixels).max() <= 1 / 4095
    # bright = dense: the breast is brighter than the background in both encodings.
    assert b.pixels[48, 10] > b.pixels[2, 78]


def test_no_voi_uses_robust_percentile_window():
    stored = breast_values()
    stored[0, 0] = MAX_STORED  # one hot pixel must not set the scale
    decoded = decode_dicom(make_dataset(stored))
    assert decoded.meta["voi_kind"] == "none"
    px = decoded.pixels
    assert 0 <= px.min() and px.max() <= 1 and np.isfinite(px).all()
    breast = stored > 1000
    assert np.median(px[breast]) - np.median(px[~breast]) > 0.4


def test_unusable_window_falls_back_to_percentiles():
    decoded = decode_dicom(make_dataset(breast_values(), WindowCenter=2048, WindowWidth=0))
    assert decoded.meta["voi_kind"] == "none"
    assert np.isfinite(decoded.pixels).all() and decoded.pixels.max() > 0.5


def test_modality_rescale_applied_before_window():
    stored = breast_values()
    plain = decode_dicom(make_dataset(stored, WindowCenter=2048, WindowWidth=4096)).pixels
    rescaled = decode_dicom(make_dataset(
        stored, RescaleSlope=2, RescaleIntercept=-100, WindowCenter=2 * 2048 - 100, WindowWidth=2 * 4096,
    )).pixels
    np.testing.assert_allclose(rescaled, plain, atol=2 / 4095)


def test_padding_value_and_range_are_zeroed():
    stored = breast_values()
    stored[:4, :] = 3990
    stored[:, -6:] = 4000  # a bright padding band (as on MONOCHROME1 vendors)
    single = decode_dicom(make_dataset(stored, WindowCenter=2048, WindowWidth=4096, PixelPaddingValue=4000))
    assert np.all(single.pixels[:, -6:] == 0) and np.all(single.pixels[:4, :-6] > 0.9)
    ranged = decode_dicom(make_dataset(stored, WindowCenter=2048, WindowWidth=4096,
                                       PixelPaddingValue=4000, PixelPaddingRangeLimit=3990))
    assert np.all(ranged.pixels[:, -6:] == 0) and np.all(ranged.pixels[:4, :] == 0)
    assert ranged.pixels[4:, :-6].max() > 0.5


def test_bits_above_bits_stored_are_ignored():
    stored = breast_values()
    clean = decode_dicom(make_dataset(stored, WindowCenter=2048, WindowWidth=4096)).pixels
    ds = make_dataset(stored, WindowCenter=2048, WindowWidth=4096)
    ds.PixelData = (stored | np.uint16(0xA000)).tobytes()  # overlay / garbage in bits 13-16
    noisy = decode_dicom(ds).pixels
    np.testing.assert_array_equal(noisy, clean)


def test_spacing_prefers_imager_pixel_spacing():
    ds = make_dataset(breast_values(), PixelSpacing=[0.1, 0.1], ImagerPixelSpacing=[0.07, 0.065])
    assert decode_dicom(ds).spacing_mm == (0.07, 0.065)
    del ds.ImagerPixelSpacing
    assert decode_dicom(ds).spacing_mm == (0.1, 0.1)


# --------------------------------------------------------------------------- transfer syntaxes


COMPRESSIONS = [
    (uid.RLELossless, {}, True),
    (uid.JPEG2000Lossless, {"encoding_plugin": "pylibjpeg"}, True),
    (uid.JPEG2000, {"encoding_plugin": "pylibjpeg", "j2k_cr": [4]}, False),
]


@pytest.mark.parametrize("syntax,options,lossless", COMPRESSIONS, ids=lambda v: getattr(v, "name", None))
def test_compressed_syntaxes_decode_like_uncompressed(tmp_path, syntax, options, lossless):
    stored = breast_values()
    reference = decode_dicom(make_dataset(stored, WindowCenter=2048, WindowWidth=4096)).pixels
    ds = make_dataset(stored, WindowCenter=2048, WindowWidth=4096)
    ds.compress(syntax, **options)
    path = tmp_path / "image.dicom"
    ds.save_as(path, enforce_file_format=True)
    decoded = decode_dicom(read_dicom(path))
    assert decoded.meta["transfer_syntax"] == syntax
    if lossless:
        np.testing.assert_array_equal(decoded.pixels, reference)
    else:
        assert np.abs(decoded.pixels - reference).mean() < 0.02


# --------------------------------------------------------------------------- refusals


def _saved(tmp_path, ds, name="x.dicom"):
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True)
    return path


def test_unreadable_files(tmp_path):
    good = _saved(tmp_path, make_dataset(breast_values(), WindowCenter=2048, WindowWidth=4096))
    data = good.read_bytes()
    (tmp_path / "empty.dicom").write_bytes(b"")
    (tmp_path / "text.dicom").write_text("study_id,image_id\n1,2\n")
    (tmp_path / "cut.dicom").write_bytes(data[: len(data) - 500])
    (tmp_path / "folder.dicom").mkdir()
    rows_at = data.find(b"\x28\x00\x10\x00US")  # Rows recorded as UL with a 2-byte value
    (tmp_path / "bad_vr.dicom").write_bytes(data[: rows_at + 4] + b"UL" + data[rows_at + 6 :])
    for name in ("empty.dicom", "text.dicom", "cut.dicom", "folder.dicom", "missing.dicom", "bad_vr.dicom"):
        with pytest.raises(UnsupportedImage) as err:
            read_dicom(tmp_path / name)
        assert err.value.reason == "unreadable", name
        # one line, and never the path: details go to rejects.parquet and folders can be named after patients
        assert str(tmp_path) not in str(err.value) and "\n" not in err.value.detail, name


def test_truncated_compressed_file_is_unreadable(tmp_path):
    ds = make_dataset(breast_values(), WindowCenter=2048, WindowWidth=4096)
    ds.compress(uid.JPEG2000Lossless, encoding_plugin="pylibjpeg")
    data = _saved(tmp_path, ds).read_bytes()
    cut = tmp_path / "cut.dicom"
    cut.write_bytes(data[: len(data) - 300])
    with pytest.raises(UnsupportedImage) as err:
        read_dicom(cut)
    assert err.value.reason == "unreadable"


def _refusal(reason: str) -> Dataset:
    ds = make_dataset(breast_values(), WindowCenter=2048, WindowWidth=4096)
    if reason == "no_pixel_data":
        del ds.PixelData
    elif reason == "multi_frame":
        ds.NumberOfFrames = 2
    elif reason == "for_processing":
        ds.PresentationIntentType = "FOR PROCESSING"
    elif reason == "colour":
        rgb = np.repeat(breast_values()[..., None], 3, axis=2).astype(np.uint8)
        ds.set_pixel_data(rgb, "RGB", 8)
    elif reason == "unsupported_transfer_syntax":
        ds.file_meta.TransferSyntaxUID = uid.JPEGBaseline8Bit
    elif reason == "bad_geometry":
        ds.ImagerPixelSpacing = [0.1, 9.0]
    elif reason == "no_pixel_spacing":
        del ds.ImagerPixelSpacing
    elif reason == "decode_failed":
        ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    return ds


@pytest.mark.parametrize("reason", [r for r in REASONS if r != "unreadable"])
def test_each_refusal_reason(reason):
    with pytest.raises(UnsupportedImage) as err:
        decode_dicom(_refusal(reason))
    assert err.value.reason == reason
    assert err.value.detail


@pytest.mark.parametrize("attrs", [{"Rows": 4}, {"ImagerPixelSpacing": [0.0, 0.1]},
                                   {"ImagerPixelSpacing": [50, 50]}])
def test_absurd_geometry_is_refused(attrs):
    ds = make_dataset(breast_values(), WindowCenter=2048, WindowWidth=4096, **attrs)
    with pytest.raises(UnsupportedImage) as err:
        decode_dicom(ds)
    assert err.value.reason == "bad_geometry"


def test_missing_spacing_is_never_guessed_but_an_explicit_one_is_used_and_recorded():
    ds = make_dataset(breast_values(), WindowCenter=2048, WindowWidth=4096)
    assert decode_dicom(ds).meta["spacing_source"] == "header"
    del ds.ImagerPixelSpacing
    assert "PixelSpacing" not in ds and header_facts(ds)["spacing_source"] is None
    with pytest.raises(UnsupportedImage) as err:
        decode_dicom(ds)
    assert err.value.reason == "no_pixel_spacing"
    decoded = decode_dicom(ds, assumed_spacing_mm=0.05)
    assert decoded.spacing_mm == (0.05, 0.05) and decoded.meta["spacing_source"] == "assumed"
    with pytest.raises(ValueError):
        decode_dicom(ds, assumed_spacing_mm=50.0)
    # a header spacing always wins over the assumed one
    ds.PixelSpacing = [0.07, 0.07]
    decoded = decode_dicom(ds, assumed_spacing_mm=0.05)
    assert decoded.spacing_mm == (0.07, 0.07) and decoded.meta["spacing_source"] == "header"


def test_view_name_in_patient_orientation_is_the_view_but_a_direction_pair_is_not():
    ds = make_dataset(breast_values(), Laterality="R", PatientOrientation="MLO")  # CBIS-DDSM's only view tag
    assert header_facts(ds)["view_tag"] == "MLO"
    ds.PatientOrientation = ["A", "R"]
    assert header_facts(ds)["view_tag"] is None
    ds.ViewPosition = "CC"
    ds.PatientOrientation = "MLO"
    assert header_facts(ds)["view_tag"] == "CC"  # ViewPosition first


def test_unknown_reason_code_is_a_programming_error():
    with pytest.raises(ValueError):
        UnsupportedImage("looks_odd")


# --------------------------------------------------------------------------- header facts / PHI


def test_meta_is_allow_listed_and_phi_free(tmp_path):
    ds = make_dataset(breast_values(), WindowCenter=2048, WindowWidth=4096, PatientName="Doe^Jane",
                      PatientBirthDate="19600101", PatientID="SECRET-ID", InstitutionName="General Hospital",
                      Manufacturer="SIEMENS", ImageLaterality="R", ViewPosition="MLO",
                      PresentationIntentType="FOR PRESENTATION")
    decoded = decode_dicom(ds)
    assert set(decoded.meta) == ALLOWED_META
    values = " ".join(str(v) for v in decoded.meta.values())
    for secret in ("Doe", "1960", "SECRET", "Hospital"):
        assert secret not in values
    assert decoded.meta["laterality_tag"] == "R" and decoded.meta["view_tag"] == "MLO"
    assert decoded.meta["manufacturer"] == "SIEMENS"
    header = read_header(_saved(tmp_path, ds))
    assert "PixelData" not in header
    assert header_facts(header) == decoded.meta


def test_view_and_laterality_fallback_tags():
    ds = make_dataset(breast_values(), Laterality="L")
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "399162004", "SCT", "cranio-caudal"
    ds.ViewCodeSequence = Sequence([code])
    facts = header_facts(ds)
    assert facts["laterality_tag"] == "L" and facts["view_tag"] == "CC"
    code.CodeValue, code.CodeMeaning = "R-10226", "medio-lateral oblique"
    assert header_facts(ds)["view_tag"] == "MLO"


def test_file_roundtrip_matches_in_memory(tmp_path):
    ds = add_lut(make_dataset(breast_values(), "MONOCHROME1"), gamma_lut())
    path = _saved(tmp_path, ds)
    np.testing.assert_array_equal(decode_dicom(read_dicom(path)).pixels, decode_dicom(ds).pixels)


# --------------------------------------------------------------------------- the synthetic generator's encodings


@pytest.fixture(scope="module")
def synthetic_image() -> np.ndarray:
    # 176 x 140 is plenty and keeps the J2K cases fast
    return make_study(5, "small", images=(("R", "MLO"),)).images[0].image[::4, ::4].copy()


@pytest.mark.parametrize("syntax", TRANSFER_SYNTAXES, ids=lambda t: t.name)
@pytest.mark.parametrize("voi", VOI_KINDS)
@pytest.mark.parametrize("photometric", PHOTOMETRICS)
def test_generator_encodings_decode_back_to_the_displayed_image(tmp_path, synthetic_image, syntax, voi, photometric):
    """Every (transfer syntax, VOI, photometric) the synthetic archive writes round-trips through a file."""
    image = synthetic_image
    rescale = (1.0, 0.0) if voi == "lut" else (2.0, -100.0)
    ds = to_dicom_dataset(image, 1.7, photometric=photometric, transfer_syntax=syntax, voi=voi, rescale=rescale)
    path = tmp_path / "x.dicom"
    ds.save_as(path, enforce_file_format=True)
    decoded = decode_dicom(read_dicom(path))
    assert decoded.meta["transfer_syntax"] == syntax and decoded.meta["photometric"] == photometric
    assert decoded.meta["voi_kind"] == {"window_multi": "window"}.get(voi, voi)
    assert decoded.spacing_mm == (1.7, 1.7)
    # a SIGMOID never reaches its asymptotes: the generator encodes sigmoid images within [0.005, 0.995]
    expected = np.clip(image, 0.005, 0.995) if voi == "sigmoid" else image
    inside = image > 0
    assert np.abs(decoded.pixels[inside] - expected[inside]).max() <= 2e-3
    np.testing.assert_array_equal(decoded.pixels[image <= 0], 0)  # padding


def test_flat_lut_is_treated_as_no_voi():
    decoded = decode_dicom(add_lut(make_dataset(breast_values()), np.full(MAX_STORED + 1, 700)))
    assert decoded.meta["voi_kind"] == "none" and decoded.pixels.max() > 0.5
