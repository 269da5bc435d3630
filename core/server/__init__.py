"""tokenmill.server: an OpenAI-compatible HTTP server (``tokenmill serve``).

    HTTP clients --> uvicorn (h11) --> FastAPI app (app.py)
                                         |  /v1/completions  (completions.py)
                                         |  /v1/chat/completions (chat.py)
                                         |  /v1/models, /health, /metrics (metrics.py)
                                         v
                                     AsyncEngine (async_engine.py) --thread--> LLMEngine.step()

Requests are validated into SamplingParams (protocol.py), admitted to the
engine thread, and answered as JSON or as server-sent events ending in
``data: [DONE]``. Needs the ``serve`` extra (fastapi, uvicorn).
"""
from .app import build_app
from .async_engine import AsyncEngine, EngineDeadError, EngineUnavailableError, RequestStream
from .launch import serve
from .metrics import ServerMetrics

__all__ = ["AsyncEngine", "EngineDeadError", "EngineUnavailableError", "RequestStream", "ServerMetrics",
           "build_app", "serve"]
