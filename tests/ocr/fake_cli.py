"""`kimivl` with the fake model behind the OCR seam, for the subprocess (SIGINT) tests.

Run as `python tests/ocr/fake_cli.py ocr ...`.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ocr_helpers import fake_generate, use_fake_model

from kimivl_cli import cli

use_fake_model(fake_generate)
cli.main()
