"""A live web dashboard of pools (Starlette; ``pip install 'snakepool[dashboard]'``).

``dashboard_app(pools)`` is an ASGI app: mount it in your own app, or let
``snakepool up --dashboard 127.0.0.1:PORT`` serve it. The page's assets ship
in this package (no CDN); it is updated by push (server-sent events, once a
second), not by reloading. Routes:

- ``/``: the page; ``/static/...``: its script and style;
- ``/api/state``: everything the page shows, as JSON (the history included);
- ``/api/stream?log=POOL/WORKER``: the server-sent events the page listens to
  (``hello`` with the history and the recent events, then ``state`` once a
  second with new events and the chosen worker's new log lines);
- ``/api/logs?pool=P&worker=N``: a worker's kept log lines, as JSON.

Give ``token`` to require it (``?token=``, kept as a cookie, or
``Authorization: Bearer``): ``snakepool up`` does for any address that is not
loopback.
"""

from __future__ import annotations

from ._app import dashboard_app as dashboard_app

__all__ = ["dashboard_app"]
