"""setup.py: all metadata lives in setup.cfg; this file refreshes Twisted's plugin cache after install."""
from setuptools import setup

setup()

try:
    from twisted.plugin import IPlugin, getPlugins

    list(getPlugins(IPlugin))
except Exception:  # the cache is rebuilt at first use anyway
    pass
