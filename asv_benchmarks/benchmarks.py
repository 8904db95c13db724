"""airspeed velocity suite: every public operation, from numba_kd.registry.

time_*     wall time of one call (compiled and warmed up in setup)
peakmem_*  peak resident memory of one call
track_*    % of the memory roofline (np.copyto of as many bytes, timed in the
           same run) and the max relative error against the float64 reference
"""

from numba_kd.bench import paired_with_copy
from numba_kd.registry import OPERATIONS, SPARSE_OPERATIONS, SPARSE_SHAPE, Case, SparseCase, relative_error

SHAPES = [(8192, 1000), (512, 32000)]


class Operations:
    params = (list(OPERATIONS), [2, 4], SHAPES, ["float32", "float64", "bfloat16"])
    param_names = ["operation", "K", "shape", "dtype"]  # noqa: RUF012
    timeout = 300

    def setup(self, operation, n_teachers, shape, dtype):
        self.op = OPERATIONS[operation]
        self.case = Case(n_teachers, shape[0], shape[1], dtype)
        self.args = self.case.arrays(ignored=self.op.ignored)
        self.op.numba_kd(*self.args)  # compile, or load from the on-disk cache

    def time_call(self, operation, n_teachers, shape, dtype):
        self.op.numba_kd(*self.args)

    def peakmem_call(self, operation, n_teachers, shape, dtype):
        self.op.numba_kd(*self.args)

    def track_roofline_percent(self, operation, n_teachers, shape, dtype):
        call = lambda: self.op.numba_kd(*self.args)  # noqa: E731
        return 100.0 * paired_with_copy(call, self.op.bytes_moved(self.case), 5)[2]

    track_roofline_percent.unit = "%"

    def track_max_relative_error(self, operation, n_teachers, shape, dtype):
        return relative_error(self.op.numba_kd(*self.args), self.op.numpy(*self.args))

    track_max_relative_error.unit = "relative"


class SparseOperations:
    """The sparse top-k rows (registry.SPARSE_OPERATIONS) at SPARSE_SHAPE: N = 1024,
    C = 128000, K = 2 teachers, k = 64; the error on the first 32 rows."""

    params = (list(SPARSE_OPERATIONS), ["float32"])
    param_names = ["operation", "dtype"]  # noqa: RUF012
    timeout = 600

    def setup(self, operation, dtype):
        self.op = SPARSE_OPERATIONS[operation]
        n_rows, n_classes, n_teachers, k = SPARSE_SHAPE
        self.case = SparseCase(n_teachers, n_rows, n_classes, k, dtype)
        self.args = self.case.arrays()
        self.op.numba_kd(*self.args)

    def time_call(self, operation, dtype):
        self.op.numba_kd(*self.args)

    def peakmem_call(self, operation, dtype):
        self.op.numba_kd(*self.args)

    def track_roofline_percent(self, operation, dtype):
        call = lambda: self.op.numba_kd(*self.args)  # noqa: E731
        return 100.0 * paired_with_copy(call, self.op.bytes_moved(self.case), 5)[2]

    track_roofline_percent.unit = "%"

    def track_max_relative_error(self, operation, dtype):
        student, (indices, logprobs), labels, weights = self.args
        head = (student[:32], (indices[:, :32], logprobs[:, :32]), labels[:32], weights)
        return relative_error(self.op.numba_kd(*head), self.op.numpy(*head))

    track_max_relative_error.unit = "relative"
