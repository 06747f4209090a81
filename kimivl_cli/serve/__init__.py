"""`kimivl serve`: the local engine behind an OpenAI-compatible HTTP API (see `server`)."""

from kimivl_cli.serve.server import DEFAULT_QUEUE_SIZE, ChatServer

__all__ = ["DEFAULT_QUEUE_SIZE", "ChatServer"]
