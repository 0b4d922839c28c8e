"""iotauth: the composition root (CLI and end-to-end demo). Import the parts from their packages."""

from importlib.metadata import PackageNotFoundError, version

__all__ = ["__version__"]

try:
    __version__ = version("iotauth")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0+unknown"
