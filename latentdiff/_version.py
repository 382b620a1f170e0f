"""The library's version, in a module of its own so that any module can read it without importing
the package root (which would be an import cycle) and without importing torch."""

__version__ = "0.1.0"
