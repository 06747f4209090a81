"""Layer rules the code can check: the shot detector is a leaf on media, videos open in one place."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "kimivl_cli"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    return names | {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}


def test_the_shot_detector_imports_only_media() -> None:
    allowed = ("kimivl_cli.media", "kimivl_cli.errors", "kimivl_cli.video")
    for path in sorted((PACKAGE / "video").glob("*.py")):
        ours = {m for m in _imports(path) if m.startswith("kimivl_cli")}
        assert all(m.startswith(allowed) for m in ours), (path.name, sorted(ours))


def test_one_place_opens_a_video() -> None:
    opening = [p for p in PACKAGE.rglob("*.py") if "cv2.VideoCapture(" in p.read_text(encoding="utf-8")]
    assert [p.relative_to(PACKAGE).as_posix() for p in opening] == ["media/video.py"]
    assert (PACKAGE / "media" / "video.py").read_text(encoding="utf-8").count("cv2.VideoCapture(") == 1
