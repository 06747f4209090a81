"""Layer rules the code can check: the one-way flow of README's "How it is built", the shot
detector a leaf on media, videos opened in one place."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "kimivl_cli"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    return names | {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}


LAYERS = [
    "media",
    "video",
    "processor",
    "kernels",
    "quant",
    "model",
    "engine",
    "backends",
    "tasks",
    "render",
    "serve",
    "cli",
]
"""README's order ("How it is built"): a module imports only from its own layer and those before it."""

LEAVES = ["errors", "guards", "files", "prompts", "weight_formats"]
"""Top-level modules any layer may read, as it may `model/config.py`, `model/hooks.py` (the loader's
protocols quant's modules declare) and the package's `__version__`."""

OUTSIDE = ["testing", "golden", "demo", "__main__"]
"""Test support and entry points: they may import any layer, and no layer imports them."""


def _shared(module: str) -> bool:
    return module == "kimivl_cli" or module.startswith(
        (*(f"kimivl_cli.{leaf}" for leaf in LEAVES), "kimivl_cli.model.config", "kimivl_cli.model.hooks")
    )


def test_every_import_follows_the_one_way_flow() -> None:
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        layer = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        if layer in OUTSIDE or layer in LEAVES or layer == "__init__":
            continue
        assert layer in LAYERS, f"{layer}: a new package? place it in LAYERS and in README's list"
        for module in _imports(path):
            if not module.startswith("kimivl_cli") or _shared(module):
                continue
            target = module.split(".")[1]
            if target not in LAYERS or LAYERS.index(target) > LAYERS.index(layer):
                wrong.append(f"{path.relative_to(PACKAGE)} imports {module}")
    assert wrong == []


def test_the_shot_detector_imports_only_media() -> None:
    allowed = ("kimivl_cli.media", "kimivl_cli.errors", "kimivl_cli.video")
    for path in sorted((PACKAGE / "video").glob("*.py")):
        ours = {m for m in _imports(path) if m.startswith("kimivl_cli")}
        assert all(m.startswith(allowed) for m in ours), (path.name, sorted(ours))


def test_one_place_opens_a_video() -> None:
    opening = [p for p in PACKAGE.rglob("*.py") if "cv2.VideoCapture(" in p.read_text(encoding="utf-8")]
    assert [p.relative_to(PACKAGE).as_posix() for p in opening] == ["media/video.py"]
    assert (PACKAGE / "media" / "video.py").read_text(encoding="utf-8").count("cv2.VideoCapture(") == 1
