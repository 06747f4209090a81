"""The shot detector, a leaf library like PySceneDetect's `detectors/`: every frame of a video
read in order (`reader`), cuts and gradual transitions found in them (`shots`). It imports only
`media`; the video-scenes task (`tasks/video_scenes`) builds on it."""
