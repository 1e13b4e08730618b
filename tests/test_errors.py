"""Every refusal is a `ContralateralError` with a stable `reason`, and survives pickling (Dask tasks)."""

from __future__ import annotations

import pickle

import pytest

from pipelines.errors import BuildError
from pipelines.shards import ShardLimitError, shard_relpath
from prep.datasets import DatasetError
from prep.decode import UnsupportedImage
from prep.errors import ContralateralError
from prep.qa import QAError
from prep.synth.archive import SynthError
from train.checkpoint import CheckpointError
from train.compare import CompareError
from train.data import DataError
from train.evaluate import EvaluationError
from train.loop import ConfigError
from train.models import EncoderError

ERRORS = (DatasetError, SynthError, UnsupportedImage, QAError, CompareError, ConfigError, DataError,
          CheckpointError, EvaluationError, EncoderError, BuildError, ShardLimitError)


@pytest.mark.parametrize("cls", ERRORS, ids=lambda c: c.__name__)
def test_an_error_keeps_its_reason_and_detail_through_pickling(cls):
    error = cls("unreadable", "file cut short at byte 4096")  # a reason UnsupportedImage accepts too
    assert isinstance(error, ContralateralError) and str(error) == "unreadable: file cut short at byte 4096"
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is cls and (back.reason, back.detail, str(back)) == (error.reason, error.detail, str(error))


def test_codes_stay_checked_where_they_are_a_closed_set():
    with pytest.raises(ValueError, match="unknown UnsupportedImage reason"):
        UnsupportedImage("bad_luck")
    with pytest.raises(ShardLimitError) as caught:
        shard_relpath("b", "training", group=3, part=1000)
    assert caught.value.reason == "group_too_large" and "--group-pairs" in caught.value.detail
