"""CPU kernels: ``@njit(parallel=True)`` loops over rows."""
