"""The operator dashboard and the Prometheus endpoint of a coordinator.

Owns, by module: ``routes`` (aiohttp routes: the page ``/dashboard`` and its assets, the
admin JSON endpoints under ``/v1/admin/dashboard/``, ``/metrics``), ``views`` (what those
endpoints answer, read from the store), ``static/`` (the page: plain JavaScript modules and
Chart.js, vendored from the npm registry with its license; nothing is loaded from elsewhere).

The page is public and holds no data; it asks for the admin token, keeps it in the browser's
``sessionStorage`` and sends it as ``Authorization: Bearer`` to the JSON endpoints, which
refuse requests without it (``401 unauthorized``). :mod:`coordinator.app` installs all of it
with one call::

    dashboard.add_routes(app, coord, run, queue_depth)
"""

from coordinator.dashboard.routes import add_routes

__all__ = ["add_routes"]
