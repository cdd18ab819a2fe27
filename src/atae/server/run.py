"""Run the search page for an open library: load what searches need first, then listen (``atae serve``,
``atae demo --serve``)."""

from __future__ import annotations


def make_server(library, host: str = "127.0.0.1", port: int = 8000, *, log=print, warn=print,
                **app_options):
    """Warm ``library`` up (``atae.library.warm``: ``warn`` gets the parts that did not load) and return
    a uvicorn server for it whose start logs "ready: open URL" once the port is bound (a busy port fails
    before that); ``app_options`` (e.g. ``allow_hosts``, ``max_upload_bytes``) go to ``create_app``."""
    import uvicorn

    from atae.library.warm import warm_up
    from atae.server.app import create_app

    log(f"atae: {library.stats()['files']} files; loading the towers and the model...")
    for problem in warm_up(library):
        warn(f"warning: {problem}")
    shown = f"[{host}]" if ":" in host else host

    class _Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets=sockets)
            if not self.should_exit:
                bound = self.servers[0].sockets[0].getsockname()[1] if self.servers else port
                log(f"ready: open http://{shown}:{bound}/")

    app = create_app(library, host=host, **app_options)
    return _Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))


def serve_library(library, host: str = "127.0.0.1", port: int = 8000, **options) -> None:
    """``make_server`` then serve until interrupted."""
    make_server(library, host, port, **options).run()
