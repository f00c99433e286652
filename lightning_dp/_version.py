"""The version of lightning_dp, in one place (read by the package metadata and ``lightning_dp.__version__``)."""

__version__ = "0.1.0"
