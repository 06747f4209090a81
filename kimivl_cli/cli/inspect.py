"""`kimivl inspect`: what kimivl sees in each input, and what it would cost, without the model.

Every input is fully opened the way `ask`/`ocr` would open it (images decoded, PDF pages
measured, the last video frame decoded), so a file that inspects cleanly will load later.
Vision-token costs use the official processor settings (`processor.image.image_token_count`):
images at their size, PDF pages rendered at `media.pdf.DEFAULT_DPI`, video frames at their size.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Optional

import typer

from kimivl_cli.cli.common import JsonOpt
from kimivl_cli.errors import InputError
from kimivl_cli.media import MediaInput, MediaKind, load_images, resolve_inputs


def _token_count(width: int, height: int) -> int | None:
    """Tokens for an image of this size; None when it is too large for the vision tower."""
    from kimivl_cli.processor.image import image_token_count  # imports torch: only when needed

    try:
        return image_token_count(width, height)
    except InputError:
        return None


def describe(item: MediaInput, password: str | None = None) -> dict[str, Any]:
    """A JSON-ready description of one input (raises InputError if it does not open)."""
    info: dict[str, Any] = {"name": item.name, "kind": str(item.kind), "bytes": item.size}
    if item.kind is MediaKind.IMAGE:
        pages = load_images(item)
        info["pages"] = [{"width": im.width, "height": im.height, "tokens": _token_count(*im.size)} for im in pages]
        if (frames := _animation_frames(item)) > 1:
            info["animation_frames"] = frames  # `ask` sends the first
    elif item.kind is MediaKind.TEXT:
        from kimivl_cli.tasks.ask import MAX_TEXT_BYTES

        text = item.read_bytes().decode("utf-8", errors="replace")
        info.update(
            characters=len(text),
            lines=text.count("\n") + (not text.endswith("\n")),
            too_long=item.size > MAX_TEXT_BYTES,
        )
    elif item.kind is MediaKind.PDF:
        info.update(_pdf_info(item, password))
    elif item.kind is MediaKind.VIDEO:
        info.update(_video_info(item))
    return info


def _pdf_info(item: MediaInput, password: str | None) -> dict[str, Any]:
    """Page count, repair, and each page's size, tokens and words at the default DPI."""
    from kimivl_cli.media.pdf import DEFAULT_DPI, PdfDocument

    info: dict[str, Any] = {}
    with PdfDocument(item, password=password) as doc:
        info["page_count"] = doc.page_count
        info["repaired"] = doc.repaired
        info["dpi"] = DEFAULT_DPI
        info["pages"] = []
        for index in range(doc.page_count):
            width_pt, height_pt = doc.page_size(index)
            width, height = doc.render_size(index)
            info["pages"].append(
                {
                    "page": index + 1,
                    "width_pt": round(width_pt, 2),
                    "height_pt": round(height_pt, 2),
                    "width": width,
                    "height": height,
                    "tokens": _token_count(width, height),
                    "words": len(doc.page(index).get_text("words")),
                }
            )
    return info


def _video_info(item: MediaInput) -> dict[str, Any]:
    """Size, frames, rate, duration, and the tokens `ask`'s default frames cost."""
    from kimivl_cli.media.video import VideoFile
    from kimivl_cli.tasks.ask import DEFAULT_FRAMES

    info: dict[str, Any] = {}
    with VideoFile(item) as video:
        video.check_end()
        info.update(
            width=video.width,
            height=video.height,
            frame_count=video.frame_count,
            fps=round(video.fps, 3),
            duration=round(video.duration, 3),
            tokens_per_frame=_token_count(video.width, video.height),
        )
    frames = min(DEFAULT_FRAMES, info["frame_count"])
    per_frame = info["tokens_per_frame"]
    info.update(default_frames=frames, default_tokens=None if per_frame is None else frames * per_frame)
    return info


def _animation_frames(item: MediaInput) -> int:
    """Frames of an animated GIF or WebP (1 for a still image; TIFF pages are pages, not frames)."""
    from PIL import Image

    with item.open() as fh, Image.open(fh) as image:
        return getattr(image, "n_frames", 1) if image.format in ("GIF", "WEBP", "PNG") else 1


def _size(n: int) -> str:
    value, unit = float(n), "B"
    for larger in ("KiB", "MiB", "GiB"):
        if value < 1024:
            break
        value, unit = value / 1024, larger
    return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"


def _tokens(n: int | None) -> str:
    if n is None:
        return "too large for the vision tower"
    return f"{n} token" if n == 1 else f"{n} tokens"


def _span(values: list[Any]) -> str:
    low, high = min(values), max(values)
    return f"{low}" if low == high else f"{low}-{high}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def summary(info: dict[str, Any]) -> str:
    """One human line per input."""
    head = f"{info['name']}: {info['kind']}, {_size(info['bytes'])}"
    if info["kind"] == "image":
        pages = info["pages"]
        sizes = ", ".join(f"{p['width']}x{p['height']} ({_tokens(p['tokens'])})" for p in pages[:4])
        more = f", ... {len(pages)} pages" if len(pages) > 4 else ""
        animated = (
            f", animated: {info['animation_frames']} frames, the first is sent" if "animation_frames" in info else ""
        )
        return f"{head}, {sizes}{more}{animated}"
    if info["kind"] == "text":
        size = f"{_count(info['characters'], 'character')} on {_count(info['lines'], 'line')}"
        return f"{head}, {size}, " + (
            "too long to ask about" if info["too_long"] else "inlined into the prompt as text"
        )
    if info["kind"] == "pdf":
        pages = info["pages"]
        sizes = {f"{p['width_pt']:g}x{p['height_pt']:g} pt" for p in pages}
        tokens = [p["tokens"] for p in pages]
        cost = (
            f"{_span(tokens)} tokens per page at {info['dpi']:g} dpi ({sum(tokens)} in all)"
            if None not in tokens
            else "some pages too large for the vision tower"
        )
        text = sum(p["words"] > 0 for p in pages)
        repaired = ", repaired by MuPDF" if info["repaired"] else ""
        return (
            f"{head}, {_count(info['page_count'], 'page')}, {' / '.join(sorted(sizes))}, "
            f"text layer on {_count(text, 'page')}, {cost}{repaired}"
        )
    total = info["default_tokens"]
    default = "" if total is None else f", {total} tokens for the default {info['default_frames']} frames (--frames)"
    return (
        f"{head}, {info['width']}x{info['height']}, {_count(info['frame_count'], 'frame')} at {info['fps']:g} fps, "
        f"{info['duration']:.2f} s, {_tokens(info['tokens_per_frame'])} per frame{default}"
    )


def inspect_command(
    inputs: Annotated[
        list[str],
        typer.Argument(help="Images, PDFs, videos, text files or folders ('-' reads stdin).", metavar="FILE"),
    ],
    password: Annotated[Optional[str], typer.Option("--password", help="Password of encrypted PDFs.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Show what kimivl sees in each input: kind, size, pages, frames, fps, duration, token cost.

    Takes what `ask` takes: images, PDFs, videos, text files, folders and '-'.

    Example: kimivl inspect scan.pdf clip.mp4 photos/ --json
    """
    from kimivl_cli.tasks.ask import ASK_KINDS

    described = [describe(item, password) for item in resolve_inputs(inputs, kinds=ASK_KINDS)]
    if as_json:
        typer.echo(json.dumps({"inputs": described}, indent=2))
    else:
        for info in described:
            typer.echo(summary(info))


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect_command)
