"""Videos: bikes.mp4 (real H.264, 250 frames at 25 fps) and small generated AVIs, whole and cut."""

from __future__ import annotations

import tempfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from kimivl_cli.errors import InputError
from kimivl_cli.media import MediaKind, VideoFile, sniff
from kimivl_cli.media import video as video_module
from kimivl_cli.video.shots import detect_shots
from tests.media.conftest import error_line, vfr_mkv


@pytest.fixture(scope="module")
def bikes(bikes_mp4: Path):
    with VideoFile(bikes_mp4) as video:
        yield video


@pytest.fixture(scope="module")
def ramp_avi(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 MJPEG frames at 10 fps whose grey level is 8 x their index."""
    path = tmp_path_factory.mktemp("video") / "ramp.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    for i in range(30):
        writer.write(np.full((48, 64, 3), i * 8, np.uint8))
    writer.release()
    return path


def test_properties(bikes: VideoFile) -> None:
    assert (bikes.frame_count, bikes.fps, bikes.width, bikes.height) == (250, 25.0, 640, 272)
    assert bikes.duration == pytest.approx(10.0)


def test_sixteen_frames_with_exact_timestamps(bikes: VideoFile) -> None:
    frames = bikes.sample(count=16)
    indices = [f.index for f in frames]
    assert len(frames) == 16 and indices == sorted(set(indices))
    assert indices[0] < 16 and indices[-1] > 234  # spread over the whole video
    for frame in frames:
        assert abs(frame.timestamp - frame.index / 25) < 1e-3
        assert frame.image.shape == (272, 640, 3) and frame.image.dtype == np.uint8


def test_sampling_at_a_rate(bikes: VideoFile) -> None:
    frames = bikes.sample(fps=2)
    assert len(frames) == 20
    assert [f.index for f in frames[:4]] == [0, 13, 25, 38]  # the frame nearest each 0.5 s, ties up
    assert all(abs(f.timestamp - k * 0.5) <= 0.02 + 1e-9 for k, f in enumerate(frames))  # within half a frame
    capped = bikes.sample(fps=25, max_frames=10)  # 250 wanted, 10 allowed: spread, not the first 10
    assert len(capped) == 10 and capped[-1].index > 200


def test_seeking_and_walking_decode_the_same_frames(bikes: VideoFile, monkeypatch: pytest.MonkeyPatch) -> None:
    walked = bikes.sample(count=5)
    monkeypatch.setattr(video_module, "SEEK_GAP", 0)  # every jump seeks
    seeked = bikes.sample(count=5)
    assert [f.index for f in walked] == [f.index for f in seeked]
    assert [f.timestamp for f in walked] == [f.timestamp for f in seeked]
    assert all(np.array_equal(a.image, b.image) for a, b in zip(walked, seeked, strict=True))


def test_read_gives_exactly_the_asked_frames(ramp_avi: Path) -> None:
    with VideoFile(ramp_avi) as video:
        frames = video.read([8, 0, 4, 8, 28])  # any order, repeats once
    assert [f.index for f in frames] == [0, 4, 8, 28]
    assert [f.timestamp for f in frames] == pytest.approx([0.0, 0.4, 0.8, 2.8])
    assert [int(f.image.mean().round()) for f in frames] == pytest.approx([0, 32, 64, 224], abs=2)


def test_rgb_order(ramp_avi: Path, tmp_path: Path) -> None:
    path = tmp_path / "red.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 5, (32, 32))
    for _ in range(3):
        writer.write(np.full((32, 32, 3), (0, 0, 255), np.uint8))  # BGR red
    writer.release()
    with VideoFile(path) as video:
        (frame,) = video.sample(count=1)
    red, green, blue = frame.image[16, 16]
    assert red > 200 and green < 50 and blue < 50
    assert frame.to_pil().mode == "RGB"


def test_in_memory_source_is_spooled_and_cleaned_up(ramp_avi: Path) -> None:
    video = VideoFile(ramp_avi.read_bytes())
    spool = video.path
    assert spool.exists() and video.frame_count == 30
    video.close()
    assert not spool.exists()


def test_file_cut_short(ramp_avi: Path, tmp_path: Path) -> None:
    """The header still promises 30 frames, the data holds a few: the end check and sampling say so."""
    cut = tmp_path / "cut.avi"
    cut.write_bytes(ramp_avi.read_bytes()[: ramp_avi.stat().st_size // 2])
    with VideoFile(cut) as video:
        assert video.frame_count == 30
        assert "cannot be decoded (is the file truncated?)" in error_line(video.check_end)
        assert "cannot be decoded" in error_line(video.sample, count=10)


def test_truncated_mp4(bikes_mp4: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    data = bikes_mp4.read_bytes()
    assert "<bytes>: not a readable video" in error_line(VideoFile, data[: len(data) // 2])
    assert list(tmp_path.iterdir()) == []  # the bytes were spooled to a file, removed with the error


@pytest.mark.parametrize(("fourcc", "suffix"), [("MJPG", "avi"), ("mp4v", "mp4")])
def test_no_frames(tmp_path: Path, fourcc: str, suffix: str) -> None:
    """A writer closed before its first frame: headers only (AVI opens, MP4 lacks its index)."""
    path = tmp_path / f"empty.{suffix}"
    cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 10, (64, 48)).release()
    line = error_line(VideoFile, path)
    assert "no decodable frames" in line if suffix == "avi" else "not a readable video" in line


def test_a_video_without_a_frame_rate_is_refused_alike_everywhere(tmp_path: Path) -> None:
    """One frame in Matroska: FFmpeg reports the 1000/s time base, not a rate. `ask` (VideoFile)
    and video-scenes' shot detector refuse it in the same words rather than assume 25 fps."""
    path = tmp_path / "one.mkv"
    path.write_bytes(vfr_mkv([0]))
    line = error_line(VideoFile, path)
    assert line == error_line(detect_shots, path)
    assert "one.mkv: the video reports no frame rate" in line


def test_bad_requests(bikes: VideoFile, media_dir: Path) -> None:
    assert "must be positive" in error_line(bikes.sample, count=0)
    assert "must be positive" in error_line(bikes.sample, fps=-1.0)
    with pytest.raises(ValueError):
        bikes.sample()
    assert "is an image, not a video" in error_line(VideoFile, media_dir / "one.png")
    with pytest.raises(InputError):
        VideoFile(media_dir / "text.jpg")


def test_variable_frame_rate_timestamps_come_from_the_decoder(tmp_path: Path) -> None:
    """Frames at 0, 40, 120, 130, 400, 410 ms: index / fps would be wrong for most of them."""
    times = [0, 40, 120, 130, 400, 410]
    path = tmp_path / "vfr.mkv"
    path.write_bytes(vfr_mkv(times))
    assert sniff(path.read_bytes()) is MediaKind.VIDEO
    with VideoFile(path) as video:
        frames = video.read(list(range(6)))
        assert [f.timestamp for f in frames] == pytest.approx([t / 1000 for t in times], abs=1e-6)
        assert [round(f.image[..., 0].mean() / 30) for f in frames] == list(range(6))  # the right pictures
        for frame in video.sample(count=3):
            assert frame.timestamp == pytest.approx(times[frame.index] / 1000, abs=1e-6)
