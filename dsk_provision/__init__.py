"""dsk-provision: from fresh GPU servers to a verified multi-node training job."""

from importlib.metadata import PackageNotFoundError, version

try:
    # The version has one home, pyproject.toml; installing the package records it.
    __version__ = version("dsk-provision")
except PackageNotFoundError:  # a checkout used without installing it
    __version__ = "0+unknown"
