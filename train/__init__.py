"""contralateral.train: streaming pretraining on contralateral patch pairs, evaluation, reports."""

__version__ = "0.1.0"
