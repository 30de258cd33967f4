"""examples/mdn_timm_train.py: timm's training loop + MDN: metadata from the data, EMA, AMP, checkpoints."""

from __future__ import annotations

import gzip
import json
from contextlib import nullcontext
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import timm
import torch
from timm.models import load_checkpoint
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from timm_mdn import MetadataKernel, metadata_norm_layers

from integration_tests.helpers.examples import load_example


@pytest.fixture(scope="module")
def example() -> ModuleType:
    return load_example("mdn_timm_train.py")


def _write_idx_gz(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.tobytes())


@pytest.fixture(scope="module")
def fmnist_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Fashion-MNIST-format files: a brighter blob for class 6 than for class 0, and some class-1 images."""
    root = tmp_path_factory.mktemp("fmnist")
    rng = np.random.default_rng(0)
    for split, n in (("train", 240), ("t10k", 60)):
        labels = np.resize(np.array([0, 6, 1], dtype=np.uint8), n)
        images = rng.integers(0, 60, (n, 28, 28), dtype=np.uint8)
        images[labels == 6, 8:20, 8:20] += 120
        _write_idx_gz(root / f"{split}-images-idx3-ubyte.gz", images)
        _write_idx_gz(root / f"{split}-labels-idx1-ubyte.gz", labels)
    return root


def _args(example: ModuleType, **overrides: object) -> object:
    parser_defaults = dict(layers=[1, 1, 1, 1], channels=[8, 16, 16, 32])
    return example.Namespace(**(parser_defaults | overrides))


def _batches(
    example: ModuleType, fmnist_dir: Path, n: int = 24
) -> tuple[list[tuple[torch.Tensor, ...]], MetadataKernel]:
    data, kernel = example.build_data(fmnist_dir, seed=0, train_size=n)
    loader = example.create_metadata_loader(
        data["train"], (3, 28, 28), 8, kernel=kernel, use_prefetcher=False, mean=example.MEAN, std=example.STD
    )
    return list(loader), kernel


def test_quick_run_reports_every_model_and_saves_loadable_checkpoints(
    example: ModuleType, fmnist_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    argv = ["--quick", "--device", "cpu", "--out", str(out), "--fmnist-dir", str(fmnist_dir)]
    argv += ["--channels", "8", "16", "16", "32", "--batch-size", "32", "--methods", "baseline", "mdn_all"]
    assert example.main(argv) == 0
    report = (out / "report.md").read_text()
    for label in ("| baseline |", "| baseline, EMA |", "| MDN at every BN |", "| MDN at every BN, EMA |"):
        assert label in report
    assert (out / "curves.png").stat().st_size > 0
    results = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in results] == ["baseline", "mdn_all"]
    for r in results:
        assert len(r["history"]) == 2 and all(np.isfinite(v) for v in r["final"].values())
        assert 0 <= r["final"]["ema_test_reversed_bacc"] <= 1
    # The MDN checkpoint (model and EMA, running beta included) loads strictly into a fresh timm model.
    kernel = MetadataKernel.from_columns(torch.rand(8), torch.arange(8) % 2)
    fresh = timm.create_model(
        "mdn_resnet18", num_classes=2, layers=(1, 1, 1, 1), channels=(8, 16, 16, 32), mdn_sites="all"
    )
    load_checkpoint(fresh, results[1]["best_checkpoint"], use_ema=True, strict=True)
    layers = metadata_norm_layers(fresh)
    assert len(layers) > 1 and layers[-1].running_beta.shape == (kernel.num_columns, 32)
    assert all(torch.isfinite(layer.running_beta).all() for layer in layers)


def test_ema_created_before_the_first_step_follows_under_bf16_autocast(
    example: ModuleType, fmnist_dir: Path
) -> None:
    batches, kernel = _batches(example, fmnist_dir)
    torch.manual_seed(0)
    model = example.create("mdn", kernel, _args(example))
    ema = ModelEmaV3(model, decay=0.5)  # before the first step, as timm's train.py does
    optimizer = create_optimizer_v2(model, opt="adamw", lr=1e-2)
    scheduler, _ = create_scheduler_v2(
        optimizer, sched="cosine", num_epochs=2, updates_per_epoch=len(batches)
    )

    def autocast() -> torch.autocast:
        return torch.autocast("cpu", dtype=torch.bfloat16)

    _, updates = example.train_one_epoch(model, batches, optimizer, scheduler, ema, 0, 0, "mdn", autocast)
    assert updates == len(batches) == 3
    (beta,), (ema_beta,) = (
        [m.running_beta for m in metadata_norm_layers(net)] for net in (model, ema.module)
    )
    assert beta.dtype == ema_beta.dtype == torch.float32 and torch.isfinite(ema_beta).all()
    assert ema_beta.shape == beta.shape and ema_beta.abs().sum() > 0  # the EMA's running beta follows
    metrics = example.evaluate(ema.module, batches, "mdn", autocast)
    assert 0 <= metrics["bacc"] <= 1 and np.isfinite(metrics["dcor0"])


def test_non_finite_loss_stops_before_the_optimizer_step(example: ModuleType, fmnist_dir: Path) -> None:
    batches, kernel = _batches(example, fmnist_dir)
    model = example.create("baseline", kernel, _args(example))
    ema = ModelEmaV3(model, decay=0.5)
    optimizer = create_optimizer_v2(model, opt="adamw", lr=1e-2)
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=2, updates_per_epoch=2)
    _, updates = example.train_one_epoch(model, batches[:1], optimizer, scheduler, ema, 0, 0, "baseline")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    poisoned = [(x, y, m) for x, y, m in batches]
    poisoned[1] = (torch.full_like(batches[1][0], float("nan")), *batches[1][1:])
    with pytest.raises(FloatingPointError, match=r"the loss is nan at epoch 3, step 1; the parameters are"):
        example.train_one_epoch(
            model, poisoned, optimizer, scheduler, ema, 3, updates, "baseline", nullcontext
        )
    after = dict(model.named_parameters())
    # Step 0 of epoch 3 was finite and applied; the NaN batch reached neither the optimizer nor the EMA
    # (BatchNorm's running statistics did see its forward, as in timm's train.py).
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in after)
    assert all(torch.isfinite(v).all() for v in ema.module.state_dict().values() if v.is_floating_point())


def test_missing_data_is_a_clear_exit(
    example: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert example.main(["--quick", "--out", str(tmp_path), "--fmnist-dir", str(tmp_path / "none")]) == 2
    assert "dataset-fashion-mnist" in capsys.readouterr().err
