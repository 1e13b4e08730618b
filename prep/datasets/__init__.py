"""Dataset adapters: an archive on disk -> one `ImageRecord` per DICOM (the images table).

`get_adapter(name)(root).images()` is the only entry point the build uses. Adapters read CSVs and DICOM
headers (never pixels) and copy only allow-listed header facts (`prep.decode.header_facts`), so no PHI
can leave through them.

Registry: `vindr` (VinDr-Mammo CSVs + `images/<study>/<image>.dicom`), `dicom-dir` (any folder of DICOMs;
laterality and view from the tags, pseudonymised ids, split from a hash of the study, pairs within a study or
a patient), `cbis-ddsm` (the TCIA download: NBIA tree + metadata.csv + case-description CSVs; the one adapter
that reads pixels, of its ROI masks, to box their findings), `cmmd` (TCIA tree + clinical table),
`inbreast` (AllDICOMs + INbreast.csv + AllXML), `rsna-2022` (train_images + train.csv), `optimam` (OMI-DB through
the `omidb` package). Label vocabulary shared by all: `prep.datasets.labels`.
"""

from __future__ import annotations

from prep.datasets.base import (  # noqa: F401  (the package's public names)
    ADAPTERS, SPLITS, DatasetError, ImageRecord, check_header, read_header_checked, register_adapter,
    split_from_hash)
# adapters register themselves on import
from prep.datasets import cbis_ddsm, cmmd, dicom_dir, inbreast, optimam, rsna, vindr  # noqa: F401


def get_adapter(name: str) -> type:
    """The adapter class registered as `name`; `adapter(root).images() -> list[ImageRecord]`."""
    try:
        return ADAPTERS[name]
    except KeyError:
        raise DatasetError("unknown_dataset", f"{name!r}; choose one of {sorted(ADAPTERS)}") from None
