"""video-scenes: the shot detector (`reader`, `shots`), scene description and output formats."""
