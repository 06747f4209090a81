"""`--schema` and `--json-mode`: what the answer must be, as a `JsonFormat`.

`--schema` takes a JSON Schema file, inline JSON, or `llm`'s concise form: fields separated by
commas (or newlines, then descriptions may hold commas), each `name [type][: description]`
with type `str` (the default), `int`, `float` or `bool`; every field is required:

    'name, age int, bio: a short biography'
    -> {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
        "bio": {"type": "string", "description": "a short biography"}}, "required": ["name", "age", "bio"]}
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from kimivl_cli.engine.events import JsonFormat
from kimivl_cli.errors import InputError

CONCISE_TYPES = {"str": "string", "int": "integer", "float": "number", "bool": "boolean"}
_FIELD = re.compile(r"^(?P<name>[A-Za-z_][\w-]*)(?:\s+(?P<type>\w+))?\s*(?::\s*(?P<description>.*))?$", re.S)


def concise_schema(text: str) -> dict[str, Any]:
    """The JSON Schema of an object with the fields `text` lists (see the module doc)."""
    parts = text.splitlines() if "\n" in text.strip() else text.split(",")
    properties: dict[str, Any] = {}
    for part in (p.strip() for p in parts):
        if not part:
            continue
        match = _FIELD.match(part)
        if match is None:
            raise InputError(f"`schema`: cannot read the field {part!r}", "write fields as 'name, age int, bio: text'")
        kind = match["type"] or "str"
        if kind not in CONCISE_TYPES:
            raise InputError(f"`schema`: unknown type {kind!r} for {match['name']}", "use str, int, float or bool")
        field: dict[str, Any] = {"type": CONCISE_TYPES[kind]}
        if match["description"]:
            field["description"] = match["description"].strip()
        properties[match["name"]] = field
    if not properties:
        raise InputError("`schema` lists no fields", "e.g. `schema` 'name, age int'")
    return {"type": "object", "properties": properties, "required": list(properties)}


def json_format(schema: str | None, json_mode: bool) -> JsonFormat | None:
    """The format a schema (`schema`) or plain JSON (`json_mode`) asks for (None: free text)."""
    if schema is None:
        return JsonFormat() if json_mode else None
    if json_mode:
        raise InputError("`schema` already makes the answer JSON", "give `schema` or `json_mode`, not both")
    path = Path(schema).expanduser()
    if not schema.lstrip().startswith("{") and path.is_file():
        try:
            schema = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"`schema`: cannot read {path} ({exc})") from None
        return JsonFormat(_parsed(schema, str(path)))
    if schema.lstrip().startswith("{"):
        return JsonFormat(_parsed(schema, "`schema`"))
    return JsonFormat(concise_schema(schema))


def _parsed(text: str, where: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise InputError(f"{where} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InputError(f"{where} must be a JSON Schema object, got {type(value).__name__}")
    return value
