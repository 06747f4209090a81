"""`kimivl` with a fake model behind the OCR seam, for subprocess tests only.

Run as `python tests/ocr/fake_cli.py ocr ...`. The fake answers with a fenced transcription
naming the image size (so post-processing is exercised) after `FAKE_OCR_DELAY` seconds.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from kimivl_cli import cli
from kimivl_cli.cli import ocr


def fake_generate(messages: list[dict], images: list) -> str:
    time.sleep(float(os.environ.get("FAKE_OCR_DELAY", "0")))
    anchored = "ANCHORS:" in messages[0]["content"][-1]["text"]
    return f"Here is the markdown:\n```markdown\n# Fake page {images[0].size}\nanchored={anchored}\n```"


ocr.load_generate = lambda *args, **kwargs: fake_generate
cli.main()
