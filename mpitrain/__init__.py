"""mpitrain: data-, tensor- and pipeline-parallel training over MPI with NumPy or CuPy."""

__version__ = "0.1.0"
