"""Serving a metrics registry over HTTP: ``/metrics`` for ``--metrics`` and the control API.

The scrape runs on the reactor thread (``MetricsPage``), not in a WSGI thread as
``prometheus_client.twisted.MetricsResource`` would: the collectors read state that only the
reactor thread may touch.  Kept apart from ``metrics`` so that a process that serves no
metrics does not load ``twisted.web``.
"""

from __future__ import annotations

from typing import Optional

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Request, Site


class MetricsPage(Resource):
    """``GET``: the registry in the text format the scraper asks for (Prometheus or OpenMetrics)."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: Request) -> bytes:
        encoder, content_type = choose_encoder((request.getHeader("accept") or ""))
        request.setHeader(b"content-type", content_type.encode())
        return encoder(self.registry)  # type: ignore[no-any-return]


def metrics_site(registry: CollectorRegistry) -> Site:
    """A site for ``--metrics``: ``/metrics`` only, no token (it is meant for a scraper on the network)."""
    root = Resource()
    root.putChild(b"metrics", MetricsPage(registry))
    site = Site(root)
    site.noisy = False
    site.displayTracebacks = False
    return site


class MetricsService(Service):
    """Serves ``/metrics`` of *registry* on *endpoint* (``--metrics``); ``when_listening`` fires once it listens."""

    log = Logger()

    def __init__(self, endpoint: IStreamServerEndpoint, registry: CollectorRegistry) -> None:
        self.endpoint, self.registry = endpoint, registry
        self.port: Optional[IListeningPort] = None
        self._listening: Deferred[None] = Deferred()

    def startService(self) -> None:
        super().startService()

        def listening(port: IListeningPort) -> None:
            self.port = port
            self.log.info("metrics on http://{host}:{port}/metrics", host=port.getHost().host,
                          port=port.getHost().port)
            self._listening.callback(None)

        def failed(f: Failure) -> None:
            self.log.critical("the metrics endpoint could not listen ({error}); pick another with --metrics",
                              error=f.getErrorMessage())
            self._listening.errback(f)

        self.endpoint.listen(metrics_site(self.registry)).addCallbacks(listening, failed)

    def when_listening(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self._listening.addBoth(lambda r: (d.errback(r) if isinstance(r, Failure) else d.callback(None), None)[1])
        return d

    def stopService(self) -> Deferred[None]:
        super().stopService()
        port, self.port = self.port, None
        return succeed(None) if port is None else port.stopListening()  # type: ignore[return-value]
