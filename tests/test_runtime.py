"""Process-level safety: concurrent threads, fork, cold compiles, an unwritable install.

Each scenario runs in a fresh interpreter, because the threading layer and the
kernel cache are chosen once per process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import check_recompiles_a_damaged_cache

import numba_kd

# Inputs and one call of every public operation; `results()` returns them as
# bytes so that runs can be compared bit for bit.
WORKLOAD = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import numba_kd
    from numba_kd import _runtime

    rng = np.random.default_rng(7)
    CASES = []
    for dtype, (b, c), k in [(np.float32, (96, 33), 3), (np.float64, (40, 130), 2)]:
        student = rng.normal(size=(b, c)).astype(dtype)
        teachers = [rng.normal(size=(b, c)).astype(dtype) for _ in range(k)]
        labels = rng.integers(0, c, size=b)
        CASES.append((numba_kd.EnsembleDistiller(np.arange(1.0, k + 1), 2.0), student, teachers, labels))
    single = numba_kd.DistillationLoss(3.0, 0.25)

    def calls():
        out = []
        for d, s, t, y in CASES:
            out += [
                lambda d=d, t=t: d.combine_teachers(t),
                lambda d=d, t=t: d.combine_via_probabilities(t),
                lambda d=d, s=s, t=t, y=y: d.distillation_loss(s, t, y, 0.5),
                lambda d=d, s=s, t=t, y=y: d.loss_and_grad(s, t, y, 0.5),
                lambda d=d, s=s, t=t, y=y: d.distillation_loss(s, t, y, 0.5, divergence="jsd"),
                lambda s=s, t=t, y=y: single.forward(s, t[0], y),
            ]
        return out

    def as_bytes(result):
        if isinstance(result, tuple):
            return b"".join(as_bytes(r) for r in result)
        return np.asarray(result).tobytes()

    def results():
        return [as_bytes(f()) for f in calls()]
    """
)

THREADS = WORKLOAD + textwrap.dedent(
    """
    import threading
    expected = results()
    mismatches, errors = [], []

    def worker(seed):
        fs = calls()
        order = np.random.default_rng(seed).integers(0, len(fs), size=50)
        for i in order:
            try:
                if as_bytes(fs[i]()) != expected[i]:
                    mismatches.append(int(i))
            except Exception as exc:
                errors.append(repr(exc))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    print(json.dumps({"layer": _runtime.threading_layer(), "mismatches": mismatches, "errors": errors}))
    """
)

FORK = WORKLOAD + textwrap.dedent(
    """
    import multiprocessing
    expected = results()
    parent_layer = _runtime.threading_layer()

    def child(queue):
        queue.put((_runtime.threading_layer(), results() == expected))

    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=child, args=(queue,))
    proc.start()
    child_layer, same = queue.get(timeout=600)
    proc.join()
    print(json.dumps({"parent": parent_layer, "child": child_layer, "same": same, "exitcode": proc.exitcode}))
    """
)

# Waits for a forked child; one that is still running after 60 s counts as hung.
CHILD_EXIT_CODE = textwrap.dedent(
    """
    import os, signal, time

    def child_exit_code(pid, seconds=60):
        # The child's exit code, or None (after killing it) if it runs past ``seconds``.
        deadline = time.monotonic() + seconds
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return None
            time.sleep(0.005)
        return os.waitstatus_to_exitcode(done[1])
    """
)

FORK_WHILE_BUSY = CHILD_EXIT_CODE + textwrap.dedent(
    """
    import json, threading
    import numpy as np
    import numba_kd
    from numba_kd import _runtime

    rng = np.random.default_rng(11)
    # Big enough for the parallel builds (more than SERIAL_MAX_ELEMENTS inputs).
    s = rng.normal(size=(128, 300)).astype(np.float32)
    t = [rng.normal(size=(128, 300)).astype(np.float32) for _ in range(3)]
    y = rng.integers(0, 300, size=128)
    d = numba_kd.EnsembleDistiller([1.0, 2.0, 3.0], 2.0)
    expected = d.distillation_loss(s, t, y, 0.5)
    stop = threading.Event()

    def busy():
        while not stop.is_set():
            d.distillation_loss(s, t, y, 0.5)

    threads = [threading.Thread(target=busy) for _ in range(3)]
    for th in threads:
        th.start()
    hung, wrong, modes = 0, 0, set()
    for _ in range(200):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            ok = d.distillation_loss(s, t, y, 0.5) == expected
            os.write(write, _runtime.launch_mode().encode())
            os._exit(0 if ok else 3)
        os.close(write)
        code = child_exit_code(pid)
        if code is None:
            hung += 1
        elif code != 0:
            wrong += 1
        modes.add(os.read(read, 16).decode())
        os.close(read)
    stop.set()
    for th in threads:
        th.join()
    print(json.dumps({"hung": hung, "wrong": wrong, "modes": sorted(modes)}))
    """
)

FORK_WHILE_ANOTHER_THREAD_STARTS_THE_LAYER = CHILD_EXIT_CODE + textwrap.dedent(
    """
    import json, threading
    import numpy as np
    import numba_kd
    from numba.np.ufunc import parallel
    from numba_kd import _runtime

    rng = np.random.default_rng(3)
    s = rng.normal(size=(128, 300)).astype(np.float32)
    t = [rng.normal(size=(128, 300)).astype(np.float32)]
    y = rng.integers(0, 300, size=128)
    d = numba_kd.EnsembleDistiller([1.0], 2.0)
    expected = d.distillation_loss(s, t, y, 0.5)
    holding, release = threading.Event(), threading.Event()

    def asks_for_its_threads():
        # What a thread inside numba.get_num_threads looks like at the fork: it holds
        # numba's layer-start lock.
        _runtime.num_threads()
        with parallel._backend_init_thread_lock:
            holding.set()
            release.wait()

    thread = threading.Thread(target=asks_for_its_threads)
    thread.start()
    holding.wait()
    pid = os.fork()
    if pid == 0:
        os._exit(0 if d.distillation_loss(s, t, y, 0.5) == expected else 3)
    code = child_exit_code(pid)
    release.set()
    thread.join()
    print(json.dumps({"hung": code is None, "exit": code}))
    """
)

ONE_LOSS = textwrap.dedent(
    """
    import json
    import numpy as np
    import numba_kd
    from numba_kd import _runtime

    rng = np.random.default_rng(3)
    s, t1, t2 = (rng.normal(size=(64, 50)).astype(np.float32) for _ in range(3))
    y = rng.integers(0, 50, size=64)
    loss = numba_kd.EnsembleDistiller([1.0, 3.0], 2.0).distillation_loss(s, [t1, t2], y, 0.5)
    print(json.dumps({"loss": loss, "disk_cache": _runtime.DISK_CACHE, "package": numba_kd.__file__}))
    """
)


def _env(**changes: str | None) -> dict[str, str]:
    env = dict(os.environ)
    for name, value in changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def _run(code: str, env: dict[str, str], cwd: Path | None = None) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, f"exit code {proc.returncode}\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _layer(chosen: str | None) -> str | None:
    """The layer numba_kd's kernels run on in a fresh process with NUMBA_THREADING_LAYER
    set to ``chosen`` (unset for None); None when that process fails."""
    code = "import numba_kd; from numba_kd import _runtime; print(_runtime.threading_layer())"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=_env(NUMBA_THREADING_LAYER=chosen),
        capture_output=True,
        text=True,
        timeout=300,
    )
    return proc.stdout.strip() if proc.returncode == 0 else None


def _tbb_loadable() -> bool:
    return _layer("tbb") == "tbb"


@pytest.mark.parametrize("layer", ["workqueue", "omp", "tbb", None])
def test_eight_threads_match_single_threaded_results(layer):
    """8 threads x 50 calls, bitwise equal to one thread's results, under each layer
    (None: the layer a default installation picks)."""
    if layer == "tbb" and not _tbb_loadable():
        pytest.skip("numba cannot load the tbb threading layer here")
    out = _run(THREADS, _env(NUMBA_THREADING_LAYER=layer))
    assert out["errors"] == []
    assert out["mismatches"] == []
    if layer is not None:
        assert out["layer"] == layer


@pytest.mark.skipif(sys.platform != "linux" or os.uname().machine != "x86_64", reason="tbb wheel platforms")
def test_default_installation_uses_tbb():
    """pip installs tbb with numba_kd on Linux x86-64; numba_kd makes numba find it."""
    assert _layer(None) == "tbb"


def test_explicit_layer_is_respected():
    assert _layer("workqueue") == "workqueue"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
@pytest.mark.parametrize("layer", [None, "omp", "workqueue"])
def test_forked_child_computes_the_same_results(layer):
    """A child forked after its parent ran kernels gets the parent's results.

    Under GNU OpenMP, which kills such a child at its first parallel launch, the
    child runs serial builds of the kernels."""
    out = _run(FORK, _env(NUMBA_THREADING_LAYER=layer))
    assert out == {**out, "same": True, "exitcode": 0}
    if layer == "omp":
        assert out["parent"] == "omp"
        assert out["child"] in ("serial", "omp")  # "omp" with a fork-safe OpenMP runtime
    else:
        # One thread used the layer, so the child keeps its parallel kernels.
        assert out["child"] == out["parent"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
@pytest.mark.parametrize("layer", [None, "workqueue"])
def test_forks_while_other_threads_run_kernels(layer):
    """200 forks while 3 threads run parallel kernels: every child finishes within
    60 s with its parent's result (under tbb such a child could hang at its first
    parallel launch), because it runs serial builds."""
    if layer is None and not _tbb_loadable():
        pytest.skip("numba cannot load the tbb threading layer here")
    # Python warns that forking a process with threads may deadlock: that is the point.
    env = _env(NUMBA_THREADING_LAYER=layer, PYTHONWARNINGS="ignore::DeprecationWarning")
    out = _run(FORK_WHILE_BUSY, env)
    assert (out["hung"], out["wrong"]) == (0, 0)
    assert out["modes"] == ["serial"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_fork_while_another_thread_holds_numbas_layer_lock():
    """numba.get_num_threads takes numba's layer-start locks on every call; a child
    forked while another thread held one would wait for its copy forever.  Such a
    child runs serially and never asks for them."""
    from numba.np.ufunc import parallel

    if not hasattr(parallel, "_backend_init_thread_lock"):
        pytest.skip("this numba has no _backend_init_thread_lock")
    out = _run(FORK_WHILE_ANOTHER_THREAD_STARTS_THE_LAYER, _env(PYTHONWARNINGS="ignore::DeprecationWarning"))
    assert out == {"hung": False, "exit": 0}


def test_two_cold_compiles_at_once(tmp_path):
    """Two processes compiling into the same empty cache directory at the same time."""
    env = _env(NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    procs = [
        subprocess.Popen([sys.executable, "-c", ONE_LOSS], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    first, second = (json.loads(o.strip().splitlines()[-1]) for o in outputs)
    assert first["loss"] == second["loss"]
    assert any((tmp_path / "cache").rglob("*.nbi")), "the kernels were not cached on disk"
    # A third process loads what they wrote and agrees.
    assert _run(ONE_LOSS, env)["loss"] == first["loss"]


def _copy_of_package(root: Path) -> Path:
    """numba_kd copied under ``root``, without its caches."""
    source = Path(numba_kd.__file__).parent
    target = root / "numba_kd"
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
    return target


def _block_directory(path: Path) -> None:
    """Make ``path`` impossible to create as a directory, whoever runs (root included)."""
    path.write_text("not a directory")


@pytest.mark.parametrize("user_cache_writable", [True, False])
def test_unwritable_installation_directory(tmp_path, user_cache_writable):
    """No cache next to the installed sources: numba's user-wide cache is used, and
    with that unwritable too, kernels compile in memory instead of failing at import."""
    package = _copy_of_package(tmp_path / "site")
    for folder in [package, *(p for p in package.iterdir() if p.is_dir())]:
        _block_directory(folder / "__pycache__")
    xdg = tmp_path / "xdg"
    if user_cache_writable:
        xdg.mkdir()
    else:
        _block_directory(xdg)
    env = _env(
        NUMBA_CACHE_DIR=None,
        XDG_CACHE_HOME=str(xdg),
        HOME=str(tmp_path / "home"),
        PYTHONPATH=str(package.parent),
    )
    out = _run(ONE_LOSS, env, cwd=tmp_path)
    assert Path(out["package"]).parent == package
    assert out["disk_cache"] is user_cache_writable
    assert out["loss"] == _run(ONE_LOSS, _env())["loss"]
    if user_cache_writable:
        assert any(xdg.rglob("*.nbi"))


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores permissions")
def test_read_only_installation_directory(tmp_path):
    """The same with real permissions: a read-only copy of the package."""
    package = _copy_of_package(tmp_path / "site")
    for path in [package, *package.rglob("*")]:
        path.chmod(path.stat().st_mode & ~0o222)
    try:
        env = _env(NUMBA_CACHE_DIR=None, XDG_CACHE_HOME=str(tmp_path / "xdg"), PYTHONPATH=str(package.parent))
        out = _run(ONE_LOSS, env, cwd=tmp_path)
        assert Path(out["package"]).parent == package
        assert out["loss"] == _run(ONE_LOSS, _env())["loss"]
    finally:
        for path in [package, *package.rglob("*")]:
            path.chmod(path.stat().st_mode | 0o200)


CORRUPT_CACHE_CALL = """
import numpy as np, numba_kd as kd
rng = np.random.default_rng(0)
student = rng.normal(size=(8, 30))
teachers = [rng.normal(size=(8, 30)) for _ in range(2)]
labels = rng.integers(0, 30, size=8)
print(repr(kd.EnsembleDistiller([1.0, 2.0], 2.0).distillation_loss(student, teachers, labels, 0.5)))
"""


@pytest.mark.parametrize("damage", ["garbage index", "truncated data"])
def test_a_corrupt_numba_cache_is_recompiled_with_one_warning(tmp_path, damage):
    """A garbage .nbi or a truncated .nbc in numba's cache once made every later call fail
    (ValueError, UnpicklingError): now the kernels compile in memory, with one warning
    that names the cache directory, and give the same result."""
    files, stderr = check_recompiles_a_damaged_cache(
        CORRUPT_CACHE_CALL, tmp_path / "cache", "*general_rows_serial-*", damage
    )
    assert str(files[0].parent) in stderr


CORRUPT_CUDA_CACHE = """
import json, os, warnings
import numba, numpy as np
from numba import cuda
from numba_kd import _runtime
from numba_kd.cuda import backend

kernels = backend.kernels_for(np.dtype(np.float32))
cache = kernels.scale_rows._cache
os.makedirs(cache._cache_path, exist_ok=True)
with open(cache._cache_file._index_path, "wb") as f:
    f.write(b"garbage\\n")
if not cuda.is_available():
    # The cache key holds the device's compute capability; without a GPU, pretend one.
    kernels.scale_rows.targetctx.codegen().magic_tuple = lambda: ("nvptx64-nvidia-cuda", (9, 0), "")
vector = numba.float32[::1]
signature = (vector, vector, numba.float32, numba.float32, vector, vector, vector)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    loaded = _runtime.compile_despite_a_broken_cache(
        lambda: kernels.scale_rows._cache.load_overload(signature, kernels.scale_rows.targetctx), kernels
    )
print(json.dumps({
    "loaded": loaded is not None,
    "warnings": [str(w.message) for w in caught],
    "directory": cache._cache_path,
    "caches": sorted({type(d._cache).__name__ for d in vars(kernels).values()}),
}))
"""


def test_a_corrupt_cuda_cache_turns_the_cuda_disk_cache_off(tmp_path):
    """The CUDA kernels' cache is read through the same guard as the CPU kernels': a
    garbage .nbi gives one warning naming its directory, and every CUDA kernel of
    that dtype drops its disk cache.  (Compiling in memory afterwards needs a GPU:
    tests/cuda/test_cuda_cache.py does that on a real device.)"""
    pytest.importorskip("numba.cuda")
    out = _run(CORRUPT_CUDA_CACHE, _env(NUMBA_CACHE_DIR=str(tmp_path / "cache"), NUMBA_ENABLE_CUDASIM=None))
    assert out["loaded"] is False
    assert len(out["warnings"]) == 1
    assert "is unreadable" in out["warnings"][0] and out["directory"] in out["warnings"][0]
    assert out["caches"] == ["NullCache"]
