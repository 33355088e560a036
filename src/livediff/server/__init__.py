"""The HTTP face: FastAPI app, routers and the service that owns sessions."""

from livediff.server.app import create_app, mount_service
from livediff.server.service import LivediffService

__all__ = ["LivediffService", "create_app", "mount_service"]
