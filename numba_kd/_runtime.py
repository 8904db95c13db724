"""Process-level safety of the CPU kernels: threading layer, fork, on-disk cache.

numba runs ``parallel=True`` kernels on one of three threading layers, picked
at the first parallel launch in the process (``NUMBA_THREADING_LAYER``, default
priority tbb > omp > workqueue):

- ``tbb`` is safe with concurrent Python threads.  pip's
  ``tbb`` wheel (a dependency of numba_kd where one exists) installs
  ``libtbb`` into the environment's ``lib/``, which the loader does not search;
  :func:`preload_tbb` loads it by its full path at import, so that numba's
  default choice finds it.  Nothing is overridden: a user's
  ``NUMBA_THREADING_LAYER`` or ``numba.config`` setting still decides.
- ``workqueue`` aborts the process when two threads launch kernels at once:
  under it numba_kd serializes its launches behind a lock.
- GNU OpenMP (``omp``) kills a forked child that launches a kernel after its
  parent did: in such a child numba_kd runs serial builds of its kernels.

The thread pools do not survive every ``fork()`` either.  numba's ``tbb`` layer
shuts its pool down before a fork, and restarts it in the child, only when the
forking thread is the one that started the layer and no other thread has
launched kernels; otherwise it prints
"Unable to join threads to shut down before fork()" and the child can hang
forever at its first parallel launch.  So a child forked after another
thread started the layer, asked it for its thread count or launched kernels
runs serial builds too, whatever the layer, and never calls into numba's
threading layer, whose start-up locks another thread may have held at the fork.

Kernels are cached on disk (``cache=True``) when numba finds a writable place
(next to the source, then the user-wide cache directory, or ``NUMBA_CACHE_DIR``);
with none, for example a read-only installation and home directory, they are
compiled in memory in each process instead of failing at import.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import types
import warnings
from collections.abc import Callable
from importlib import metadata
from typing import Any

import numba

_TBB_LIBRARY = {"linux": "libtbb.so.12", "win32": "tbb12.dll", "darwin": "libtbb.12.dylib"}

_tbb_handle: ctypes.CDLL | None = None


def preload_tbb() -> bool:
    """Load pip's ``libtbb`` so that numba's ``tbb`` layer can be used; True on success.

    Does nothing when the user picked another layer explicitly.
    """
    global _tbb_handle
    if _tbb_handle is not None:
        return True
    chosen = str(numba.config.THREADING_LAYER).lower()
    if chosen not in ("default", "tbb", "safe"):
        return False
    name = _TBB_LIBRARY.get(sys.platform)
    try:
        files = metadata.files("tbb") or []
    except metadata.PackageNotFoundError:
        return False
    for file in files:
        if file.name == name:
            path = file.locate()
            try:
                _tbb_handle = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
            except OSError:
                return False
            return True
    return False


# ---------------------------------------------------------------- launch modes

PARALLEL, LOCKED, SERIAL = "parallel", "locked", "serial"

_launch_lock = threading.Lock()
_mode: str | None = None
_forked_after_launch = False


def _layer_started() -> bool:
    from numba.np.ufunc import parallel

    return bool(getattr(parallel, "_is_initialized", True))


# The threads that started numba's threading layer, asked it for its thread count
# or launched parallel kernels through numba_kd (_SOMEONE_ELSE: the layer was
# started outside numba_kd); whether, at the fork under way, any of them is not
# the forking thread; and whether this process was forked so.
_SOMEONE_ELSE = -1
_layer_users: set[int] = set()
_others_use_the_layer = False
_forked_with_other_layer_users = False


def _before_fork() -> None:
    global _others_use_the_layer
    _others_use_the_layer = bool(_layer_users - {threading.get_ident()})


def _after_fork_in_child() -> None:
    global _mode, _forked_after_launch, _forked_with_other_layer_users, _launch_lock
    _forked_after_launch = _forked_after_launch or _layer_started()
    _forked_with_other_layer_users = _forked_with_other_layer_users or _others_use_the_layer
    _layer_users.clear()
    _mode = None
    # A lock held by another thread at fork time would stay held forever.
    _launch_lock = threading.Lock()


os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)


def launch_parallel(kernel: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    """``kernel(*args)`` for a parallel build, noting the launching thread for
    :func:`launch_mode`'s fork rule; under the launch lock when the layer is
    ``workqueue``."""
    _layer_users.add(threading.get_ident())
    if _mode == LOCKED:
        with _launch_lock:
            return kernel(*args)
    return kernel(*args)


def _gnu_openmp() -> bool:
    from numba.np.ufunc import omppool

    return str(getattr(omppool, "openmp_vendor", "GNU")) == "GNU"


def launch_mode() -> str:
    """How CPU kernels run in this process: ``parallel``, ``locked`` (one launch at
    a time: the layer is ``workqueue``) or ``serial`` (a forked child of a process
    that used GNU OpenMP, or in which a thread other than the forking one had
    started the threading layer or launched parallel kernels)."""
    global _mode
    mode = _mode
    if mode is not None:
        return mode
    with _launch_lock:
        if _mode is None:
            if _forked_with_other_layer_users:
                serial = True
            elif _forked_after_launch and str(numba.config.THREADING_LAYER).lower() in ("default", "omp"):
                # The layer the parent chose is the one the child inherits.
                layer = numba.threading_layer() if _layer_started() else "omp"
                serial = layer == "omp" and _gnu_openmp()
            else:
                serial = False
            if serial:
                _mode = SERIAL
            else:
                _layer_users.add(_SOMEONE_ELSE if _layer_started() else threading.get_ident())
                numba.get_num_threads()  # starts the threading layer, once, under the lock
                _mode = LOCKED if numba.threading_layer() == "workqueue" else PARALLEL
        return _mode


def num_threads() -> int:
    """The number of threads numba's parallel kernels use in this thread, starting the
    threading layer through :func:`launch_mode`; 1 where the kernels run serially.

    ``numba.get_num_threads`` takes numba's layer-start locks on every call: the
    thread is noted as a user of the layer first, so that a fork while it holds
    them gives a child that runs serially and never asks for them (it would wait
    for the copies, locked forever)."""
    if launch_mode() == SERIAL:
        return 1
    _layer_users.add(threading.get_ident())
    return numba.get_num_threads()


def threading_layer() -> str:
    """The numba threading layer numba_kd's CPU kernels run on (starting it if needed),
    or ``"serial"`` in a forked child of a GNU OpenMP process."""
    return "serial" if launch_mode() == SERIAL else numba.threading_layer()


_SERIAL_TWINS: dict[Any, Any] = {}


def serial_dispatcher(kernel: Any) -> Any:
    """The same kernel compiled without ``parallel`` (``prange`` runs as ``range``).

    The twin is a copy of the kernel's function under another name, so that
    numba's disk cache keeps its specializations apart from the parallel ones.
    """
    twin = _SERIAL_TWINS.get(kernel)
    if twin is None:
        function = kernel.py_func
        copy = types.FunctionType(
            function.__code__, function.__globals__, function.__name__ + "_serial",
            function.__defaults__, function.__closure__,
        )  # fmt: skip
        copy.__qualname__ = function.__qualname__ + "_serial"
        copy.__module__ = function.__module__
        copy.__dict__.update(function.__dict__)
        options = {**kernel.targetoptions, "parallel": False}
        options.pop("nopython", None)  # implied by njit
        twin = _SERIAL_TWINS[kernel] = numba.njit(cache=DISK_CACHE, **options)(copy)
    return twin


# ---------------------------------------------------------------- on-disk cache


def _cache_probe() -> int:
    return 0


def _disk_cache_available() -> bool:
    """Whether numba can find a cache directory for this package's kernels.

    numba raises ``RuntimeError`` when a ``cache=True`` function has nowhere to
    write; the probe lives next to the kernels, so it sees the same places.
    """
    try:
        numba.njit(cache=True)(_cache_probe)
    except RuntimeError:
        return False
    return True


DISK_CACHE = _disk_cache_available()


def _from_the_disk_cache(exc: BaseException) -> bool:
    """Whether ``exc`` was raised while numba (or numba-cuda) read its on-disk cache."""
    tb = exc.__traceback__
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename.replace("\\", "/")
        if filename.endswith(("numba/core/caching.py", "numba/cuda/core/caching.py")):
            return True
        tb = tb.tb_next
    return False


def compile_despite_a_broken_cache(compile_: Callable[[], Any], kernels: Any) -> Any:
    """``compile_()``; if numba's on-disk cache is unreadable (a truncated ``.nbc``, a
    garbage ``.nbi``), turn off the disk cache of the dispatchers in ``kernels`` (a
    module or namespace), warn once naming the cache directory, and compile again
    in memory."""
    try:
        return compile_()
    except Exception as exc:
        if not _from_the_disk_cache(exc):
            raise
        directories = sorted(_disable_disk_caches(kernels))
        warnings.warn(
            f"numba_kd: numba's cache in {', '.join(directories) or 'its cache directory'} is unreadable "
            f"({type(exc).__name__}: {exc}); this process compiles the kernels in memory. Delete the "
            "cache files there (or set NUMBA_CACHE_DIR) to cache them again.",
            RuntimeWarning,
            stacklevel=3,
        )
        return compile_()


def _disable_disk_caches(kernels: Any) -> set[str]:
    """Turn off the on-disk cache of every numba or numba-cuda dispatcher in ``kernels``
    (and the serial twins); returns the cache directories they used."""
    from numba.core.caching import NullCache

    directories = set()
    for dispatcher in [*vars(kernels).values(), *_SERIAL_TWINS.values()]:
        cache = getattr(dispatcher, "_cache", None)
        if not hasattr(cache, "load_overload"):
            continue
        path = getattr(cache, "_cache_path", None)
        if path:
            directories.add(str(path))
        dispatcher._cache = NullCache()  # loads and saves nothing; numba-cuda's dispatchers take it too
    return directories
