"""sfumato's HTTP server: an AUTOMATIC1111-compatible API, a job API with progress events, and a
static web UI, all over one job queue (``sfumato serve``).

``app.create_app(app.ServerConfig(...))`` builds the FastAPI application. Nothing is imported
here, so ``sfumato.server.cli`` adds its command without FastAPI installed.
"""
