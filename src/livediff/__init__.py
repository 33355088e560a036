"""livediff: realtime video-to-video with diffusion models."""

__version__ = "0.1.0"
