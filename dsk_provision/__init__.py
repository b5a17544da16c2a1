"""dsk-provision: from fresh GPU servers to a verified multi-node training job."""

from __future__ import annotations


def __getattr__(name: str) -> str:
    # ``__version__`` is read from the package metadata (its one home is pyproject.toml),
    # only when asked for: importlib.metadata would slow every start of the CLI.
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("dsk-provision")
        except PackageNotFoundError:  # a checkout used without installing it
            return "0+unknown"
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
