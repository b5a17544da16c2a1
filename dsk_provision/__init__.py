"""dsk-provision: from fresh GPU servers to a verified multi-node training job."""

__version__ = "0.1.0"
