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
    elif item.kind is MediaKind.PDF:
        from kimivl_cli.media.pdf import DEFAULT_DPI, PdfDocument

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
    elif item.kind is MediaKind.VIDEO:
        from kimivl_cli.media.video import VideoFile

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
    return info


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


def summary(info: dict[str, Any]) -> str:
    """One human line per input."""
    head = f"{info['name']}: {info['kind']}, {_size(info['bytes'])}"
    if info["kind"] == "image":
        pages = info["pages"]
        sizes = ", ".join(f"{p['width']}x{p['height']} ({_tokens(p['tokens'])})" for p in pages[:4])
        more = f", ... {len(pages)} pages" if len(pages) > 4 else ""
        return f"{head}, {sizes}{more}"
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
            f"{head}, {info['page_count']} pages, {' / '.join(sorted(sizes))}, "
            f"text layer on {text} pages, {cost}{repaired}"
        )
    return (
        f"{head}, {info['width']}x{info['height']}, {info['frame_count']} frames at {info['fps']:g} fps, "
        f"{info['duration']:.2f} s, {_tokens(info['tokens_per_frame'])} per frame"
    )


def register(app: typer.Typer) -> None:
    @app.command("inspect")
    def _command(
        inputs: Annotated[
            list[str], typer.Argument(help="Images, PDFs, videos or folders ('-' reads stdin).", metavar="FILE")
        ],
        password: Annotated[Optional[str], typer.Option("--password", help="Password of encrypted PDFs.")] = None,
        as_json: JsonOpt = False,
    ) -> None:
        """Show what kimivl sees in each input: kind, size, pages, frames, fps, duration, token cost.

        Example: kimivl inspect scan.pdf clip.mp4 photos/ --json
        """
        described = [describe(item, password) for item in resolve_inputs(inputs)]
        if as_json:
            typer.echo(json.dumps({"inputs": described}, indent=2))
        else:
            for info in described:
                typer.echo(summary(info))
