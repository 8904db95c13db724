"""numba_kd: fused multi-teacher knowledge-distillation losses compiled with Numba.

``import numba_kd`` compiles nothing; each kernel is compiled (or loaded from
numba's on-disk cache) on its first call.
"""

from numba_kd import _runtime
from numba_kd._options import LossComponents
from numba_kd.distiller import DistillationLoss, EnsembleDistiller
from numba_kd.sparse import TopK, read_topk

__all__ = ["DistillationLoss", "EnsembleDistiller", "LossComponents", "TopK", "__version__", "read_topk"]

__version__ = "0.1.0"

# Makes pip's libtbb loadable so that numba's default threading layer is the
# thread- and fork-safe tbb (see numba_kd._runtime).
_runtime.preload_tbb()
