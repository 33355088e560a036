"""The media layer: aiortc peers, ingest, egress and codecs. It never sees a model."""
