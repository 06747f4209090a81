"""video-scenes: shots from the detector (`kimivl_cli.video`) -> keyframes -> the model's scenes
(`scenes`, `describe`) -> timecoded outputs (`timeline`, `formats`); `pipeline` runs it per video."""
