"""Serving: an OpenAI-compatible HTTP server (FastAPI) with a continuous-batching generation engine.

    from lmforge.serve import create_app
    app = create_app("runs/chat", api_key="secret")   # a FastAPI app; `lmforge serve` runs it with uvicorn
"""
from __future__ import annotations


def create_app(model_path, **options):
    """See lmforge.serve.app.create_app (imported lazily: FastAPI and torch load only when serving)."""
    from lmforge.serve.app import create_app as _create

    return _create(model_path, **options)


__all__ = ["create_app"]
