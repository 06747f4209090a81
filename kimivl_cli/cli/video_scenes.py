"""`kimivl video-scenes`: options in, `video.pipeline` does the work, text out."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from kimivl_cli.cli.common import (
    ApiBaseOpt,
    ApiKeyOpt,
    BackendModelOpt,
    BackendOpt,
    ConcurrencyOpt,
    DeviceOpt,
    ForceOpt,
    MaxTokensOpt,
    QuantOpt,
    QuietOpt,
    SeedOpt,
    TemperatureOpt,
    ThinkingBudgetOpt,
    TopPOpt,
    batch_answerer,
    chat_options,
    open_chat_backend,
)
from kimivl_cli.errors import InputError
from kimivl_cli.media.inputs import resolve_inputs
from kimivl_cli.media.sniff import MediaKind
from kimivl_cli.tasks.pool import ordered_map
from kimivl_cli.tasks.video_scenes.describe import describe_with
from kimivl_cli.tasks.video_scenes.formats import FORMATS
from kimivl_cli.tasks.video_scenes.pipeline import VideoScenesOptions, check_request, video_scenes, write_output
from kimivl_cli.video.shots import DetectorParams


def video_paths(args: list[str]) -> list[str]:
    """Video files named or found in folders (media's sniffing and messages); stdin is not seekable enough."""
    items = resolve_inputs(args, kinds=[MediaKind.VIDEO])
    if piped := [item.name for item in items if item.path is None]:
        raise InputError(f"video-scenes reads video files, not {piped[0]}", "save the video to a file first")
    return [str(item.path) for item in items]


def video_scenes_command(
    videos: Annotated[list[str], typer.Argument(help="Video files, or folders of them.")],
    shots_only: Annotated[bool, typer.Option("--shots-only", help="Only detect shots; no model.")] = False,
    fmt: Annotated[str, typer.Option("--format", "-f", help=f"One of: {', '.join(FORMATS)}.")] = "json",
    output: Annotated[
        Optional[str],
        typer.Option(
            "--output",
            "-o",
            help="Write to this file, or one file per video into this folder (a trailing / makes one).",
        ),
    ] = None,
    force: ForceOpt = False,
    max_frames: Annotated[int, typer.Option("--max-frames", help="Most keyframes sent to the model.", min=1)] = 32,
    fps: Annotated[float, typer.Option("--fps", help="Keyframes per second of video.", min=0.01)] = 1.0,
    threshold: Annotated[
        float, typer.Option("--threshold", help="Cut sensitivity, 0-1 (lower finds more).", min=0.01, max=0.99)
    ] = DetectorParams.threshold,
    min_scene_len: Annotated[
        int, typer.Option("--min-scene-len", help="Fewest frames in a shot.", min=1)
    ] = DetectorParams.min_scene_len,
    verify_shots: Annotated[
        bool, typer.Option("--verify-shots", help="Ask the model about uncertain shot changes.")
    ] = False,
    prompt_file: Annotated[
        Optional[Path],
        typer.Option("--prompt-file", help="Use this scene prompt instead of prompts/video_scenes.md."),
    ] = None,
    concurrency: ConcurrencyOpt = 1,
    quiet: QuietOpt = False,
    max_tokens: MaxTokensOpt = None,
    temperature: TemperatureOpt = None,
    top_p: TopPOpt = None,
    seed: SeedOpt = None,
    thinking_budget: ThinkingBudgetOpt = None,
    backend: BackendOpt = "local",
    api_base: ApiBaseOpt = None,
    api_key: ApiKeyOpt = None,
    model: BackendModelOpt = None,
    device: DeviceOpt = "auto",
    quant: QuantOpt = "auto",
) -> None:
    """Split videos into shots (--shots-only) or described scenes: JSON, CSV, subtitles, EDL, chapters.

    \b
    Formats: json, jsonl, csv, srt, vtt, md, edl (CMX 3600), chapters (YouTube's "0:00 Title"
    list), ffmetadata (FFmpeg's chapter metadata).
    Examples:
      kimivl video-scenes talk.mp4 --shots-only --format edl -o talk.edl
      kimivl video-scenes a.mp4 b.mp4 -o scenes/ -f srt      # scenes/a.srt, scenes/b.srt
      kimivl video-scenes archive/ -o scenes/ --backend openai --api-base http://gpu:8000/v1 -j 8
    """
    from kimivl_cli.render import Output

    out = Output(quiet=quiet)
    videos = video_paths(videos)
    files = check_request(videos, fmt, output, force)
    if shots_only and verify_shots:
        raise InputError("--verify-shots asks the model, --shots-only runs without it", "give one of them")
    describe = None
    if not shots_only:
        answerer, concurrency = batch_answerer(
            open_chat_backend(backend, api_base, api_key, model, device, quant, quiet),
            chat_options(max_tokens, temperature, top_p, seed, thinking_budget),
            concurrency,
            quiet,
        )
        describe = describe_with(answerer)
    options = VideoScenesOptions(
        DetectorParams(threshold, min_scene_len), max_frames, fps, verify_shots, prompt_file, concurrency
    )
    lists = []
    bar = out.progress(len(videos), unit="videos", description="shots" if shots_only else "scenes described")
    with bar as advance:
        results = ordered_map(lambda video: video_scenes(video, options, describe), videos, concurrency)
        for i, (video, result) in enumerate(zip(videos, results, strict=True)):
            if files is not None:  # one file per video, written as soon as it is done
                write_output([result.scenes], fmt, files[i], force)
            else:
                lists.append(result.scenes)
            shots = result.shots
            out.note(
                f"{Path(video).name}: {len(shots.shots)} shots, {len(result.scenes.scenes)} scenes, "
                f"{shots.frames} frames in {shots.seconds:.2f} s ({shots.frames / max(shots.seconds, 1e-9):.0f} frames/s)"
            )
            for warning in result.scenes.warnings:
                out.stderr.print(f"warning: {warning}", markup=False, highlight=False, soft_wrap=True)
            advance()
    if files is None and (text := write_output(lists, fmt, Path(output) if output else None, force)) is not None:
        sys.stdout.write(text)


def register(app: typer.Typer) -> None:
    app.command("video-scenes")(video_scenes_command)
