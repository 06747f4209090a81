"""Presentation: Rich on a terminal, plain text in pipes, JSON for scripts (see `output.Output`)."""

from kimivl_cli.render.answer import Transcript
from kimivl_cli.render.output import Output
from kimivl_cli.render.schema import ANSWER_SCHEMA, EVENT_SCHEMA

__all__ = ["ANSWER_SCHEMA", "EVENT_SCHEMA", "Output", "Transcript"]
