"""`kimivl serve`: the local engine behind an OpenAI-compatible HTTP API (see `server`); a peer of
`cli` on top of `backends`, `engine` and `media`."""

from kimivl_cli.serve.server import DEFAULT_QUEUE_SIZE, ChatServer

__all__ = ["DEFAULT_QUEUE_SIZE", "ChatServer"]
