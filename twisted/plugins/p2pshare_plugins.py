"""twistd plugins ``p2ptracker`` and ``p2ppeer``.

Imports nothing from p2pshare while twistd scans for plugins: the options and
the service are looked up in ``p2pshare.tap`` only when one of them is used.
"""

from importlib import import_module

from twisted.application.service import IServiceMaker
from twisted.plugin import IPlugin
from zope.interface import implementer


@implementer(IServiceMaker, IPlugin)
class _Maker:
    def __init__(self, tapname: str, description: str, options: str, make: str) -> None:
        self.tapname = tapname
        self.description = description
        self._names = (options, make)

    @property
    def options(self):  # type: ignore[no-untyped-def]
        return getattr(import_module("p2pshare.tap"), self._names[0])

    def makeService(self, options):  # type: ignore[no-untyped-def]
        return getattr(import_module("p2pshare.tap"), self._names[1])(options)


p2ptracker = _Maker("p2ptracker", "Run a p2pshare tracker.", "TrackerOptions", "makeTrackerService")
p2ppeer = _Maker("p2ppeer", "Run a p2pshare peer.", "PeerOptions", "makePeerService")
