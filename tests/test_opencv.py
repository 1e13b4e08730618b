"""`prep.opencv`: the OpenCV numbers are the same in every process (a synthesised archive or a build made twice
is the same bytes)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
from scipy import ndimage as ndi

from prep.opencv import exact_distance
from prep.synth import anatomy


def test_the_distance_transform_is_the_exact_euclidean_one_to_the_last_bit():
    # OpenCV's precise transform alone differs from the exact distance by ~1e-6 px, by an amount that changes
    # from process to process; thresholds on it (lesion cores, skin bands, eroded masks) flipped pixels
    _, mass = anatomy.mass_layer((87, 87), (43.3, 43.1), (37.5, 33.0), 25.0, [], 1.5, 2.0)
    edge = np.ones((50, 60), np.uint8)
    edge[20:30, 30:40] = 0  # the border is not a zero, as in OpenCV
    for mask in (np.pad(mass.astype(np.uint8), 1), edge):
        distance = exact_distance(mask)
        assert distance.dtype == np.float32
        np.testing.assert_array_equal(distance, ndi.distance_transform_edt(mask).astype(np.float32))


def test_the_image_core_runs_opencv_on_one_thread_in_any_process():
    # a host that set more threads before importing the image core still gets the build workers' numbers
    code = "import cv2; cv2.setNumThreads(4); import prep.register; print(cv2.getNumThreads())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"
