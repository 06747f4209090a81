"""A small synthetic clip with a flash, a cut, a dissolve and a fade through black (ground truth known)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

SIZE = (96, 64)  # w, h
TRUTH = {"cut": 40, "dissolve": (70, 79), "fade": (110, 125), "flash": 20}
FRAMES = 150


def _texture(seed: int, t: int) -> np.ndarray:
    """A textured frame drifting slowly, distinct per seed."""
    rng = np.random.default_rng(seed)
    base = cv2.resize(
        rng.integers(0, 255, (8, 12, 3), dtype=np.uint8), (SIZE[0] + 40, SIZE[1]), interpolation=cv2.INTER_CUBIC
    )
    shift = t // 4  # slow pan, never wraps within the clip
    return np.ascontiguousarray(base[:, shift : shift + SIZE[0]])


def synthetic_frames() -> list[np.ndarray]:
    frames = []
    for i in range(FRAMES):
        shot = 0 if i < 40 else 1 if i < 75 else 2 if i < 118 else 3
        frame = _texture(shot, i)
        if TRUTH["dissolve"][0] <= i <= TRUTH["dissolve"][1]:
            a = (i - 69) / 11
            frame = cv2.addWeighted(_texture(1, i), 1 - a, _texture(2, i), a, 0)
        if TRUTH["fade"][0] <= i <= TRUTH["fade"][1]:
            level = abs(i - 117.5) / 8.5  # 1 at the ends, 0 in the middle
            frame = (frame * min(1.0, level)).astype(np.uint8)
        if i in (20, 21):
            frame = cv2.addWeighted(frame, 0.4, np.full_like(frame, 255), 0.6, 0)
        frames.append(frame)
    return frames


@pytest.fixture(scope="session")
def synthetic_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("video") / "synthetic.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25.0, SIZE)
    for frame in synthetic_frames():
        writer.write(frame)
    writer.release()
    return path


@pytest.fixture(scope="session")
def synthetic_truth() -> dict:
    return TRUTH
