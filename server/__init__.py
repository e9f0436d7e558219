"""The HTTP server (installed as ``ttscale.server``)."""

from ttscale.server.app import create_app

__all__ = ["create_app"]
