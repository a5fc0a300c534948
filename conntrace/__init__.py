"""conntrace: see why Linux conntrack marks TCP segments INVALID."""

__version__ = "0.1.0"
