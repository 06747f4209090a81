"""What each command does with a backend: prompts, page planning, parsing; no terminal output.

Above `backends` (and `media`, `processor`), below `render` and `cli`. One module per simple
command (`ask`, `chat`); `ocr/` and `video_scenes/` are packages of their own."""
