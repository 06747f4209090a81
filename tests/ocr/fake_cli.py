"""`kimivl` with the fake model behind the OCR seam, for the subprocess (SIGINT) tests.

Run as `python tests/ocr/fake_cli.py ocr ...`.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ocr_helpers import fake_generate

from kimivl_cli import cli
from kimivl_cli.cli import ocr

ocr.load_generate = lambda *args, **kwargs: fake_generate
cli.main()
