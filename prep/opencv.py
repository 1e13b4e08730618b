"""OpenCV as every module of the project uses it: one thread per process, and an exact distance transform.

The same archive synthesised twice, or built twice, must be the same bytes; two OpenCV behaviours break that:

- The precise distance transform (`cv2.DIST_MASK_PRECISE`) returns last bits that change from one process to
  the next (and with the thread count), ~1e-6 px; a threshold on it (a lesion's core, the skin-distance bands
  of registration, the eroded mask that patch centres come from) then flips pixels. `exact_distance` rounds
  the squared distance, which is an integer, so every process gets the same, exact value.
- Results of a threaded OpenCV call may depend on how its work is split; with one thread the numbers are the
  same in every process: a Dask worker, a build run in-process, `prep inspect`, the synthesis, `train detect`.
  The build gets its parallelism from processes (Dask workers), which one thread each keeps from
  oversubscribing the cores.

    from prep.opencv import cv2, exact_distance
"""

import cv2
import numpy as np

cv2.setNumThreads(1)

__all__ = ["cv2", "exact_distance"]


def exact_distance(mask: np.ndarray) -> np.ndarray:
    """float32 Euclidean distance of every nonzero pixel to the nearest zero pixel (0 on zeros; beyond the
    border is not a zero): OpenCV's precise transform with its square rounded to the integer it is."""
    distance = cv2.distanceTransform(np.ascontiguousarray(mask, dtype=np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return np.sqrt(np.rint(np.square(distance, dtype=np.float64))).astype(np.float32)
