"""h264edge: an edge cache server for H.264/MP4 video with HTTP pseudo-streaming seeks."""

__version__ = "0.1.0"
