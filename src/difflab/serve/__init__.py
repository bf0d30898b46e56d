"""Serving: an HTTP API and a self-contained web page for text-to-image generation (`difflab serve`)."""

from difflab.serve.app import Backend, create_app, run_server

__all__ = ["Backend", "create_app", "run_server"]
