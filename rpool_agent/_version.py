"""The single place the version is written; read by pyproject and `--version`."""

__version__ = "0.1.0"
