"""GPU benchmark: numba_kd's CUDA kernels against the device's copy bandwidth and torch eager.

Run by scripts/gpu_check.sh on a machine with an NVIDIA GPU.  Every time is the
median of CUDA-event timings after warm-up; throughput counts the bytes that
must move (K + 1 input arrays read for the loss; K read + 1 written for the
combine; the student read and the gradient written for the sparse top-k
loss_and_grad, whose K = 2 teachers' k = 64 stored entries per row are copied
from the host in each call) and is set beside the device's own copy bandwidth,
measured here.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import statistics

import numba
import numpy as np
from numba import cuda

import numba_kd as kd

SHAPES = [(8192, 1000), (4096, 32000), (1024, 128000)]
QUICK_SHAPES = [(4, 33)]
N_TEACHERS = 4
TEMPERATURE = 2.0
ALPHA = 0.7


def time_events(fn, repeats: int) -> float:
    """Median seconds of ``fn`` measured with CUDA events, after warm-up."""
    for _ in range(3):
        fn()
    cuda.synchronize()
    start, end = cuda.event(), cuda.event()
    times = []
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def copy_bandwidth(n_bytes: int, repeats: int) -> float:
    """Device-to-device copy, bytes read + written per second."""
    src = cuda.device_array(n_bytes // 4, dtype=np.float32)
    dst = cuda.device_array_like(src)
    seconds = time_events(lambda: dst.copy_to_device(src), repeats)
    return 2 * src.nbytes / seconds


def torch_eager(student, teachers, labels, weights):
    import torch
    import torch.nn.functional as F

    s = torch.as_tensor(student, device="cuda")
    t = [torch.as_tensor(x, device="cuda") for x in teachers]
    y = torch.as_tensor(labels, device="cuda")
    w = torch.as_tensor(weights, dtype=s.dtype, device="cuda")

    def loss():
        z = sum(w[k] * t[k] for k in range(len(t)))
        kl = F.kl_div(
            F.log_softmax(s / TEMPERATURE, dim=-1),
            F.log_softmax(z / TEMPERATURE, dim=-1),
            log_target=True,
            reduction="batchmean",
        )
        return ALPHA * TEMPERATURE**2 * kl + (1 - ALPHA) * F.cross_entropy(s, y)

    return loss


def sparse_teachers(teachers, k: int) -> kd.TopK:
    """The top-k log-probabilities (T_g = 1) of host teacher logits, as a TopK."""
    indices, logprobs = [], []
    for t in teachers:
        log_p = t - np.log(np.sum(np.exp(t - t.max(axis=1, keepdims=True)), axis=1, keepdims=True))
        log_p -= t.max(axis=1, keepdims=True)
        top = np.argpartition(-t, k - 1, axis=1)[:, :k]
        indices.append(top)
        logprobs.append(np.take_along_axis(log_p, top, axis=1))
    return kd.TopK(indices, logprobs, tail="bucket")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="one tiny shape (smoke test)")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    shapes = QUICK_SHAPES if args.quick else SHAPES
    rng = np.random.default_rng(0)
    distiller = kd.EnsembleDistiller.uniform(N_TEACHERS, temperature=TEMPERATURE)
    try:
        import torch  # noqa: F401

        have_torch = not numba.config.ENABLE_CUDASIM
    except ImportError:
        have_torch = False

    device = cuda.get_current_device()
    name = getattr(device, "name", "CUDA simulator")
    name = name.decode() if isinstance(name, bytes) else name
    print(f"# {name}, {datetime.date.today()}, numba {numba.__version__}, K={N_TEACHERS}, float32")
    header = (
        f"{'operation':<20} {'B x C':>14} {'time ms':>9} {'GB/s':>8} {'copy GB/s':>10} "
        f"{'% of copy':>9} {'torch ms':>9} {'vs torch':>9}"
    )
    print(header)
    for rows, classes in shapes:
        host = [rng.standard_normal((rows, classes), dtype=np.float32) for _ in range(N_TEACHERS + 1)]
        labels = rng.integers(0, classes, size=rows)
        student = cuda.to_device(host[0])
        teachers = [cuda.to_device(x) for x in host[1:]]
        d_labels = cuda.to_device(labels)
        array_bytes = rows * classes * 4
        bandwidth = copy_bandwidth((N_TEACHERS + 1) * array_bytes, args.repeats)

        loss = functools.partial(
            distiller.distillation_loss, student, teachers, d_labels, ALPHA, return_device_scalar=True
        )
        combine = functools.partial(distiller.combine_teachers, teachers)

        torch_time = None
        if have_torch:
            torch_time = time_events(torch_eager(host[0], host[1:], labels, distiller.weights), args.repeats)
        rows_out = [
            ("distillation_loss", loss, (N_TEACHERS + 1) * array_bytes, torch_time),
            ("combine_teachers", combine, (N_TEACHERS + 1) * array_bytes, None),
        ]
        k = min(64, classes)
        top = sparse_teachers(host[1:3], k)
        grad_out = cuda.device_array_like(student)
        sparse = functools.partial(
            kd.EnsembleDistiller.uniform(2, temperature=TEMPERATURE).loss_and_grad, student, top, d_labels,
            ALPHA, combine="probs", out=grad_out, return_device_scalar=True,
        )  # fmt: skip
        rows_out.append((f"topk{k}_loss_and_grad", sparse, 2 * array_bytes, None))
        for op, fn, n_bytes, peer in rows_out:
            seconds = time_events(fn, args.repeats)
            throughput = n_bytes / seconds
            peer_ms = f"{peer * 1e3:9.3f}" if peer else f"{'-':>9}"
            ratio = f"{peer / seconds:8.2f}x" if peer else f"{'-':>9}"
            print(
                f"{op:<20} {f'{rows}x{classes}':>14} {seconds * 1e3:9.3f} {throughput / 1e9:8.1f} "
                f"{bandwidth / 1e9:10.1f} {100 * throughput / bandwidth:8.1f}% {peer_ms} {ratio}"
            )


if __name__ == "__main__":
    main()
