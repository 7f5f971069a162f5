"""setuptools shim; the metadata lives in setup.cfg.

``twisted/plugins`` has no ``__init__.py`` (it would shadow Twisted's own), so it
is listed as a package explicitly in setup.cfg.
"""

from setuptools import setup

setup()
