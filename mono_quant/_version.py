"""The installed version of mono_quant (``0.0.0+unknown`` when run from a source tree not installed)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mono_quant")
except PackageNotFoundError:
    __version__ = "0.0.0+unknown"
