"""Presentation: Rich on a terminal, plain text in pipes, JSON for scripts. It draws `engine`
events and task results; only `cli` uses it.

A command builds one `Output` from its flags and sends everything through it:

    output = Output(json=json, jsonl=jsonl, show_thinking=show_thinking, quiet=quiet)
    output.note("using 12 of 36 pages (context limit)")          # stderr, silenced by --quiet
    with output.progress(len(pages), unit="pages", description="OCR") as advance:
        ...                                                       # advance() per page
    transcript = output.stream(engine.generate(messages, images))  # answer on stdout
"""

from kimivl_cli.render.answer import Transcript
from kimivl_cli.render.output import Output
from kimivl_cli.render.schema import ANSWER_SCHEMA, EVENT_SCHEMA

__all__ = ["ANSWER_SCHEMA", "EVENT_SCHEMA", "Output", "Transcript"]
