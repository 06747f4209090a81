"""video-scenes: shots from the detector (`kimivl_cli.video`) -> keyframes -> the model's scenes
(`scenes`, `describe`) -> timecoded outputs (`timeline`, `formats`); `pipeline` runs it per video.
A task: it builds on the detector and `media`, asks a backend, and `cli/video_scenes.py` drives it."""
