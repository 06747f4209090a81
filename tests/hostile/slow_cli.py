"""`kimivl` with a model that takes its time, for the signal tests: `python tests/hostile/slow_cli.py ARGS`.

Every answer first touches `$SLOW_MARKER` (so the test knows a request is running), then sleeps
`$SLOW_SECONDS` (default 60) and answers `$SLOW_ANSWER` (default an empty JSON list).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from kimivl_cli import cli
from kimivl_cli.backends import ServerSide
from kimivl_cli.engine.events import AnswerDelta, Done, Usage
from kimivl_cli.tasks import backend


class SlowBackend(ServerSide):
    name = "slow"

    def __init__(self) -> None:
        self.notes: list[str] = []

    def chat(self, messages, images, options=None):
        with open(os.environ["SLOW_MARKER"], "a") as marker:
            marker.write("started\n")
        time.sleep(float(os.environ.get("SLOW_SECONDS", "60")))
        yield AnswerDelta(os.environ.get("SLOW_ANSWER", "[]"))
        yield Done(usage=Usage(prompt_tokens=1, answer_tokens=1))


backend.open_backend = lambda *args, **kwargs: SlowBackend()  # what the CLI opens, looked up per call
cli.main()
