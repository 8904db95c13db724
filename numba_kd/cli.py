"""The command line, installed as ``numba-kd`` (also ``python -m numba_kd``)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

import numpy as np


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def check(args: argparse.Namespace) -> int:
    import numba_kd as kd
    from numba_kd import _runtime, reference

    rng = np.random.default_rng(args.seed)
    dtype = np.dtype(args.dtype)
    shape = (args.batch, args.classes)
    # Teachers agree on a shared signal and differ by their own noise; the
    # student is a noisier copy, as early in training.
    signal = rng.normal(scale=3.0, size=shape)
    teachers = [(signal + rng.normal(size=shape)).astype(dtype) for _ in range(args.teachers)]
    student = (0.5 * signal + rng.normal(scale=2.0, size=shape)).astype(dtype)
    labels = np.argmax(signal, axis=1)
    weights = np.arange(1, args.teachers + 1, dtype=np.float64)

    distiller = kd.EnsembleDistiller(weights, temperature=args.temperature)
    print(
        f"numba_kd {kd.__version__} check: K={args.teachers} teachers, B={args.batch}, C={args.classes}, "
        f"{dtype.name}, weights={distiller.weights.round(3).tolist()}, T={args.temperature}, "
        f"alpha={args.alpha}, {_runtime.num_threads()} threads"
    )

    start = time.perf_counter()
    loss = distiller.distillation_loss(student, teachers, labels, args.alpha)
    first_call = time.perf_counter() - start
    ref_loss = reference.distillation_loss(student, teachers, labels, weights, args.temperature, args.alpha)

    def run_kernel():
        distiller.distillation_loss(student, teachers, labels, args.alpha)

    def run_reference():
        reference.distillation_loss(student, teachers, labels, weights, args.temperature, args.alpha)

    kernel_time = _median_time(run_kernel, args.repeats)
    reference_time = _median_time(run_reference, args.repeats)
    rel_err = abs(loss - ref_loss) / abs(ref_loss)
    print(f"  numba_kd loss            {loss:.10f}")
    print(f"  NumPy float64 reference  {ref_loss:.10f}   (relative difference {rel_err:.1e})")
    print(f"  first call (compile or cache load)  {first_call * 1e3:9.1f} ms")
    print(f"  numba_kd, median of {args.repeats}          {kernel_time * 1e3:9.2f} ms")
    print(f"  NumPy reference, median of {args.repeats}   {reference_time * 1e3:9.2f} ms")
    print(f"  speed-up vs the reference          {reference_time / kernel_time:9.1f}x")
    return 0


DESCRIPTION = (
    "Fused multi-teacher knowledge-distillation losses. Run a demo, check and time the loss on a "
    "synthetic batch, benchmark it against its peers, or compute soft labels and losses over "
    "datasets on disk. Each command has its own --help."
)


class _HelpFormatter(argparse.HelpFormatter):
    """Help that shows every option's default (flags and options without one excepted)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        no_default = action.default is None or action.default is argparse.SUPPRESS
        if "%(default)" in text or no_default or action.nargs == 0 or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    from numba_kd import __version__

    parser = argparse.ArgumentParser(prog="numba-kd", description=DESCRIPTION, formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"numba-kd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    d = sub.add_parser(
        "demo",
        formatter_class=_HelpFormatter,
        help="distill an ensemble of small MLPs on the digits data (needs scikit-learn)",
        description=(
            "Train an ensemble of small MLP teachers on scikit-learn's digits data, distill it into a "
            "student with numba_kd's loss_and_grad, and compare the student with one trained on the "
            "labels alone."
        ),
    )
    d.add_argument("--seeds", type=int, default=5, help="training runs to average")
    d.add_argument("--quick", action="store_true", help="fewer training steps (a smoke test)")
    d.set_defaults(func=_demo)

    p = sub.add_parser(
        "check",
        formatter_class=_HelpFormatter,
        help="distillation loss on a synthetic ensemble batch, checked and timed",
        description=(
            "Compute the distillation loss of a synthetic batch, compare it with the float64 NumPy "
            "reference, and time both."
        ),
    )
    p.add_argument("--teachers", type=int, default=4, help="number of teachers K")
    p.add_argument("--batch", type=int, default=2048, help="rows B")
    p.add_argument("--classes", type=int, default=1000, help="classes C")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32", help="logits dtype")
    p.add_argument("--temperature", type=float, default=2.0, help="softmax temperature T")
    p.add_argument("--alpha", type=float, default=0.7, help="weight of the soft term")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per implementation")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic batch")
    p.set_defaults(func=check)

    b = sub.add_parser(
        "bench",
        formatter_class=_HelpFormatter,
        help="numba_kd vs NumPy, torch, torch.compile, jax.jit and the memory roofline",
        description=(
            "Time every operation and option of numba_kd beside the float64 NumPy reference, eager "
            "torch, torch.compile and jax.jit (those installed), interleaved in rounds, with the memory "
            "roofline of each row."
        ),
    )
    b.add_argument("--quick", action="store_true", help="small shapes, few rounds (a smoke test)")
    b.add_argument("--repeats", type=int, default=9, help="interleaved timing rounds")
    b.add_argument("--operations", metavar="NAMES", help="comma-separated rows (default: every row)")
    b.add_argument("--shapes", metavar="BxC,...", help="e.g. 8192x1000,512x32000 (default: all three)")
    b.add_argument("--no-peers", action="store_true", help="time numba_kd and the roofline only")
    b.add_argument(
        "--sparse",
        action="store_true",
        help="the sparse top-k rows instead: N=1024, C=128000, K=2, k=64 (--quick: N=256, C=32000)",
    )
    b.add_argument("--no-latency", action="store_true", help="skip the compile-latency subprocesses")
    b.add_argument(
        "--from-json",
        metavar="PATH",
        help="print the table of a saved --json run (and with --plot, draw it) and exit",
    )
    b.add_argument(
        "--dtype",
        choices=["float32", "float64", "float16", "bfloat16"],
        default="float32",
        help="logits dtype",
    )
    b.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    b.add_argument("--plot", metavar="PATH", help="also write a PNG bar chart (needs matplotlib)")
    b.set_defaults(func=_bench)
    _add_offline_commands(sub)
    _add_topk_command(sub)
    return parser


def _weights(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"weights must be comma-separated numbers, got {text!r}") from None


def _add_ensemble_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--weights",
        type=_weights,
        metavar="W1,W2,...",
        help="teacher weights, comma-separated (default: equal)",
    )
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature T > 0")
    p.add_argument(
        "--combine",
        choices=["logits", "probs"],
        help="logits (the default): weighted logit average; probs: T log of the weighted probability average",
    )
    p.add_argument(
        "--chunk-rows",
        type=int,
        metavar="N",
        help="rows read per step; memory grows with it, not with the dataset (default: ~256 MB of input)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="run on an existing dask.distributed scheduler (e.g. tcp://host:8786; needs the dask extra)",
    )


def _add_offline_commands(sub) -> None:
    s = sub.add_parser(
        "soft-labels",
        formatter_class=_HelpFormatter,
        help="combine teacher logits on disk into soft labels, streaming row chunks",
        description=(
            "Combine K teachers' logits (each a .npy file, read memory-mapped, or a Zarr array: a path "
            "ending in .zarr; all [N, C]) into one [N, C] soft-label array OUT, streaming row chunks "
            "through the fused kernels. Inputs are validated before anything is written; OUT is written "
            "under OUT.partial and renamed when complete."
        ),
    )
    s.add_argument("teachers", nargs="+", metavar="TEACHER", help="teacher logits: .npy or .zarr, [N, C]")
    s.add_argument("--out", required=True, metavar="OUT", help="output path: .npy or .zarr")
    _add_ensemble_options(s)
    s.add_argument("--eps", type=float, default=1e-10, help="added to the probabilities for --combine probs")
    s.add_argument("--dtype", choices=["float32", "float16"], default="float32", help="output dtype")
    s.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted Zarr output from its last complete chunk",
    )
    s.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    s.set_defaults(func=_soft_labels)

    loss = sub.add_parser(
        "loss",
        formatter_class=_HelpFormatter,
        help="the ensemble distillation loss of a student over a dataset on disk",
        description=(
            "alpha T^2 D(p, softmax(s / T)) + (1 - alpha) CE(s, y), averaged over the dataset's rows "
            "(p from the teachers as --combine says, D as --divergence says), streaming row chunks; prints "
            "the loss and its soft and hard parts."
        ),
    )
    loss.add_argument("student", metavar="STUDENT", help="student logits: .npy or .zarr, [N, C]")
    loss.add_argument(
        "teachers", nargs="*", metavar="TEACHER", help="teacher logits: .npy or .zarr, [N, C] (or --topk)"
    )
    loss.add_argument(
        "--topk",
        metavar="FILE",
        help="the teachers' top-k Parquet file (numba-kd topk) instead of TEACHER arrays; they mix as "
        "probabilities",
    )
    loss.add_argument(
        "--tail",
        choices=["renormalize", "bucket", "uniform"],
        default="bucket",
        help="with --topk: what the teachers' unstored probability becomes",
    )
    loss.add_argument("--labels", required=True, help="integer labels: .npy or .zarr, [N]")
    loss.add_argument(
        "--alpha", type=float, required=True, help="weight of the soft (distillation) term, in [0, 1]"
    )
    _add_ensemble_options(loss)
    loss.add_argument(
        "--divergence",
        choices=["forward_kl", "reverse_kl", "jsd", "tvd", "skew_forward_kl", "skew_reverse_kl"],
        default="forward_kl",
        help="KL(p || q), KL(q || p), JSD with --beta, total variation, or the skew KLs with --skew "
        "(--topk: the first three)",
    )
    loss.add_argument("--beta", type=float, default=0.5, help="the JSD weight, in (0, 1)")
    loss.add_argument("--skew", type=float, default=0.1, help="the skew KLs' lambda, in (0, 1]")
    loss.add_argument(
        "--no-t2-scaling",
        dest="scale_by_t2",
        action="store_false",
        help="the soft term is alpha D instead of alpha T^2 D (the loss TRL and Liger-Kernel report)",
    )
    loss.add_argument(
        "--teacher-weighting",
        choices=["static", "confidence", "entropy"],
        default="static",
        help="per-row teacher weights (not with --topk)",
    )
    loss.add_argument(
        "--ignore-index",
        type=int,
        metavar="LABEL",
        help="rows with this label (e.g. -100) add nothing and do not count in the mean",
    )
    loss.add_argument("--json", action="store_true", help="print one JSON object: loss, soft, hard, rows")
    loss.set_defaults(func=_loss)


def _add_topk_command(sub) -> None:
    t = sub.add_parser(
        "topk",
        formatter_class=_HelpFormatter,
        help="store each teacher's top-k log-probabilities per row in a Parquet file",
        description=(
            "For each row of K teachers' logits (each a .npy file or a Zarr array, [N, C]), store each "
            "teacher's k most probable classes at --temperature and their log-probabilities in OUT, a "
            "Parquet file that numba_kd.read_topk reads as a TopK. OUT is written under a temporary name "
            "in its directory and renamed when complete."
        ),
    )
    t.add_argument("teachers", nargs="+", metavar="TEACHER", help="teacher logits: .npy or .zarr, [N, C]")
    t.add_argument("--k", type=int, required=True, help="entries per row and teacher, 1 <= k <= C")
    t.add_argument("--out", required=True, metavar="OUT", help="the Parquet file")
    t.add_argument(
        "--temperature", type=float, default=1.0, help="T_g: log-probabilities of softmax(t / T_g)"
    )
    t.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="log-probability dtype")
    t.add_argument(
        "--names", metavar="N1,N2,...", help="teacher names for the metadata (default: file names)"
    )
    t.add_argument(
        "--chunk-rows",
        type=int,
        metavar="N",
        help="rows per step and row group (default: ~256 MB of input)",
    )
    t.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    t.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    t.set_defaults(func=_topk)


def _topk(args: argparse.Namespace) -> int:
    from numba_kd import offline

    try:
        names = None if args.names is None else args.names.split(",")
        summary = offline.topk(
            args.teachers, args.out, args.k, temperature=args.temperature, dtype=args.dtype, names=names,
            chunk_rows=args.chunk_rows, overwrite=args.overwrite, progress=not args.no_progress,
        )  # fmt: skip
    except (TypeError, ValueError, ImportError, OSError) as exc:
        return _fail(exc)
    return _print_written(args.out, summary)


def _print_written(out: str, summary) -> int:
    print(
        f"wrote {out}: {summary.rows} rows in {summary.seconds:.2f} s "
        f"({summary.rows_per_second:,.0f} rows/s, {summary.gb_per_second:.2f} GB/s of input)"
    )
    return 0


def _fail(exc: Exception) -> int:
    print(f"numba-kd: error: {exc}", file=sys.stderr)
    return 2


def _soft_labels(args: argparse.Namespace) -> int:
    from numba_kd import offline

    try:
        options = dict(
            weights=args.weights, temperature=args.temperature, combine=args.combine or "logits",
            eps=args.eps, chunk_rows=args.chunk_rows, dtype=args.dtype, resume=args.resume,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )  # fmt: skip
        summary = offline.soft_labels(args.teachers, args.out, scheduler=args.scheduler, **options)
    except (TypeError, ValueError, ImportError, OSError) as exc:
        return _fail(exc)
    return _print_written(args.out, summary)


def _loss(args: argparse.Namespace) -> int:
    from numba_kd import offline

    try:
        if args.topk is not None:
            result = _topk_loss(args)
            return _print_loss(result, args.json)
        if not args.teachers:
            raise ValueError("give TEACHER arrays or --topk FILE")
        options = dict(
            alpha=args.alpha, weights=args.weights, temperature=args.temperature,
            combine=args.combine or "logits", divergence=args.divergence, beta=args.beta, skew=args.skew,
            scale_by_t2=args.scale_by_t2, teacher_weighting=args.teacher_weighting,
            ignore_index=args.ignore_index, chunk_rows=args.chunk_rows,
        )  # fmt: skip
        result = offline.dataset_loss(
            args.student, args.teachers, args.labels, progress=not args.no_progress,
            scheduler=args.scheduler, **options,
        )  # fmt: skip
    except (TypeError, ValueError, ImportError, OSError) as exc:
        return _fail(exc)
    return _print_loss(result, args.json)


def _topk_loss(args: argparse.Namespace) -> dict:
    from numba_kd import offline

    if args.teachers:
        raise ValueError("give TEACHER arrays or --topk FILE, not both")
    if args.combine == "logits":
        raise ValueError("--topk teachers mix as probabilities: --combine logits does not apply")
    if args.scheduler is not None:
        raise ValueError("--topk runs locally: --scheduler does not apply")
    if args.teacher_weighting != "static":
        raise ValueError("--topk teachers take their --weights as given: --teacher-weighting does not apply")
    return offline.dataset_topk_loss(
        args.student, args.topk, args.labels, alpha=args.alpha, weights=args.weights,
        temperature=args.temperature, tail=args.tail, divergence=args.divergence, beta=args.beta,
        scale_by_t2=args.scale_by_t2, ignore_index=args.ignore_index, chunk_rows=args.chunk_rows,
        progress=not args.no_progress,
    )  # fmt: skip


def _print_loss(result: dict, as_json: bool) -> int:
    if as_json:
        print(json.dumps(result))
    else:
        print(
            f"loss {result['loss']:.10g}  (soft {result['soft']:.10g}, hard {result['hard']:.10g}) "
            f"over {result['rows']} rows"
        )
    return 0


def _demo(args: argparse.Namespace) -> int:
    from numba_kd import demo

    return demo.run(args)


def _bench(args: argparse.Namespace) -> int:
    from numba_kd import bench

    return bench.run(args)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
