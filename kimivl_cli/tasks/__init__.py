"""What each command does with a backend: prompts, page planning, parsing; no terminal output."""
