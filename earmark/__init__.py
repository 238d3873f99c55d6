"""earmark: teach a sound classifier new classes over time."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("earmark")  # from the installed package's metadata (pyproject.toml)
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
