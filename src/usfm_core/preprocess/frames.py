"""Which frames of a cine to keep.

USF-MAE (§2.1) samples video frames uniformly at three frames per second so that nearly
identical consecutive frames do not dominate the pretraining set.
"""

from __future__ import annotations

import numpy as np

# Without a known frame rate we assume a typical ~30 fps clip and keep every 10th frame,
# which matches the 3 fps target of USF-MAE.
DEFAULT_STEP_WITHOUT_FPS = 10


def sample_frame_indices(
    n_frames: int,
    fps: float | None,
    target_fps: float | None = 3.0,
    max_frames: int | None = None,
) -> list[int]:
    """Evenly spaced frame indices at ``target_fps``.

    Args:
        n_frames: number of frames of the clip (0 gives ``[]``).
        fps: the clip's frame rate; ``None`` (or <= 0, unknown) keeps every
            ``DEFAULT_STEP_WITHOUT_FPS``-th frame.
        target_fps: frames per second to keep; ``None`` keeps every frame. A target at or above
            ``fps`` keeps every frame.
        max_frames: cap on the number of indices; when exceeded, that many are picked evenly
            over the whole clip (first and last sampled frame included).

    Returns:
        Sorted, unique indices in ``[0, n_frames)``; never empty when ``n_frames >= 1``
        (frame 0 is always kept).
    """
    if n_frames < 0:
        raise ValueError(f"n_frames must be >= 0, got {n_frames}")
    if target_fps is not None and target_fps <= 0:
        raise ValueError(f"target_fps must be > 0 (or None for all frames), got {target_fps}")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1 (or None), got {max_frames}")
    if n_frames == 0:
        return []
    if target_fps is None:
        step = 1.0
    elif fps is None or fps <= 0:
        step = float(DEFAULT_STEP_WITHOUT_FPS)
    else:
        step = max(1.0, float(fps) / float(target_fps))
    # Floor of multiples of the (fractional) step keeps the spacing even on average.
    indices = np.unique(np.floor(np.arange(0.0, n_frames, step)).astype(np.int64))
    if max_frames is not None and indices.size > max_frames:
        picks = np.unique(np.round(np.linspace(0, indices.size - 1, max_frames)).astype(np.int64))
        indices = indices[picks]
    return [int(i) for i in indices]
