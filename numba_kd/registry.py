"""One registry of the public operations, their options and their peers.

Each ``Operation`` is one benchmark row: a public operation with one set of loss
options.  It knows how to run numba_kd, the float64 NumPy reference, eager torch,
``torch.compile`` and ``jax.jit`` on one ``Case`` (the last three only when
installed), and how many bytes the operation must move at the least.  The test
suite takes its oracles from here, and ``python -m numba_kd bench`` and the asv
suite take their rows from here, so all three compare the same things.

The peers compute the same formula in the input precision, written with their
own array operations as a user of that library would: ``torch.compile``
(inductor) and ``jax.jit`` (XLA) of that code are the compilers a user would pick
instead of numba_kd.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from numba_kd import reference

TEMPERATURE = 2.0
ALPHA = 0.7
IGNORE_INDEX = -100
# Loss options, one benchmark row each (for distillation_loss and loss_and_grad).
LOSS_OPTIONS: dict[str, dict[str, Any]] = {
    "": {},
    "reverse_kl": {"divergence": "reverse_kl"},
    "jsd": {"divergence": "jsd", "beta": 0.5},
    "tvd": {"divergence": "tvd"},
    "skew_forward_kl": {"divergence": "skew_forward_kl", "skew": 0.1},
    "skew_reverse_kl": {"divergence": "skew_reverse_kl", "skew": 0.1},
    "probs": {"combine": "probs"},
    "confidence": {"teacher_weighting": "confidence"},
    "entropy": {"teacher_weighting": "entropy"},
    "ignore_index": {"ignore_index": IGNORE_INDEX},
}


@dataclass(frozen=True)
class Tolerance:
    """How far numba_kd's results may lie from the float64 reference on the same inputs.

    Parameters
    ----------
    loss : float
        Relative error of a loss or of its soft and hard parts. Comparisons add
        an absolute floor of ``loss`` times the logit scale (1 + the largest
        |logit|): a loss is a difference of log-sum-exps of that size and can be
        close to 0.
    array : float
        Absolute error of an entry of a combined-logits array, per unit of the
        logit scale.
    grad : float
        Absolute error of a gradient entry, per unit of the reference
        gradient's largest magnitude (or absolute, for gradients whose entries
        are at most 1).
    peer : float
        Relative error against an independent implementation that computes in
        the input precision: torch and jax on the CPU, the CPU kernels for CUDA.
    """

    loss: float
    array: float
    grad: float
    peer: float


#: The tolerances of every comparison in the test suite, per (dtype, target).
#: float32 kernels compute exponentials and logarithms in float32 (about 1e-7
#: relative each) and sum in float64; the CUDA float32 kernels use the GPU's
#: exp and log, whose errors are a few ulps.
TOLERANCES: dict[tuple[str, str], Tolerance] = {
    ("float64", "cpu"): Tolerance(loss=1e-12, array=1e-12, grad=1e-12, peer=1e-11),
    ("float32", "cpu"): Tolerance(loss=1e-6, array=1e-5, grad=1e-6, peer=1e-5),
    ("float64", "cuda"): Tolerance(loss=1e-12, array=1e-12, grad=1e-11, peer=1e-11),
    ("float32", "cuda"): Tolerance(loss=1e-5, array=1e-5, grad=1e-4, peer=1e-5),
    # 16-bit inputs compute as float32; losses come back as floats, gradients and
    # combines in the input dtype, rounded to nearest: 2^-11 (float16) and 2^-8
    # (bfloat16) relative, plus the float32 arithmetic's error.
    ("float16", "cpu"): Tolerance(loss=1e-6, array=1e-3, grad=1e-3, peer=1e-3),
    ("bfloat16", "cpu"): Tolerance(loss=1e-6, array=5e-3, grad=5e-3, peer=5e-3),
}


def tolerance(dtype: Any, target: str = "cpu") -> Tolerance:
    """The tolerances of results of ``dtype`` computed on ``target``.

    Parameters
    ----------
    dtype : numpy dtype or str, one of {"float32", "float64"}, or float16 and bfloat16 on the CPU
        The dtype of the inputs (and of array results).
    target : str, one of {"cpu", "cuda"}, default "cpu"
        Where the kernels ran.

    Returns
    -------
    Tolerance
        The entry of TOLERANCES.

    Raises
    ------
    KeyError
        A dtype or target without an entry.

    Examples
    --------
    >>> from numba_kd import registry
    >>> registry.tolerance("float32").loss
    1e-06
    """
    return TOLERANCES[(logit_dtype(dtype).name, target)]


def logit_dtype(dtype: Any) -> np.dtype:
    """The NumPy dtype of a logits dtype name; "bfloat16" is ml_dtypes' type.

    Parameters
    ----------
    dtype : numpy dtype or str
        "float16", "bfloat16", "float32", "float64" or a NumPy dtype.

    Returns
    -------
    numpy.dtype
        The dtype.

    Raises
    ------
    TypeError
        "bfloat16" without ml_dtypes installed, or a name NumPy does not know.
    """
    if isinstance(dtype, str) and dtype == "bfloat16":
        try:
            import ml_dtypes
        except ImportError:
            raise TypeError("bfloat16 logits need ml_dtypes (pip install ml_dtypes)") from None
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(dtype)


def synthetic_batch(
    rng: np.random.Generator,
    n_teachers: int,
    rows: int,
    classes: int,
    dtype: Any = "float32",
    spread: float = 3.0,
    independent: bool = False,
) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """Synthetic logits and labels: the one data generator of the tests and benchmarks.

    Standard normal draws are made in the working precision (float32 for
    float32 and float16 results, float64 otherwise), so that large batches
    need no float64 temporaries.

    Parameters
    ----------
    rng : numpy.random.Generator
        The source of the draws.
    n_teachers : int
        K, the number of teachers.
    rows : int
        B, the number of rows.
    classes : int
        C, the number of classes.
    dtype : numpy dtype or str, default "float32"
        The dtype of the logits.
    spread : float, default 3.0
        The scale of the logits.
    independent : bool, default False
        False: teachers that broadly agree and a noisier student, from a shared
        signal ``g = spread * N(0, 1)``: teacher ``g + N(0, 1)``, student
        ``g / 2 + 2 N(0, 1)``. True: every array is ``spread * N(0, 1)`` on its
        own (teachers that disagree as much as random logits do).

    Returns
    -------
    student : numpy.ndarray, shape [B, C]
        The student's logits.
    teachers : list of K numpy.ndarray, each [B, C]
        The teachers' logits.
    labels : numpy.ndarray of int64, shape [B]
        Class indices in [0, C).

    Examples
    --------
    >>> import numpy as np
    >>> from numba_kd import registry
    >>> s, t, y = registry.synthetic_batch(np.random.default_rng(0), 2, 4, 5, "float64")
    >>> s.shape, len(t), t[0].dtype, y.shape
    ((4, 5), 2, dtype('float64'), (4,))
    """
    shape = (rows, classes)
    dtype = logit_dtype(dtype)
    work = np.dtype(np.float64) if dtype.itemsize > 4 else np.dtype(np.float32)
    scale = work.type(spread)

    def normal() -> np.ndarray:
        return rng.standard_normal(shape, dtype=work)

    if independent:
        arrays = []
        for _ in range(n_teachers + 1):
            x = normal()
            x *= scale
            arrays.append(x.astype(dtype, copy=False))
        student, teachers = arrays[0], arrays[1:]
    else:
        signal = normal()
        signal *= scale
        teachers = [(signal + normal()).astype(dtype, copy=False) for _ in range(n_teachers)]
        student = (work.type(0.5) * signal + work.type(2.0) * normal()).astype(dtype, copy=False)
    labels = rng.integers(0, classes, size=rows)
    return student, teachers, labels


@dataclass(frozen=True)
class Case:
    """Synthetic logits of one benchmark or test shape.

    K teachers that broadly agree (a shared signal plus noise), a noisier
    student, uniformly drawn labels (every 8th of them IGNORE_INDEX when
    ``arrays(ignored=True)``) and the weights 1, 2, ..., K. The same fields
    give the same arrays.

    Parameters
    ----------
    n_teachers : int
        K, the number of teachers.
    rows : int
        B, the number of rows.
    classes : int
        C, the number of classes.
    dtype : {"float32", "float64", "float16", "bfloat16"}, default "float32"
        The logits' dtype.
    seed : int, default 0
        The seed of the random generator.
    """

    n_teachers: int
    rows: int
    classes: int
    dtype: str = "float32"
    seed: int = 0

    def arrays(self, ignored: bool = False) -> tuple[np.ndarray, list[np.ndarray], np.ndarray, np.ndarray]:
        """The arguments of an operation: ``(student, teachers, labels, weights)``.

        Parameters
        ----------
        ignored : bool, default False
            Set the labels of rows 0, 8, 16, ... to IGNORE_INDEX.

        Returns
        -------
        student : numpy.ndarray, shape [B, C]
            The student's logits, in the Case's dtype.
        teachers : list of K numpy.ndarray, each [B, C]
            The teachers' logits, in the Case's dtype.
        labels : numpy.ndarray of int64, shape [B]
            Class indices in [0, C), or IGNORE_INDEX.
        weights : numpy.ndarray of float64, shape [K]
            1, 2, ..., K (not normalized).

        Raises
        ------
        TypeError
            A dtype that NumPy does not know.
        """
        rng = np.random.default_rng(self.seed)
        student, teachers, labels = synthetic_batch(rng, self.n_teachers, self.rows, self.classes, self.dtype)
        if ignored:
            labels[::8] = IGNORE_INDEX
        weights = np.arange(1.0, self.n_teachers + 1.0)
        return student, teachers, labels, weights


Args = tuple[np.ndarray, list[np.ndarray], np.ndarray, np.ndarray]


@dataclass(frozen=True)
class Operation:
    """One benchmark row: a public operation with one set of options.

    ``numba_kd``, ``numpy`` and ``torch`` are called with the arrays of a Case
    and return the result. ``torch_compile`` and ``jax_jit`` are called with
    them too and return a zero-argument callable that runs the compiled peer on
    inputs converted once, so that the conversions are not timed.

    Parameters
    ----------
    name : str
        The row's name: the operation, then its option in brackets, e.g.
        ``"distillation_loss[jsd]"``.
    options : dict of str to Any
        The keyword options of the call (``{"eps": ...}`` for
        combine_via_probabilities).
    arrays_moved : callable, int -> int
        The number of [B, C] arrays the operation must read or write at the
        least, given K.
    numba_kd : callable
        ``numba_kd(student, teachers, labels, weights)``: the numba_kd call.
        The loss_and_grad rows return the gradient only.
    numpy : callable
        The same call on the float64 NumPy reference.
    torch : callable or None, default None
        The same call in eager torch, in the input dtype.
    torch_compile : callable or None, default None
        Builds the ``torch.compile`` peer: takes the Case's arrays, returns a
        zero-argument callable.
    jax_jit : callable or None, default None
        Builds the ``jax.jit`` peer, likewise.
    scalar : bool, default False
        Whether the result is one loss value rather than an array.
    notes : str, default ""
        Free text about the row.
    """

    name: str
    options: dict[str, Any]
    # Number of [B, C] arrays the operation must move (read or written) at the least.
    arrays_moved: Callable[[int], int]
    numba_kd: Callable[..., Any]
    numpy: Callable[..., Any]
    torch: Callable[..., Any] | None = None
    torch_compile: Callable[..., Callable[[], Any]] | None = None
    jax_jit: Callable[..., Callable[[], Any]] | None = None
    scalar: bool = False
    notes: str = field(default="")

    @property
    def ignored(self) -> bool:
        """Whether the Case's labels carry ignored rows for this row."""
        return "ignore_index" in self.options

    def bytes_moved(self, case: Case) -> int:
        """The bytes the operation must move at the least on one Case.

        Parameters
        ----------
        case : Case or SparseCase
            The shape, number of teachers and dtype.

        Returns
        -------
        int
            ``arrays_moved(K) * B * C * itemsize``.
        """
        return (
            self.arrays_moved(case.n_teachers) * case.rows * case.classes * logit_dtype(case.dtype).itemsize
        )


def _distiller(weights):
    import numba_kd as kd

    return kd.EnsembleDistiller(weights, temperature=TEMPERATURE)


# ---------------------------------------------------------------- numba_kd and NumPy


def _kd_loss(options):
    def run(student, teachers, labels, weights):
        return _distiller(weights).distillation_loss(student, teachers, labels, ALPHA, **options)

    return run


def _kd_grad(options):
    """loss_and_grad, compared through its gradient (the loss is distillation_loss's)."""

    def run(student, teachers, labels, weights):
        return _distiller(weights).loss_and_grad(student, teachers, labels, ALPHA, **options)[1]

    return run


def _np_loss(options):
    def run(student, teachers, labels, weights):
        return reference.general_loss(student, teachers, labels, weights, TEMPERATURE, ALPHA, **options)[0]

    return run


def _np_grad(options):
    def run(student, teachers, labels, weights):
        return reference.general_grad(student, teachers, labels, weights, TEMPERATURE, ALPHA, **options)

    return run


def _kd_forward(student, teachers, labels, weights):
    import numba_kd as kd

    return kd.DistillationLoss(TEMPERATURE, ALPHA).forward(student, teachers[0], labels)


def _np_forward(student, teachers, labels, weights):
    return reference.distillation_loss_single(student, teachers[0], labels, TEMPERATURE, ALPHA)


def _kd_combine(student, teachers, labels, weights):
    return _distiller(weights).combine_teachers(teachers)


def _np_combine(student, teachers, labels, weights):
    return reference.combine_teachers(teachers, weights)


def _kd_probs(eps):
    def run(student, teachers, labels, weights):
        return _distiller(weights).combine_via_probabilities(teachers, eps=eps)

    return run


def _np_probs(eps):
    def run(student, teachers, labels, weights):
        return reference.combine_via_probabilities(teachers, weights, TEMPERATURE, eps)

    return run


# ---------------------------------------------------------------- torch (input dtype)


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def _jax():
    try:
        import jax
    except ImportError:
        return None
    return jax


def torch_available() -> bool:
    """Whether torch can be imported.

    Returns
    -------
    bool
        True when ``import torch`` succeeds.
    """
    return _torch() is not None


def jax_available() -> bool:
    """Whether JAX can be imported.

    Returns
    -------
    bool
        True when ``import jax`` succeeds.
    """
    return _jax() is not None


def torch_loss_function(
    options: dict[str, Any], temperature: float = TEMPERATURE, alpha: float = ALPHA, reduction: str = "mean"
):
    """The loss of ``distillation_loss`` with these options, written in torch operations.

    It is the torch and torch.compile peer of the benchmarks and, under
    autograd, the tests' torch oracle for gradients. It computes in the dtype
    of its inputs.

    Parameters
    ----------
    options : dict of str to Any
        Loss options, as in LOSS_OPTIONS: combine ({"logits", "probs"}),
        divergence ({"forward_kl", "reverse_kl", "jsd", "tvd", "skew_forward_kl",
        "skew_reverse_kl"}), beta, skew,
        teacher_weighting ({"static", "confidence", "entropy"}) and
        ignore_index; missing keys take the defaults of distillation_loss,
        other keys are not read.
    temperature : float, default TEMPERATURE (2.0)
        The softmax temperature T > 0.
    alpha : float, default ALPHA (0.7)
        Weight of the soft term, in [0, 1].
    reduction : {"mean", "sum", "none"}, default "mean"
        The reduction over rows: the mean over the rows not ignored, the sum,
        or one value per row.

    Returns
    -------
    callable
        ``loss(s, t, y, w)`` for student logits s [B, C], stacked teachers
        t [K, B, C], labels y [B] (int64) and normalized weights w [K], all
        torch tensors: a 0-d tensor, or the per-row losses [B] with
        ``reduction="none"``.

    Raises
    ------
    ValueError
        An unknown ``reduction``.
    ImportError
        torch is not installed.
    """
    import torch
    import torch.nn.functional as F

    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f'reduction must be "mean", "sum" or "none", got {reduction!r}')
    combine = options.get("combine", "logits")
    divergence = options.get("divergence", "forward_kl")
    beta = options.get("beta", 0.5)
    skew = options.get("skew", 0.1)
    weighting = options.get("teacher_weighting", "static")
    ignore = options.get("ignore_index")

    def loss(s, t, y, w):
        valid = y != ignore if ignore is not None else torch.ones_like(y, dtype=torch.bool)
        safe_y = torch.where(valid, y, torch.zeros_like(y))
        if weighting == "static":
            row_w = w.expand(y.shape[0], -1)
        elif weighting == "confidence":
            conf = torch.softmax(t, dim=-1).gather(-1, safe_y.expand(t.shape[0], -1)[..., None])[..., 0].T
            row_w = w * conf
            # Rows whose confidence weights all underflow (and ignored rows) keep the static weights.
            fallback = ~valid | (row_w.sum(dim=1) <= 0)
            row_w = torch.where(fallback[:, None], w.expand_as(row_w), row_w)
        else:
            log_pk = torch.log_softmax(t / temperature, dim=-1)
            row_w = w * torch.exp((log_pk.exp() * log_pk).sum(-1).T)
        row_w = row_w / row_w.sum(dim=1, keepdim=True)
        if combine == "logits":
            if weighting == "static":
                z = torch.einsum("k,kbc->bc", w, t)
            else:
                z = torch.einsum("bk,kbc->bc", row_w, t)
            log_p = torch.log_softmax(z / temperature, dim=-1)
        else:
            log_p = torch.logsumexp(
                torch.log(row_w.T)[..., None] + torch.log_softmax(t / temperature, dim=-1), 0
            )
        log_q = torch.log_softmax(s / temperature, dim=-1)
        if divergence == "forward_kl":
            d = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
        elif divergence == "reverse_kl":
            d = F.kl_div(log_p, log_q, log_target=True, reduction="none").sum(-1)
        elif divergence == "jsd":
            log_m = torch.logaddexp(math.log(beta) + log_p, math.log1p(-beta) + log_q)
            d = beta * F.kl_div(log_m, log_p, log_target=True, reduction="none").sum(-1) + (
                1 - beta
            ) * F.kl_div(log_m, log_q, log_target=True, reduction="none").sum(-1)
        elif divergence == "tvd":
            d = 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
        else:
            # The skew KLs: KL(p || m) with m = skew p + (1 - skew) q, or KL(q || m) with
            # p and q swapped.
            first, second = (log_p, log_q) if divergence == "skew_forward_kl" else (log_q, log_p)
            log_m = torch.logaddexp(math.log(skew) + first, _log1m(skew) + second)
            d = F.kl_div(log_m, first, log_target=True, reduction="none").sum(-1)
        ce = F.cross_entropy(s, safe_y, reduction="none")
        rows = torch.where(valid, alpha * temperature**2 * d + (1 - alpha) * ce, torch.zeros_like(d))
        if reduction == "none":
            return rows
        if reduction == "sum":
            return rows.sum()
        return rows.sum() / valid.sum().clamp(min=1)

    return loss


def _log1m(x: float) -> float:
    """log(1 - x), -inf at x = 1."""
    return math.log1p(-x) if x < 1.0 else -math.inf


def _torch_tensor(x: np.ndarray):
    """A torch tensor sharing the memory of a contiguous NumPy array; bfloat16 through its bits."""
    torch = _torch()
    x = np.ascontiguousarray(x)
    if x.dtype.name == "bfloat16":
        return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(x)


def _numpy_of(tensor):
    """A NumPy view of a CPU tensor; bfloat16 through its bits."""
    torch = _torch()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(logit_dtype("bfloat16"))
    return tensor.numpy()


def _as_torch(student, teachers, labels, weights):
    torch = _torch()
    s = _torch_tensor(student)
    t = torch.stack([_torch_tensor(x) for x in teachers])
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    w = _torch_tensor(reference.normalized_weights(weights).astype(student.dtype))
    return s, t, y, w


def _torch_loss(options):
    def run(*args):
        return float(torch_loss_function(options)(*_as_torch(*args)))

    return run


def _torch_grad(options):
    def run(*args):
        s, t, y, w = _as_torch(*args)
        s = s.detach().requires_grad_(True)
        torch_loss_function(options)(s, t, y, w).backward()
        return _numpy_of(s.grad)

    return run


def _compile_cache():
    torch = _torch()
    # Every benchmark row is its own function; the default cache would evict them.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    return torch


def _torch_compiled_loss(options):
    def build(*args):
        torch = _compile_cache()
        fn = torch.compile(torch_loss_function(options), dynamic=False)
        inputs = _as_torch(*args)
        return lambda: float(fn(*inputs))

    return build


def _torch_compiled_grad(options):
    def build(*args):
        torch = _compile_cache()
        fn = torch.compile(torch_loss_function(options), dynamic=False)
        s, t, y, w = _as_torch(*args)

        def run():
            x = s.detach().requires_grad_(True)
            fn(x, t, y, w).backward()
            return _numpy_of(x.grad)

        return run

    return build


def _torch_combine(*args):
    _, t, _, w = _as_torch(*args)
    return _numpy_of(torch_combine(t, w))


def torch_combine(t, w):
    """The weighted average of the teacher logits in torch, ``sum_k w_k t_k``.

    Parameters
    ----------
    t : torch.Tensor, shape [K, B, C]
        Stacked teacher logits.
    w : torch.Tensor, shape [K]
        Teacher weights (normalized to sum 1 for an average), in t's dtype.

    Returns
    -------
    torch.Tensor, shape [B, C]
        The combined logits.
    """
    return (w[:, None, None] * t).sum(0)


def _torch_probs_fn(eps):
    def probs(t, w):
        import torch

        if eps > 0:
            p = (w[:, None, None] * torch.softmax(t / TEMPERATURE, dim=-1)).sum(0)
            return TEMPERATURE * torch.log(p + eps)
        return TEMPERATURE * torch.logsumexp(
            torch.log(w)[:, None, None] + torch.log_softmax(t / TEMPERATURE, -1), 0
        )

    return probs


def _torch_probs(eps):
    def run(*args):
        _, t, _, w = _as_torch(*args)
        return _numpy_of(_torch_probs_fn(eps)(t, w))

    return run


def _torch_compiled(fn):
    def build(*args):
        torch = _compile_cache()
        compiled = torch.compile(fn, dynamic=False)
        _, t, _, w = _as_torch(*args)
        return lambda: _numpy_of(compiled(t, w))

    return build


# ---------------------------------------------------------------- JAX (input dtype)


def jax_loss_function(options: dict[str, Any]):
    """The mean loss of ``distillation_loss`` with these options, written in jax.numpy.

    It is the jax.jit peer of the benchmarks and, under ``jax.grad``, the tests'
    JAX oracle for gradients (temperature TEMPERATURE, alpha ALPHA).

    Parameters
    ----------
    options : dict of str to Any
        Loss options, as in LOSS_OPTIONS (see ``torch_loss_function``).

    Returns
    -------
    callable
        ``loss(s, t, y, w)`` for student logits s [B, C], stacked teachers
        t [K, B, C], labels y [B] and normalized weights w [K], all JAX
        arrays: a 0-d array.

    Raises
    ------
    ImportError
        JAX is not installed.
    """
    return _jax_loss_fn(options)


def _jax_loss_fn(options: dict[str, Any]):
    import jax
    import jax.numpy as jnp

    combine = options.get("combine", "logits")
    divergence = options.get("divergence", "forward_kl")
    beta = options.get("beta", 0.5)
    skew = options.get("skew", 0.1)
    weighting = options.get("teacher_weighting", "static")
    ignore = options.get("ignore_index")
    t_inv = 1.0 / TEMPERATURE

    def loss(s, t, y, w):
        valid = y != ignore if ignore is not None else jnp.ones(y.shape, bool)
        safe_y = jnp.where(valid, y, 0)
        if weighting == "static":
            row_w = w[None, :]
        elif weighting == "confidence":
            log_conf = jnp.take_along_axis(jax.nn.log_softmax(t, axis=-1), safe_y[None, :, None], axis=-1)
            row_w = w * jnp.exp(log_conf[..., 0].T)
        else:
            log_pk = jax.nn.log_softmax(t * t_inv, axis=-1)
            row_w = w * jnp.exp((jnp.exp(log_pk) * log_pk).sum(-1).T)
        row_w = row_w / row_w.sum(axis=1, keepdims=True)
        if combine == "logits":
            z = jnp.einsum("k,kbc->bc", w, t) if weighting == "static" else jnp.einsum("bk,kbc->bc", row_w, t)
            log_p = jax.nn.log_softmax(z * t_inv, axis=-1)
        else:
            terms = jnp.log(row_w.T)[..., None] + jax.nn.log_softmax(t * t_inv, axis=-1)
            log_p = jax.scipy.special.logsumexp(terms, axis=0)
        log_q = jax.nn.log_softmax(s * t_inv, axis=-1)
        p, q = jnp.exp(log_p), jnp.exp(log_q)
        if divergence == "forward_kl":
            d = (p * (log_p - log_q)).sum(-1)
        elif divergence == "reverse_kl":
            d = (q * (log_q - log_p)).sum(-1)
        elif divergence == "jsd":
            log_m = jnp.logaddexp(math.log(beta) + log_p, math.log1p(-beta) + log_q)
            d = beta * (p * (log_p - log_m)).sum(-1) + (1 - beta) * (q * (log_q - log_m)).sum(-1)
        elif divergence == "tvd":
            d = 0.5 * jnp.abs(p - q).sum(-1)
        else:
            first, second = (log_p, log_q) if divergence == "skew_forward_kl" else (log_q, log_p)
            log_m = jnp.logaddexp(math.log(skew) + first, _log1m(skew) + second)
            d = (jnp.exp(first) * (first - log_m)).sum(-1)
        log_r = jax.nn.log_softmax(s, axis=-1)
        ce = -jnp.take_along_axis(log_r, safe_y[:, None], axis=-1)[:, 0]
        rows = jnp.where(valid, ALPHA * TEMPERATURE**2 * d + (1 - ALPHA) * ce, 0.0)
        return rows.sum() / jnp.maximum(valid.sum(), 1)

    return loss


def _as_jax(student, teachers, labels, weights):
    import jax.numpy as jnp

    s = jnp.asarray(student)
    t = jnp.asarray(np.stack(teachers))
    y = jnp.asarray(np.asarray(labels, dtype=np.int32))
    w = jnp.asarray(reference.normalized_weights(weights).astype(student.dtype))
    return s, t, y, w


def _jax_jitted_loss(options):
    def build(*args):
        import jax

        fn = jax.jit(_jax_loss_fn(options))
        inputs = _as_jax(*args)
        return lambda: float(fn(*inputs))

    return build


def _jax_jitted_grad(options):
    def build(*args):
        import jax

        fn = jax.jit(jax.grad(_jax_loss_fn(options)))
        inputs = _as_jax(*args)
        return lambda: np.asarray(fn(*inputs).block_until_ready())

    return build


def _jax_jitted_combine(*args):
    import jax

    fn = jax.jit(lambda t, w: jax.numpy.einsum("k,kbc->bc", w, t))
    _, t, _, w = _as_jax(*args)
    return lambda: np.asarray(fn(t, w).block_until_ready())


def _jax_jitted_probs(eps):
    def build(*args):
        import jax
        import jax.numpy as jnp

        # XLA on the CPU reduces over a leading axis very slowly (seconds here): the
        # teacher sum is an einsum, and the log-sum-exp runs over a last axis.
        def probs(t, w):
            if eps > 0:
                p = jnp.einsum("k,kbc->bc", w, jax.nn.softmax(t / TEMPERATURE, axis=-1))
                return TEMPERATURE * jnp.log(p + eps)
            terms = jnp.log(w)[:, None, None] + jax.nn.log_softmax(t / TEMPERATURE, axis=-1)
            return TEMPERATURE * jax.scipy.special.logsumexp(jnp.moveaxis(terms, 0, -1), axis=-1)

        fn = jax.jit(probs)
        _, t, _, w = _as_jax(*args)
        return lambda: np.asarray(fn(t, w).block_until_ready())

    return build


# ---------------------------------------------------------------- the rows


def _row_name(operation: str, option: str) -> str:
    return f"{operation}[{option}]" if option else operation


def _operations() -> list[Operation]:
    ops = []
    # (operation, arrays moved, scalar result, builders of numba_kd, NumPy, torch,
    # torch.compile and jax.jit for one set of options).  loss_and_grad reads K + 1
    # arrays, writes the gradient, and is compared through the gradient.
    loss_rows = (
        ("distillation_loss", lambda k: k + 1, True,
         (_kd_loss, _np_loss, _torch_loss, _torch_compiled_loss, _jax_jitted_loss)),
        ("loss_and_grad", lambda k: k + 2, False,
         (_kd_grad, _np_grad, _torch_grad, _torch_compiled_grad, _jax_jitted_grad)),
    )  # fmt: skip
    for option, kw in LOSS_OPTIONS.items():
        for operation, moved, scalar, builders in loss_rows:
            kd_fn, np_fn, torch_fn, compiled_fn, jax_fn = (build(kw) for build in builders)
            ops.append(
                Operation(
                    name=_row_name(operation, option),
                    options=kw,
                    arrays_moved=moved,
                    numba_kd=kd_fn,
                    numpy=np_fn,
                    torch=torch_fn,
                    torch_compile=compiled_fn,
                    jax_jit=jax_fn,
                    scalar=scalar,
                )
            )
    ops.append(
        Operation(
            name="DistillationLoss.forward",
            options={},
            arrays_moved=lambda k: 2,
            numba_kd=_kd_forward,
            numpy=_np_forward,
            torch=lambda s, t, y, w: _torch_loss({})(s, t[:1], y, w[:1]),
            scalar=True,
        )
    )
    ops.append(
        Operation(
            name="combine_teachers",
            options={},
            arrays_moved=lambda k: k + 1,
            numba_kd=_kd_combine,
            numpy=_np_combine,
            torch=_torch_combine,
            torch_compile=_torch_compiled(torch_combine),
            jax_jit=_jax_jitted_combine,
        )
    )
    for eps in (1e-10, 0.0):
        ops.append(
            Operation(
                name="combine_via_probabilities" + ("(eps=0)" if eps == 0 else ""),
                options={"eps": eps},
                arrays_moved=lambda k: k + 1,
                numba_kd=_kd_probs(eps),
                numpy=_np_probs(eps),
                torch=_torch_probs(eps),
                torch_compile=_torch_compiled(_torch_probs_fn(eps)),
                jax_jit=_jax_jitted_probs(eps),
            )
        )
    return ops


OPERATIONS: dict[str, Operation] = {op.name: op for op in _operations()}


def relative_error(result: Any, expected: Any) -> float:
    """The maximum relative error of a result, ``max|result - expected| / max|expected|``.

    Both are compared in float64; the scale is the largest magnitude of
    ``expected`` (at least the smallest normal float64), so that one error
    measure serves scalars and whole arrays.

    Parameters
    ----------
    result : array_like or float
        The value under test.
    expected : array_like or float
        The reference value, of result's shape.

    Returns
    -------
    float
        The error; NaN where either holds a NaN.

    Raises
    ------
    ValueError
        Empty arrays, or shapes that do not broadcast.
    """
    result = np.asarray(result, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    scale = max(float(np.max(np.abs(expected))), np.finfo(np.float64).tiny)
    return float(np.max(np.abs(result - expected)) / scale)


# ---------------------------------------------------------------- sparse top-k teachers

#: The benchmark shape of the sparse rows: N rows, C classes, K teachers, k entries each.
SPARSE_SHAPE = (1024, 128000, 2, 64)
#: The stored log-probabilities' temperature T_g of SparseCase (re-tempered to TEMPERATURE).
SPARSE_STORED_TEMPERATURE = 1.0
#: The share of each synthetic teacher row's probability that is stored.
SPARSE_STORED_MASS = 0.9


@dataclass(frozen=True)
class SparseCase:
    """Synthetic sparse top-k teachers and a student, for the sparse rows.

    Each teacher row stores k distinct random classes with log-probabilities
    of a random distribution holding SPARSE_STORED_MASS of the probability,
    taken at SPARSE_STORED_TEMPERATURE; the student is ``3 N(0, 1)``, labels
    uniform, weights 1, 2, ..., K.

    Parameters
    ----------
    n_teachers : int
        K.
    rows : int
        N.
    classes : int
        C.
    k : int
        Entries per row and teacher, k <= C.
    dtype : {"float32", "float64"}, default "float32"
        The student's and the log-probabilities' dtype.
    seed : int, default 0
        The seed of the random generator.
    """

    n_teachers: int
    rows: int
    classes: int
    k: int
    dtype: str = "float32"
    seed: int = 0

    def arrays(self) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray], np.ndarray, np.ndarray]:
        """The arguments of a sparse operation.

        Returns
        -------
        student : numpy.ndarray, shape [N, C]
            The student's logits.
        top : tuple of two numpy.ndarray, each [K, N, k]
            (indices, int64; logprobs, in the Case's dtype).
        labels : numpy.ndarray of int64, shape [N]
            Class indices in [0, C).
        weights : numpy.ndarray of float64, shape [K]
            1, 2, ..., K (not normalized).
        """
        rng = np.random.default_rng(self.seed)
        dtype = np.dtype(self.dtype)
        student = (3.0 * rng.standard_normal((self.rows, self.classes), dtype=np.float32)).astype(dtype)
        shape = (self.n_teachers, self.rows, self.k)
        # Distinct classes per row: increasing offsets (random gaps) from a random start, modulo C.
        gaps = rng.integers(1, max(self.classes // self.k, 1) + 1, size=shape)
        offsets = np.cumsum(gaps, axis=-1) - gaps[..., :1]
        indices = (rng.integers(0, self.classes, size=(*shape[:2], 1)) + offsets) % self.classes
        raw = 2.0 * rng.standard_normal(shape)
        logprobs = raw - reference.logsumexp(raw)[..., None] + math.log(SPARSE_STORED_MASS)
        labels = rng.integers(0, self.classes, size=self.rows)
        return student, (indices, logprobs.astype(dtype)), labels, np.arange(1.0, self.n_teachers + 1.0)


def _top(tail):
    import numba_kd as kd

    def make(top):
        return kd.TopK(top[0], top[1], tail=tail, temperature=SPARSE_STORED_TEMPERATURE)

    return make


def _kd_topk(tail, grad, reuse=False):
    """numba_kd's sparse row; with ``reuse``, loss_and_grad writes into one gradient
    array kept between calls (``out=``), as a training loop would."""
    make = _top(tail)
    buffers: dict[tuple, np.ndarray] = {}

    def run(student, top, labels, weights):
        distiller = _distiller(weights)
        if not grad:
            return distiller.distillation_loss(student, make(top), labels, ALPHA, combine="probs")
        options: dict[str, Any] = {}
        if reuse:
            key = (student.shape, student.dtype.str)
            if key not in buffers:
                buffers.clear()
                buffers[key] = np.empty_like(student)
            options["out"] = buffers[key]
        return distiller.loss_and_grad(student, make(top), labels, ALPHA, combine="probs", **options)[1]

    return run


def _np_topk(tail, grad):
    def run(student, top, labels, weights):
        args = (student, top[0], top[1], labels, weights, TEMPERATURE, ALPHA)
        options = {"tail": tail, "topk_temperature": SPARSE_STORED_TEMPERATURE}
        return reference.topk_grad(*args, **options) if grad else reference.topk_loss(*args, **options)[0]

    return run


def torch_topk_loss_function(tail: str, temperature: float = TEMPERATURE, alpha: float = ALPHA):
    """The forward-KL loss against sparse top-k teachers, written in torch operations.

    The peer of the sparse rows: the teachers' mixture is scattered into a dense
    [N, C] target (the way a torch user would combine several teachers' sparse
    supports), the student's log-probabilities come from ``log_softmax``.

    Parameters
    ----------
    tail : {"renormalize", "bucket", "uniform"}
        The tail rule (``numba_kd.TopK``).
    temperature : float, default TEMPERATURE (2.0)
        The loss temperature T; the stored entries are at SPARSE_STORED_TEMPERATURE.
    alpha : float, default ALPHA (0.7)
        Weight of the soft term.

    Returns
    -------
    callable
        ``loss(s, idx, lp, y, w)`` for student logits s [N, C], indices idx [K, N, k]
        (int64, no -1 entries), log-probabilities lp [K, N, k], labels y [N] and
        normalized weights w [K]: the mean loss, a 0-d tensor.
    """
    import torch
    import torch.nn.functional as F

    tau = SPARSE_STORED_TEMPERATURE / temperature

    def loss(s, idx, lp, y, w):
        n_classes = s.shape[-1]
        n_out = n_classes - idx.shape[-1]
        x = tau * lp
        missing = (1.0 - lp.exp().sum(-1)).clamp(min=0.0)
        log_m = torch.log(missing)
        if tail == "bucket":
            log_tail = tau * log_m
        elif tail == "uniform":
            log_tail = tau * (log_m - math.log(n_out)) + math.log(n_out)
        else:
            log_tail = torch.full_like(log_m, -math.inf)
        log_z = torch.logaddexp(torch.logsumexp(x, -1), log_tail)
        share = torch.exp(log_tail - log_z)  # [K, N]
        per_class = share / n_out if tail == "uniform" else torch.zeros_like(share)
        p = (w[:, None] * per_class).sum(0)[:, None].expand(-1, n_classes).clone()
        for k in range(idx.shape[0]):
            p.scatter_add_(1, idx[k], w[k] * (torch.exp(x[k] - log_z[k, :, None]) - per_class[k, :, None]))
        log_q = torch.log_softmax(s / temperature, -1)
        d = torch.xlogy(p, p).sum(-1) - (p * log_q).sum(-1)
        if tail == "bucket":
            union = torch.zeros_like(s, dtype=torch.bool)
            for k in range(idx.shape[0]):
                union.scatter_(1, idx[k], True)
            p_tail = (w[:, None] * share).sum(0)
            q_tail = torch.where(union, 0.0, log_q.exp()).sum(-1)
            d = d + torch.xlogy(p_tail, p_tail) - p_tail * torch.log(q_tail)
        ce = F.cross_entropy(s, y, reduction="none")
        return (alpha * temperature**2 * d + (1 - alpha) * ce).mean()

    return loss


def _as_torch_topk(student, top, labels, weights):
    torch = _torch()
    return (
        torch.from_numpy(np.ascontiguousarray(student)),
        torch.from_numpy(np.asarray(top[0], dtype=np.int64)),
        torch.from_numpy(np.ascontiguousarray(top[1])),
        torch.from_numpy(np.asarray(labels, dtype=np.int64)),
        torch.from_numpy(reference.normalized_weights(weights).astype(student.dtype)),
    )


def _torch_topk(tail, grad, compiled):
    def run_once(fn, inputs):
        if not grad:
            return float(fn(*inputs))
        s = inputs[0].detach().requires_grad_(True)
        fn(s, *inputs[1:]).backward()
        return _numpy_of(s.grad)

    if not compiled:
        return lambda *args: run_once(torch_topk_loss_function(tail), _as_torch_topk(*args))

    def build(*args):
        torch = _compile_cache()
        fn = torch.compile(torch_topk_loss_function(tail), dynamic=False)
        inputs = _as_torch_topk(*args)
        return lambda: run_once(fn, inputs)

    return build


def _sparse_operations() -> list[Operation]:
    ops = []
    rows = (
        ("distillation_loss", "", 1, False),
        ("loss_and_grad", "", 2, True),
        ("loss_and_grad", "+out", 2, True),
    )
    for tail in reference.TOPK_TAILS:
        for operation, variant, moved, grad in rows:
            ops.append(
                Operation(
                    name=f"{operation}[topk_{tail}{variant}]",
                    options={"tail": tail, "combine": "probs"},
                    # The student, and the gradient; the K N k entries are not counted.
                    arrays_moved=lambda k, moved=moved: moved,
                    numba_kd=_kd_topk(tail, grad, reuse=bool(variant)),
                    numpy=_np_topk(tail, grad),
                    torch=_torch_topk(tail, grad, compiled=False),
                    torch_compile=_torch_topk(tail, grad, compiled=True),
                    scalar=not grad,
                )
            )
    return ops


#: The sparse top-k rows: forward KL, every tail rule, loss and loss_and_grad (a new
#: gradient array per call, and "+out": one reused through out=). Their
#: operations take a SparseCase's arrays, (student, (indices, logprobs), labels, weights).
SPARSE_OPERATIONS: dict[str, Operation] = {op.name: op for op in _sparse_operations()}
