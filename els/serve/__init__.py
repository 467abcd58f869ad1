"""The OpenAI-compatible server: the wire protocol, the FastAPI app, the chat serving between them and
the batching worker."""

from els.serve.app import create_app
from els.serve.protocol import Limits

__all__ = ["Limits", "create_app"]
