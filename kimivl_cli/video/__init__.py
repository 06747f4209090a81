"""The shot detector, a leaf library like PySceneDetect's `detectors/`: cuts and gradual transitions
(`shots`) in every frame of a video, which `media.video.VideoFile.stream` decodes in order. It
imports only `media`; the video-scenes task (`tasks/video_scenes`) builds on it."""
