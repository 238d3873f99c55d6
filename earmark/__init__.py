"""earmark: teach a sound classifier new sound classes over time, without forgetting and without old audio.

The product object is :class:`earmark.model.Model`; the experiment harness is :mod:`earmark.experiments`.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("earmark")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
