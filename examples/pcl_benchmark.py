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
Run it alone: ``flock /tmp/graftkit-bench.lock python examples/pcl_benchmark.py``.
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
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

BATCH, DIM, BANK, CLUSTERS = 256, 128, 16384, (2500, 5000, 10000)


def _loss_inputs(seed: int = 0):
    from lightly_pcl import Prototypes

    g = torch.Generator().manual_seed(seed)
    labels = torch.stack([torch.randint(0, k, (BATCH,), generator=g) for k in CLUSTERS])
    centroids = [torch.nn.functional.normalize(torch.randn(k, DIM, generator=g), dim=1) for k in CLUSTERS]
    phis = [0.1 + 0.2 * torch.rand(k, generator=g) for k in CLUSTERS]
    return (
        torch.randn(BATCH, DIM, generator=g),
        torch.randn(BATCH, DIM, generator=g),
        Prototypes(labels, centroids, phis),
    )


def loss_variants() -> dict[str, Callable[[], None]]:
    from lightly.loss import NTXentLoss
    from lightly_pcl import ProtoNCELoss

    q0, k, prototypes = _loss_inputs()
    anchor = NTXentLoss(temperature=0.2, memory_bank_size=(BANK, DIM))
    ours = ProtoNCELoss(temperature=0.2, memory_bank_size=(BANK, DIM), num_negative_prototypes=16384)

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


def kmeans_variants(num_points: int) -> dict[str, Callable[[], None]]:
    from lightly_pcl import faiss_available, kmeans

    x = torch.nn.functional.normalize(
        torch.randn(num_points, DIM, generator=torch.Generator().manual_seed(0)), dim=1
    )
    variants = {"k-means torch fallback": lambda: kmeans(x, 200, num_redo=1, backend="torch") and None}
    if faiss_available():
        variants["k-means faiss"] = lambda: kmeans(x, 200, num_redo=1, backend="faiss") and None
    return variants


def estep_variants(quick: bool) -> tuple[dict[str, Callable[[], None]], int]:
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
    model = example.build_model(cfg["width"])
    criterion = ProtoNCELoss(memory_bank_size=(cfg["bank"], 128))
    clustering = PrototypeClustering(num_clusters=cfg["num_clusters"], num_redo=1, progress=False)
    eval_x = (torch.from_numpy(x_tr).float().div(255).unsqueeze(1) - mean) / std
    cluster_loader = DataLoader(
        IndexedDataset(TensorDataset(eval_x, torch.from_numpy(y_tr))), batch_size=1024
    )
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.06, momentum=0.9)
    clustering.update(model.forward_momentum, cluster_loader)  # so the step below has prototypes
    generator = torch.Generator().manual_seed(0)
    bs = cfg["batch_size"]

    def train_step() -> None:
        idx = torch.randint(0, len(y_tr), (bs,), generator=generator)
        views = [transform(Image.fromarray(x_tr[int(i)], mode="L")) for i in idx]  # DataLoader work
        x_q, x_k = torch.stack([v[0] for v in views]), torch.stack([v[1] for v in views])
        model.update_momentum(0.99)
        loss = criterion(model(x_q), model.forward_momentum(x_k), clustering(idx))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def estep() -> None:
        model.eval()
        clustering.update(model.forward_momentum, cluster_loader)
        model.train()

    return {"training step": train_step, "E-step": estep}, len(y_tr) // bs


def _median_times(variants: dict[str, Callable[[], None]], repeats: int, warmup: int = 1) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    for _ in range(repeats):  # interleaved, so background load hits every variant alike
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
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
    cmd = [sys.executable, __file__, "--memory", group, name, *(["--quick"] if args.quick else [])]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    return float(json.loads(out)["delta_mb"])


def _variants(group: str, quick: bool) -> dict[str, Callable[[], None]]:
    if group == "loss":
        return loss_variants()
    if group == "kmeans":
        return kmeans_variants(5000 if quick else 50000)
    return estep_variants(quick)[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="smaller sizes and digits instead of Fashion-MNIST"
    )
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--memory", nargs=2, metavar=("GROUP", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
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
    print(f"command: python examples/pcl_benchmark.py {' '.join(sys.argv[1:])}")
    print(f"torch {torch.__version__}, 1 thread, medians of {repeats} interleaved repeats\n")
    rows = []
    for group, anchor in (("loss", "NTXentLoss (anchor)"), ("kmeans", "k-means faiss")):
        medians = _median_times(_variants(group, args.quick), repeats)
        base = medians.get(anchor, next(iter(medians.values())))
        for name, seconds in medians.items():
            rows.append((name, seconds, seconds / base, anchor, _peak_memory_mb(group, name, args)))
    variants, steps = estep_variants(args.quick)
    medians = _median_times(variants, max(3, repeats // 2))
    epoch = medians["training step"] * steps
    share = medians["E-step"] / (medians["E-step"] + epoch)
    base = medians["training step"]
    for name, seconds in medians.items():
        rows.append((name, seconds, seconds / base, "training step", _peak_memory_mb("estep", name, args)))

    print("| variant | median time (ms) | ratio | vs | peak RSS above baseline (MB) |")
    print("|---|---|---|---|---|")
    for name, seconds, ratio, anchor, mem in rows:
        print(f"| {name} | {1000 * seconds:.1f} | {ratio:.2f} | {anchor} | {mem:.1f} |")
    print()
    print(
        f"E-step share: training step {1000 * medians['training step']:.0f} ms x {steps} steps = "
        f"{epoch:.1f} s per epoch; E-step {medians['E-step']:.1f} s; share of the epoch {100 * share:.1f} %"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
