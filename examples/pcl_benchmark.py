"""Benchmark ``lightly_pcl`` against its anchors side by side in one process (one thread: torch and faiss).

1. Loss step (forward + backward), batch 256, 128-d, memory bank 16384: ``ProtoNCELoss`` with M = 3
   clusterings (K = 2500/5000/10000, r = 16384) and its instance term alone vs Lightly's
   ``NTXentLoss(memory_bank_size=(16384, 128))``. Variants interleaved, median over repeats.
2. k-means of the E-step, N x 128 unit vectors: faiss (optional extra) vs the pure-torch fallback.
3. E-step share of an epoch in the example's Fashion-MNIST pipeline (digits with ``--quick``): the median time
   of a training step (Lightly ``MoCoV2Transform`` data loading + PCL step) times the steps per epoch, against
   a full E-step (momentum features of every training image + k-means at K = 50/100/200).

Peak memory: each variant runs once more in a fresh subprocess. After the imports and inputs are ready it
reads the resident set size (``VmRSS``), resets the kernel's high-water mark by writing ``5`` to
``/proc/self/clear_refs``, runs the variant and reports the new high-water mark ``VmHWM`` minus that baseline:
the peak extra RSS of the variant alone (``tracemalloc`` cannot see torch CPU tensors). Without ``/proc`` it
falls back to ``resource.getrusage(RUSAGE_SELF).ru_maxrss``, which cannot go below the set-up's peak.
On a GPU (``--device cuda``, the default when one is available) every cell runs on the device: times are CUDA
events around a synchronised call, memory is ``torch.cuda.max_memory_allocated`` of one call, and k-means uses
faiss on the GPU when the installed faiss has GPU support (else the faiss row is faiss on the CPU).
``--out DIR`` also writes ``DIR/report.md``. Run it alone:
``flock /tmp/graftkit-bench.lock python examples/pcl_benchmark.py``.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import resource
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from device_timing import DeviceTimer, add_device_argument, peak_memory_mib, reset_peak_memory

BATCH, DIM, BANK, CLUSTERS = 256, 128, 16384, (2500, 5000, 10000)


def _loss_inputs(seed: int = 0, device: str = "cpu"):
    from lightly_pcl import Prototypes

    g = torch.Generator().manual_seed(seed)
    labels = torch.stack([torch.randint(0, k, (BATCH,), generator=g) for k in CLUSTERS])
    centroids = [torch.nn.functional.normalize(torch.randn(k, DIM, generator=g), dim=1) for k in CLUSTERS]
    phis = [0.1 + 0.2 * torch.rand(k, generator=g) for k in CLUSTERS]
    return (
        torch.randn(BATCH, DIM, generator=g).to(device),
        torch.randn(BATCH, DIM, generator=g).to(device),
        Prototypes(labels.to(device), [c.to(device) for c in centroids], [p.to(device) for p in phis]),
    )


def loss_variants(device: str = "cpu") -> dict[str, Callable[[], None]]:
    from lightly.loss import NTXentLoss
    from lightly_pcl import ProtoNCELoss

    q0, k, prototypes = _loss_inputs(device=device)
    anchor = NTXentLoss(temperature=0.2, memory_bank_size=(BANK, DIM)).to(device)
    ours = ProtoNCELoss(temperature=0.2, memory_bank_size=(BANK, DIM), num_negative_prototypes=16384).to(
        device
    )

    def step(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            q = q0.clone().requires_grad_()
            fn(q).backward()

        return run

    return {
        "NTXentLoss (anchor)": step(lambda q: anchor(q, k)),
        "ProtoNCELoss instance term": step(lambda q: ours(q, k)),
        "ProtoNCELoss, M=3": step(lambda q: ours(q, k, prototypes)),
    }


def kmeans_variants(num_points: int, device: str = "cpu") -> dict[str, Callable[[], None]]:
    """Torch k-means on ``device``; faiss on the GPU for CUDA points when it has GPU support, else the CPU."""
    from lightly_pcl import faiss_available, kmeans

    x = torch.nn.functional.normalize(
        torch.randn(num_points, DIM, generator=torch.Generator().manual_seed(0)), dim=1
    ).to(device)
    variants = {"k-means torch fallback": lambda: kmeans(x, 200, num_redo=1, backend="torch") and None}
    if faiss_available():
        variants["k-means faiss"] = lambda: kmeans(x, 200, num_redo=1, backend="faiss") and None
    return variants


def estep_variants(quick: bool, device: str = "cpu") -> tuple[dict[str, Callable[[], None]], int]:
    """One training step with data loading, and one full E-step, of the example's PCL pipeline."""
    import pcl_fashion_mnist as example
    from lightly.transforms import MoCoV2Transform
    from lightly_pcl import IndexedDataset, ProtoNCELoss, PrototypeClustering
    from PIL import Image
    from torch.utils.data import DataLoader, TensorDataset

    cfg = example.QUICK if quick else example.FULL
    x_tr, y_tr, _, _ = (
        example.load_digits_upsampled() if quick else example.load_fashion_mnist(example.FASHION_DIR)
    )
    mean, std = float(x_tr.mean() / 255), float(x_tr.std() / 255)
    transform = MoCoV2Transform(
        input_size=x_tr.shape[1], cj_sat=0.0, cj_hue=0.0, random_gray_scale=0.0, gaussian_blur=0.0,
        normalize={"mean": [mean], "std": [std]},
    )  # fmt: skip
    model = example.build_model(cfg["width"]).to(device)
    criterion = ProtoNCELoss(memory_bank_size=(cfg["bank"], 128)).to(device)
    clustering = PrototypeClustering(num_clusters=cfg["num_clusters"], num_redo=1, progress=False).to(device)
    eval_x = (torch.from_numpy(x_tr).float().div(255).unsqueeze(1) - mean) / std
    cluster_loader = DataLoader(
        IndexedDataset(TensorDataset(eval_x, torch.from_numpy(y_tr))), batch_size=1024
    )
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.06, momentum=0.9)
    clustering.update(model.forward_momentum, cluster_loader, device=device)  # the step below has prototypes
    generator = torch.Generator().manual_seed(0)
    bs = cfg["batch_size"]

    def train_step() -> None:
        idx = torch.randint(0, len(y_tr), (bs,), generator=generator)
        views = [transform(Image.fromarray(x_tr[int(i)], mode="L")) for i in idx]  # DataLoader work
        x_q, x_k = (
            torch.stack([v[0] for v in views]).to(device),
            torch.stack([v[1] for v in views]).to(device),
        )
        model.update_momentum(0.99)
        loss = criterion(model(x_q), model.forward_momentum(x_k), clustering(idx.to(device)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def estep() -> None:
        model.eval()
        clustering.update(model.forward_momentum, cluster_loader, device=device)
        model.train()

    return {"training step": train_step, "E-step": estep}, len(y_tr) // bs


def _median_times(
    variants: dict[str, Callable[[], None]], repeats: int, device: str = "cpu", warmup: int = 1
) -> dict[str, float]:
    """Medians of interleaved repeats: wall-clock on a CPU, CUDA events (synchronised) on a GPU."""
    timer = DeviceTimer(device)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(warmup):
        for fn in variants.values():
            timer.time(fn)
    for _ in range(repeats):  # interleaved, so background load hits every variant alike
        for name, fn in variants.items():
            times[name].append(timer.time(fn))
    return {name: statistics.median(ts) for name, ts in times.items()}


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def _peak_extra_rss_mb(fn: Callable[[], None]) -> float:
    try:
        base = _status_mb("VmRSS")
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # reset VmHWM to the current RSS
        fn()
        return _status_mb("VmHWM") - base
    except OSError:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        fn()
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base


def _peak_memory_mb(group: str, name: str, args: argparse.Namespace) -> float:
    """CPU: peak extra RSS of the variant in a fresh process. CUDA: ``max_memory_allocated`` of a call."""
    if args.device != "cpu":
        fn = _variants(group, args.quick, args.device)[name]
        reset_peak_memory(args.device)
        fn()
        return float(peak_memory_mib(args.device) or 0.0)
    cmd = [sys.executable, __file__, "--memory", group, name, *(["--quick"] if args.quick else [])]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    return float(json.loads(out)["delta_mb"])


def _variants(group: str, quick: bool, device: str = "cpu") -> dict[str, Callable[[], None]]:
    if group == "loss":
        return loss_variants(device)
    if group == "kmeans":
        return kmeans_variants(5000 if quick else 50000, device)
    return estep_variants(quick, device)[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="smaller sizes and digits instead of Fashion-MNIST"
    )
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="also write the report to OUT/report.md")
    add_device_argument(parser)
    parser.add_argument("--memory", nargs=2, metavar=("GROUP", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.device = str(torch.device(args.device))
    torch.set_num_threads(1)
    if importlib.util.find_spec("faiss") is not None:
        import faiss

        faiss.omp_set_num_threads(1)  # faiss runs OpenMP threads of its own; compare one thread with one
    if args.memory:
        group, name = args.memory
        fn = _variants(group, args.quick)[name]
        gc.collect()
        print(json.dumps({"delta_mb": _peak_extra_rss_mb(fn)}))
        return 0

    repeats = args.repeats or (3 if args.quick else 7)
    device = args.device
    lines = [f"command: python examples/pcl_benchmark.py {' '.join(sys.argv[1:] if argv is None else argv)}"]
    card = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "CPU"
    lines.append(
        f"torch {torch.__version__}, device {device} ({card}), 1 CPU thread, medians of {repeats} "
        "interleaved repeats" + (" (CUDA events)" if device.startswith("cuda") else "") + "\n"
    )
    rows = []
    for group, anchor in (("loss", "NTXentLoss (anchor)"), ("kmeans", "k-means faiss")):
        medians = _median_times(_variants(group, args.quick, device), repeats, device)
        base = medians.get(anchor, next(iter(medians.values())))
        for name, seconds in medians.items():
            rows.append((name, seconds, seconds / base, anchor, _peak_memory_mb(group, name, args)))
    variants, steps = estep_variants(args.quick, device)
    medians = _median_times(variants, max(3, repeats // 2), device)
    epoch = medians["training step"] * steps
    share = medians["E-step"] / (medians["E-step"] + epoch)
    base = medians["training step"]
    for name, seconds in medians.items():
        rows.append((name, seconds, seconds / base, "training step", _peak_memory_mb("estep", name, args)))

    memory = "peak RSS above baseline (MB)" if device == "cpu" else "peak CUDA memory allocated (MiB)"
    lines.append(f"| variant | median time (ms) | ratio | vs | {memory} |")
    lines.append("|---|---|---|---|---|")
    for name, seconds, ratio, anchor, mem in rows:
        lines.append(f"| {name} | {1000 * seconds:.1f} | {ratio:.2f} | {anchor} | {mem:.1f} |")
    lines.append("")
    lines.append(
        f"E-step share: training step {1000 * medians['training step']:.0f} ms x {steps} steps = "
        f"{epoch:.1f} s per epoch; E-step {medians['E-step']:.1f} s; share of the epoch {100 * share:.1f} %"
    )
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "report.md").write_text("# lightly_pcl benchmark\n\n" + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
