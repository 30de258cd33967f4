"""PCL vs MoCo on Fashion-MNIST with Lightly and PyTorch Lightning (graftkit ``lightly_pcl``).

Both methods share everything but the loss: the same small CNN, ``MoCoProjectionHead``, Lightly's
``MoCoV2Transform`` views, memory bank, optimiser, schedule, epochs and seeds, all in ``PCLLightningModule``.
MoCo trains with the InfoNCE instance term alone (``num_clusters=()``: exactly Lightly's
``NTXentLoss(memory_bank_size=...)``); PCL trains with ``ProtoNCELoss`` after ``--warmup-epochs`` of the same
InfoNCE, running the E-step (``PrototypeClustering``) at the start of every later epoch. After training:

- kNN top-1 accuracy (Lightly's ``knn_predict``, k=200, t=0.1) of the query backbone, train bank -> test set;
- AMI of k-means (K = 10 classes) on the backbone features of the training set against the labels;
- E-step seconds as a share of the epoch (E-step + training steps + data loading, validation excluded).

    python examples/pcl_fashion_mnist.py --out out/pcl            # full: Fashion-MNIST 60k+10k, 3 seeds
    python examples/pcl_fashion_mnist.py --quick --out out/demo   # quick: scikit-learn digits, < 90 s

Full mode reads the four idx files of the Debian package ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist``; ``--data-dir`` to override). Runs are separate processes with one
thread each, ``--jobs`` at a time; each writes ``runs/<method>_seed<s>.json`` and a log under ``--out``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
FULL = dict(
    epochs=10, warmup_epochs=2, batch_size=256, bank=4096, num_clusters=(50, 100, 200), width=16, lr=0.06
)
QUICK = dict(
    epochs=6, warmup_epochs=2, batch_size=128, bank=512, num_clusters=(15, 30, 60), width=16, lr=0.06
)


# ----------------------------------------------------------------------------------------------- data
def read_idx(path: Path) -> np.ndarray:
    """Read a (gzipped) idx file: magic 0x0000 | dtype 0x08 (uint8) | ndim, then big-endian int32 dims."""
    with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as handle:
        data = handle.read()
    if data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte idx file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims).copy()


def load_fashion_mnist(data_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    missing = [name for name in FASHION_FILES.values() if not (data_dir / name).is_file()]
    if missing:
        raise SystemExit(
            f"Fashion-MNIST not found in {data_dir} (missing {', '.join(missing)}).\n"
            "Install the Debian package:  sudo apt-get install dataset-fashion-mnist\n"
            "(`dpkg -L dataset-fashion-mnist` lists its four idx files), or pass --data-dir, or use --quick."
        )
    arrays = {key: read_idx(data_dir / name) for key, name in FASHION_FILES.items()}
    return arrays["train_images"], arrays["train_labels"], arrays["test_images"], arrays["test_labels"]


def load_digits_upsampled(size: int = 16) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's 1797 8x8 digits, bilinearly upsampled to ``size`` px; stratified 80/20 split, seed 0."""
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    raw = (digits.images * (255.0 / 16.0)).astype(np.uint8)
    images = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR)) for im in raw])
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, digits.target, test_size=0.2, stratify=digits.target, random_state=0
    )
    return x_tr, y_tr.astype(np.int64), x_te, y_te.astype(np.int64)


# ----------------------------------------------------------------------------------------------- one run
def small_cnn(width: int):
    from torch import nn

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    return nn.Sequential(
        *block(1, width),
        nn.MaxPool2d(2),
        *block(width, 2 * width),
        nn.MaxPool2d(2),
        *block(2 * width, 4 * width),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


def build_model(width: int):
    """Small CNN + ``MoCoProjectionHead(4w, 512, 128)``, channels-last (2-3x faster convolutions on CPU)."""
    import torch
    from lightly_pcl import PCL

    model = PCL(small_cnn(width), input_dim=4 * width, hidden_dim=512, output_dim=128)
    return model.to(memory_format=torch.channels_last)


def run_one(method: str, seed: int, args: argparse.Namespace, cfg: dict) -> dict:
    """Train one (method, seed) in this process with pl.Trainer; return metrics and timings."""
    import pytorch_lightning as pl
    import torch
    import torch.nn.functional as F
    from lightly.data import LightlyDataset
    from lightly.transforms import MoCoV2Transform
    from lightly.utils.benchmarking import knn_predict
    from lightly_pcl import IndexedDataset, PCLLightningModule
    from PIL import Image
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_mutual_info_score
    from torch.utils.data import DataLoader, Dataset, TensorDataset

    t0 = time.perf_counter()
    torch.set_num_threads(1)
    pl.seed_everything(seed, workers=True, verbose=False)
    x_tr, y_tr, x_te, y_te = load_digits_upsampled() if args.quick else load_fashion_mnist(args.data_dir)
    mean, std = float(x_tr.mean() / 255.0), float(x_tr.std() / 255.0)

    class ArrayImages(Dataset):
        """(PIL image, target) pairs with a ``transform`` attribute, like a torchvision dataset."""

        transform = None

        def __len__(self) -> int:
            return len(y_tr)

        def __getitem__(self, i: int):
            image = Image.fromarray(x_tr[i], mode="L")
            return (self.transform(image) if self.transform else image), int(y_tr[i])

    def tensors(images: np.ndarray, labels: np.ndarray) -> TensorDataset:
        x = (torch.from_numpy(images).float().div(255.0).unsqueeze(1) - mean) / std
        return TensorDataset(x, torch.from_numpy(labels).long())

    transform = MoCoV2Transform(
        input_size=x_tr.shape[1], cj_sat=0.0, cj_hue=0.0, random_gray_scale=0.0, gaussian_blur=0.0,
        normalize={"mean": [mean], "std": [std]},
    )  # fmt: skip
    train_set = IndexedDataset(LightlyDataset.from_torch_dataset(ArrayImages(), transform=transform))
    eval_train, eval_test = tensors(x_tr, y_tr), tensors(x_te, y_te)
    train_loader = DataLoader(train_set, batch_size=cfg["batch_size"], shuffle=True, drop_last=True)
    knn_loader = DataLoader(eval_train, batch_size=256)
    test_loader = DataLoader(eval_test, batch_size=256)

    pcl = method == "pcl"
    module = PCLLightningModule(
        small_cnn(cfg["width"]), input_dim=4 * cfg["width"], hidden_dim=512, output_dim=128,
        memory_bank_size=cfg["bank"], num_clusters=cfg["num_clusters"] if pcl else (),
        cluster_dataloader=DataLoader(IndexedDataset(eval_train), batch_size=256) if pcl else None,
        clustering_kwargs={"num_redo": 1, "seed": seed, "progress": False}, loss_kwargs={"seed": seed},
        warmup_epochs=cfg["warmup_epochs"], lr=cfg["lr"] * cfg["batch_size"] / 256, weight_decay=5e-4,
        ema_momentum=0.99, knn_dataloader=knn_loader, num_classes=10,
    )  # fmt: skip
    model = module.model.to(memory_format=torch.channels_last)  # 2-3x faster convolutions on CPU

    class EpochLog(pl.Callback):
        def __init__(self) -> None:
            self.losses: list[dict[str, float]] = []
            self._sums: dict[str, float] = {}
            self._count = 0

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            for key in ("train_loss", "train_loss_instance", "train_loss_prototype"):
                if key in trainer.callback_metrics:
                    self._sums[key] = self._sums.get(key, 0.0) + float(trainer.callback_metrics[key])
            self._count += 1

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            self.losses.append({k: v / max(self._count, 1) for k, v in self._sums.items()})
            self._sums, self._count = {}, 0

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self._report(pl_module)  # the module records an epoch's timing after the callbacks' epoch end

        def on_train_end(self, trainer, pl_module) -> None:
            self._report(pl_module)

        def _report(self, pl_module) -> None:
            if pl_module.epoch_timings and len(pl_module.epoch_timings) == len(self.losses):
                t, loss = pl_module.epoch_timings[-1], self.losses[-1]["train_loss"]
                print(
                    f"[{method} seed {seed}] epoch {int(t['epoch'])}: loss {loss:.4f}, epoch "
                    f"{t['epoch_seconds']:.1f} s (CPU {t['epoch_cpu_seconds']:.1f} s), "
                    f"E-step {t['estep_seconds']:.1f} s (CPU {t['estep_cpu_seconds']:.1f} s)",
                    flush=True,
                )

    log = EpochLog()
    trainer = pl.Trainer(
        max_epochs=cfg["epochs"], accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        check_val_every_n_epoch=cfg["epochs"], callbacks=[log], deterministic=False,
    )  # fmt: skip
    print(f"[{method} seed {seed}] setup {time.perf_counter() - t0:.1f} s", flush=True)
    start = time.perf_counter()
    trainer.fit(module, train_loader, test_loader)
    train_seconds = time.perf_counter() - start

    # AMI of k-means (K = 10) on the L2-normalised backbone features of the training set.
    model.eval()
    with torch.no_grad():
        feats = torch.cat([F.normalize(model.forward_features(x), dim=1) for x, _ in knn_loader]).numpy()
        raw_pred = None
        if method == "moco":  # the same for every run: a reference point for the table
            raw_bank = F.normalize(eval_train.tensors[0].flatten(1), dim=1).t().contiguous()
            raw_test = F.normalize(eval_test.tensors[0].flatten(1), dim=1)
            raw_pred = torch.cat([
                knn_predict(chunk, raw_bank, eval_train.tensors[1], 10, 200, 0.1)[:, 0]
                for chunk in raw_test.split(1024)
            ])  # fmt: skip
    ami = adjusted_mutual_info_score(y_tr, KMeans(10, n_init=5, random_state=0).fit_predict(feats))
    return {
        "method": method,
        "seed": seed,
        "knn_top1": module.knn_accuracies[-1],
        "ami": float(ami),
        "raw_pixel_knn_top1": None
        if raw_pred is None
        else float((raw_pred == eval_test.tensors[1]).float().mean()),
        "epoch_timings": module.epoch_timings,
        "losses": log.losses,
        "train_seconds": train_seconds,
        "num_train": len(y_tr),
        "num_test": len(y_te),
    }


# ----------------------------------------------------------------------------------------------- driver
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="scikit-learn digits, a few epochs (< 90 s)")
    parser.add_argument("--out", type=Path, default=Path("out/pcl_fashion_mnist"), help="output folder")
    parser.add_argument("--data-dir", type=Path, default=FASHION_DIR, help="folder with the 4 idx(.gz) files")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2 (quick: 0 1)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--warmup-epochs", type=int, default=None)
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel, one thread each (default: 2)")
    parser.add_argument("--skip-existing", action="store_true", help="reuse runs/*.json already in --out")
    parser.add_argument("--report-only", action="store_true", help="only rebuild the report from runs/*.json")
    parser.add_argument("--run-one", nargs=2, metavar=("METHOD", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    if args.epochs is not None:
        cfg["epochs"] = args.epochs
    if args.warmup_epochs is not None:
        cfg["warmup_epochs"] = args.warmup_epochs
    out: Path = args.out
    (out / "runs").mkdir(parents=True, exist_ok=True)

    if args.run_one:
        method, seed = args.run_one[0], int(args.run_one[1])
        result = run_one(method, seed, args, cfg)
        (out / "runs" / f"{method}_seed{seed}.json").write_text(json.dumps(result, indent=1))
        return 0

    if not args.quick and not args.report_only:
        load_fashion_mnist(args.data_dir)  # fail fast with the install hint
    seeds = args.seeds if args.seeds is not None else ([0, 1] if args.quick else [0, 1, 2])
    jobs = [(method, seed) for seed in seeds for method in ("moco", "pcl")]
    done = {job for job in jobs if (out / "runs" / f"{job[0]}_seed{job[1]}.json").is_file()}
    todo = [] if args.report_only else [job for job in jobs if not (args.skip_existing and job in done)]
    forwarded = ["--out", str(out), "--data-dir", str(args.data_dir)]
    forwarded += ["--epochs", str(cfg["epochs"]), "--warmup-epochs", str(cfg["warmup_epochs"])]
    forwarded += ["--quick"] if args.quick else []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    (out / "logs").mkdir(exist_ok=True)

    def launch(method: str, seed: int) -> tuple[str, int, int]:
        cmd = [sys.executable, __file__, "--run-one", method, str(seed), *forwarded]
        with open(out / "logs" / f"{method}_seed{seed}.log", "w") as logfile:
            rc = subprocess.run(
                cmd, stdout=logfile, stderr=subprocess.STDOUT, env=env, check=False
            ).returncode
        return method, seed, rc

    from tqdm.auto import tqdm

    start = time.perf_counter()
    failures = []
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = [pool.submit(launch, m, s) for m, s in todo]
        for future in tqdm(as_completed(futures), total=len(futures), desc="PCL vs MoCo runs", unit="run"):
            method, seed, rc = future.result()
            if rc != 0:
                failures.append(f"{method} seed {seed} (see {out / 'logs' / f'{method}_seed{seed}.log'})")
    wall = None if args.report_only else time.perf_counter() - start
    if failures:
        print("failed runs: " + ", ".join(failures), file=sys.stderr)
        return 1
    results = [json.loads((out / "runs" / f"{m}_seed{s}.json").read_text()) for m, s in jobs]
    from pcl_report import write_report

    command = "python examples/pcl_fashion_mnist.py " + " ".join(sys.argv[1:] if argv is None else argv)
    write_report(results, out, cfg, command=command, quick=args.quick, seeds=seeds, wall_seconds=wall)
    print(f"report: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
