"""contralateral.prep: DICOM archive -> canonical breasts -> aligned contralateral patch pairs."""

__version__ = "0.1.0"
