"""Metadata as data: rows travel with the images through timm's and torchvision's datasets and loaders."""

from __future__ import annotations

import csv
import gzip
import math
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torchvision
from PIL import Image
from timm.data import create_dataset
from timm.data.loader import fast_collate
from timm.data.mixup import FastCollateMixup
from timm_mdn import MetadataKernel
from timm_mdn.data import (
    MetadataCollate,
    MetadataDataset,
    MetadataPrefetchLoader,
    MetadataTable,
    create_metadata_loader,
)
from torch.utils.data import DataLoader, TensorDataset

SITES = ("A", "B", "C")


def _truth(name: str) -> tuple[str, float]:
    """Each file's (site, age), derived from its name so the test knows every row independently."""
    number = sum(map(ord, name))
    return SITES[number % 3], 20.0 + (number % 17) + 0.5


@pytest.fixture(scope="module")
def image_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ImageFolder tree (2 classes x 4 tiny PNGs) and metadata.csv keyed by relative path."""
    root = tmp_path_factory.mktemp("tree")
    rng = np.random.default_rng(0)
    rows = []
    for cls in ("cat", "dog"):
        (root / "train" / cls).mkdir(parents=True)
        for i in range(4):
            name = f"{cls}/{cls}{i}.png"
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / "train" / name)
            site, age = _truth(name)
            rows.append({"filename": name, "site": site, "age": age})
    rows.append({"filename": "other_split/x.png", "site": "A", "age": 1.0})  # extra rows are ignored
    with (root / "metadata.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, ["filename", "site", "age"])
        writer.writeheader()
        writer.writerows(rows[::-1])  # a different order than the dataset's
    return root


def _expected(names: list[str]) -> torch.Tensor:
    """[site=B, site=C, age] for each relative file name (treatment coding, level A the reference)."""
    out = []
    for name in names:
        site, age = _truth(name)
        out.append([float(site == "B"), float(site == "C"), age])
    return torch.tensor(out)


def test_timm_image_dataset_rows_follow_file_names(image_tree: Path) -> None:
    table = MetadataTable.from_csv(image_tree / "metadata.csv", categorical=["site"])
    assert table.columns == ("site=B", "site=C", "age") and table.levels == {"site": SITES}
    dataset = create_dataset("", root=str(image_tree / "train"))
    wrapped = MetadataDataset(dataset, table)
    names = [n.replace("\\", "/") for n in dataset.filenames()]
    torch.testing.assert_close(torch.stack([wrapped[i][-1] for i in range(len(wrapped))]), _expected(names))
    image, target, row = wrapped[5]
    assert isinstance(image, Image.Image) and target == 1 and row.shape == (3,)
    torch.testing.assert_close(wrapped.targets(), torch.tensor([0] * 4 + [1] * 4))


@pytest.mark.parametrize("match", ["relative", "basename"])
def test_torchvision_image_folder_by_relative_path_or_base_name(image_tree: Path, match: str) -> None:
    table = MetadataTable.from_csv(image_tree / "metadata.csv", categorical=["site"])
    if match == "basename":  # the same CSV keyed by bare file names: found by 'auto'
        keys = tuple(k.rsplit("/", 1)[-1] for k in table.keys or ())
        table = MetadataTable(table.values, table.columns, keys, table.levels)
    dataset = torchvision.datasets.ImageFolder(str(image_tree / "train"))
    wrapped = MetadataDataset(dataset, table)
    names = [str(Path(p).relative_to(image_tree / "train").as_posix()) for p, _ in dataset.samples]
    torch.testing.assert_close(wrapped.rows, _expected(names))


def test_timm_loader_with_prefetcher_and_kernel(image_tree: Path) -> None:
    dataset = MetadataDataset(
        create_dataset("", root=str(image_tree / "train")),
        MetadataTable.from_csv(image_tree / "metadata.csv", categorical=["site"]),
    )
    kernel = dataset.kernel()  # X = [target, site=B, site=C, age, 1]
    assert kernel.num_columns == 5 and kernel.remove == (1, 2, 3, 4)
    loader = create_metadata_loader(
        dataset, (3, 8, 8), batch_size=3, kernel=kernel, device=torch.device("cpu"), num_workers=0
    )
    assert isinstance(loader, MetadataPrefetchLoader) and len(loader) == 3
    batches = list(loader)
    assert [b[0].shape[0] for b in batches] == [3, 3, 2]
    inputs, targets, design = (torch.cat(parts) for parts in zip(*batches, strict=True))
    assert inputs.dtype == torch.float32 and abs(float(inputs.mean())) < 3  # normalised by the prefetcher
    torch.testing.assert_close(design, kernel.design(dataset.rows, targets))
    torch.testing.assert_close(design[:, 0], torch.tensor([0.0] * 4 + [1.0] * 4))
    assert len(list(loader)) == 3  # a second epoch pairs rows again from an empty queue


def test_timm_loader_without_prefetcher_in_worker_processes(image_tree: Path) -> None:
    dataset = MetadataDataset(
        create_dataset("", root=str(image_tree / "train")),
        MetadataTable.from_csv(image_tree / "metadata.csv", categorical=["site"]),
    )
    loader = create_metadata_loader(
        dataset, (3, 8, 8), batch_size=4, use_prefetcher=False, num_workers=2, persistent_workers=False
    )
    inputs, targets, rows = (torch.cat(parts) for parts in zip(*loader, strict=True))
    assert inputs.shape == (8, 3, 8, 8) and targets.tolist() == [0] * 4 + [1] * 4
    torch.testing.assert_close(rows, dataset.rows)  # no kernel: the raw rows


def test_prefetcher_puts_the_design_rows_on_the_device(image_tree: Path, device: torch.device) -> None:
    dataset = MetadataDataset(
        create_dataset("", root=str(image_tree / "train")),
        MetadataTable.from_csv(image_tree / "metadata.csv", categorical=["site"]),
    )
    kernel = dataset.kernel()
    loader = create_metadata_loader(
        dataset, (3, 8, 8), 4, kernel=kernel, device=device, num_workers=0, pin_memory=device.type == "cuda"
    )
    for inputs, targets, design in loader:
        assert inputs.device.type == targets.device.type == design.device.type == device.type
        assert design.shape == (targets.shape[0], kernel.num_columns)
        torch.testing.assert_close(design[:, 0].cpu(), targets.float().cpu())


def _write_idx(path: Path, array: np.ndarray) -> None:
    """An uncompressed IDX file (MNIST format) as torchvision's FashionMNIST reads it."""
    code = {np.dtype(np.uint8): 0x08}[array.dtype]
    header = bytes([0, 0, code, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.tobytes())


@pytest.fixture(scope="module")
def fashion_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 40-image FashionMNIST-format folder (classes 0 and 6)."""
    root = tmp_path_factory.mktemp("fmnist")
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for split, n in (("train", 40), ("t10k", 8)):
        _write_idx(raw / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        _write_idx(raw / f"{split}-labels-idx1-ubyte", np.tile(np.array([0, 6], dtype=np.uint8), n // 2))
    with gzip.open(raw / "unused.gz", "wb"):  # torchvision never looks at other files
        pass
    return root


def test_torchvision_fashion_mnist_rows_by_index_route_to_an_mdn_model(fashion_root: Path) -> None:
    dataset = create_dataset("torch/fashion_mnist", root=str(fashion_root), split="train")
    assert isinstance(dataset, torchvision.datasets.FashionMNIST)
    dataset.transform = torchvision.transforms.ToTensor()
    dataset.target_transform = lambda t: int(t == 6)
    colour = torch.linspace(0, 1, len(dataset)) + 0.3 * (dataset.targets == 6)
    wrapped = MetadataDataset(dataset, colour.numpy())
    kernel = MetadataKernel.from_columns(confounders=colour, labels=(dataset.targets == 6).long())
    loader = DataLoader(wrapped, batch_size=8, shuffle=True, collate_fn=MetadataCollate(kernel))
    model = timm.create_model(
        "mdn_resnet18", num_classes=2, in_chans=1, layers=(1, 1, 1, 1), mdn_kernel=kernel
    )
    images, targets, design = next(iter(loader))
    assert images.shape == (8, 1, 28, 28) and design.shape == (8, 3)
    torch.testing.assert_close(design[:, 0], targets.float())
    assert all(bool((design[i, 1] == colour).any()) for i in range(8))  # each row is one sample's colour
    model.train()
    out = model(images, metadata=design)
    out.sum().backward()
    shuffled = model(images, metadata=design.flip(0))  # other rows really reach the MDN layer
    assert not torch.allclose(out, shuffled)


def test_float_label_kernel_takes_integer_targets_as_numbers() -> None:
    y, cf = torch.tensor([0, 1, 0, 1, 1, 0]), torch.tensor([0.1, 0.9, 0.3, 0.7, 0.8, 0.2])
    kernel = MetadataKernel.from_columns(confounders=cf, labels=y.float())
    dataset = MetadataDataset(TensorDataset(torch.zeros(6, 2), y), cf)
    _, target, design = MetadataCollate(kernel)([dataset[i] for i in range(6)])
    torch.testing.assert_close(design, kernel.design(cf, y.float()))
    assert target.dtype == torch.int64


def test_fast_collate_base(image_tree: Path) -> None:
    dataset = MetadataDataset(
        TensorDataset(torch.zeros(4, 3, 2, 2, dtype=torch.uint8), torch.arange(4)), torch.ones(4, 2)
    )
    inputs, targets, rows = MetadataCollate(collate_fn=fast_collate)([dataset[i] for i in range(4)])
    assert inputs.dtype == torch.uint8 and targets.tolist() == [0, 1, 2, 3] and rows.shape == (4, 2)


def test_levels_carry_over_to_another_split(tmp_path: Path) -> None:
    train, val = tmp_path / "train.csv", tmp_path / "val.csv"
    train.write_text("filename,site\na.png,x\nb.png,z\nc.png,y\n")
    val.write_text("filename,site\nd.png,z\n")
    levels = MetadataTable.from_csv(train, categorical=["site"]).levels
    table = MetadataTable.from_csv(val, categorical=levels)
    assert table.values.dtype == torch.int64 and table.values.tolist() == [[2]]


def _csv(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "m.csv"
    path.write_text(text)
    return path


def _tree_dataset(image_tree: Path) -> torchvision.datasets.ImageFolder:
    return torchvision.datasets.ImageFolder(str(image_tree / "train"))


ERROR_CASES: list[tuple[str, Callable[[Path, Path], object], type[Exception], str]] = [
    (
        "length mismatch",
        lambda t, r: MetadataDataset(TensorDataset(torch.zeros(5)), torch.zeros(4)),
        ValueError,
        "4 rows but the dataset has 5",
    ),
    (
        "nan in array",
        lambda t, r: MetadataTable.from_array(torch.tensor([[0.0], [math.nan]])),
        ValueError,
        "row 1 (index 1)",
    ),
    (
        "inf in array",
        lambda t, r: MetadataDataset(TensorDataset(torch.zeros(2)), np.array([1.0, np.inf])),
        ValueError,
        "inf or NaN",
    ),
    ("wrong rank", lambda t, r: MetadataTable.from_array(torch.zeros(2, 2, 2)), ValueError, "shape (N, q)"),
    (
        "bool dtype",
        lambda t, r: MetadataTable.from_array(torch.zeros(2, 1, dtype=torch.bool)),
        TypeError,
        "real floating or integer",
    ),
    (
        "complex dtype",
        lambda t, r: MetadataTable.from_array(torch.zeros(2, 1, dtype=torch.complex64)),
        TypeError,
        "real floating or integer",
    ),
    ("string array", lambda t, r: MetadataTable.from_array(np.array(["a", "b"])), TypeError, "numeric array"),
    ("list table", lambda t, r: MetadataTable.from_array([1.0, 2.0]), TypeError, "torch.Tensor or numpy"),  # type: ignore[arg-type]
    (
        "missing file rows",
        lambda t, r: MetadataDataset(
            _tree_dataset(r), MetadataTable.from_csv(_csv(t, "filename,age\ncat/cat0.png,1\n"))
        ),
        ValueError,
        "7 of 8 files have no row",
    ),
    (
        "csv nan",
        lambda t, r: MetadataTable.from_csv(_csv(t, "filename,age\na.png,nan\n")),
        ValueError,
        "key 'a.png'",
    ),
    (
        "csv inf",
        lambda t, r: MetadataTable.from_csv(_csv(t, "filename,age\na.png,1\nb.png,-inf\n")),
        ValueError,
        "inf or NaN",
    ),
    (
        "csv not a number",
        lambda t, r: MetadataTable.from_csv(_csv(t, "filename,site\na.png,north\n")),
        ValueError,
        "line 2: column 'site' holds 'north'",
    ),
    (
        "csv empty cell",
        lambda t, r: MetadataTable.from_csv(_csv(t, "filename,age\na.png,\n")),
        ValueError,
        "line 2: column 'age' is empty",
    ),
    (
        "csv missing key column",
        lambda t, r: MetadataTable.from_csv(_csv(t, "path,age\na.png,1\n")),
        ValueError,
        "['filename'] not in the CSV header",
    ),
    (
        "csv missing column",
        lambda t, r: MetadataTable.from_csv(_csv(t, "filename,age\na.png,1\n"), columns=["bmi"]),
        ValueError,
        "['bmi'] not in the CSV header",
    ),
    (
        "csv no columns",
        lambda t, r: MetadataTable.from_csv(_csv(t, "filename\na.png\n")),
        ValueError,
        "no metadata columns",
    ),
    (
        "csv duplicate keys",
        lambda t, r: MetadataTable.from_csv(_csv(t, "filename,age\na.png,1\n./a.png,2\n")),
        ValueError,
        "'a.png' appears more than once",
    ),
    (
        "csv unknown level",
        lambda t, r: MetadataTable.from_csv(_csv(t, "filename,s\na.png,q\n"), categorical={"s": ("x", "y")}),
        ValueError,
        "level 'q', not one of",
    ),
    (
        "csv categorical not a column",
        lambda t, r: MetadataTable.from_csv(_csv(t, "filename,s\na.png,q\n"), categorical=["t"]),
        ValueError,
        "['t'] are not metadata columns",
    ),
    (
        "no file names",
        lambda t, r: MetadataDataset(
            TensorDataset(torch.zeros(1)), MetadataTable.from_csv(_csv(t, "filename,a\nx.png,1\n"))
        ),
        TypeError,
        "has no file names",
    ),
    (
        "bad match",
        lambda t, r: MetadataDataset(TensorDataset(torch.zeros(1)), torch.zeros(1), match="stem"),
        ValueError,
        "match must be",
    ),  # type: ignore[arg-type]
    ("not a dataset", lambda t, r: MetadataDataset(object(), torch.zeros(1)), TypeError, "map-style dataset"),
    (
        "sample not a tuple",
        lambda t, r: MetadataDataset([torch.zeros(1)], torch.zeros(1))[0],
        TypeError,
        "(image, target, ...) tuples",
    ),
    ("empty batch", lambda t, r: MetadataCollate()([]), ValueError, "batch is empty"),
    ("kernel type", lambda t, r: MetadataCollate(kernel="k"), TypeError, "kernel must be a MetadataKernel"),  # type: ignore[arg-type]
    (
        "mixup collate",
        lambda t, r: MetadataCollate(collate_fn=FastCollateMixup()),
        ValueError,
        "mixup/cutmix",
    ),
    (
        "rows do not fit the kernel",
        lambda t, r: MetadataCollate(MetadataKernel.from_columns(torch.rand(8)))(
            [(torch.zeros(1), 0, torch.zeros(2))]
        ),
        ValueError,
        "must have 1 column(s)",
    ),
    (
        "loader needs a MetadataDataset",
        lambda t, r: create_metadata_loader(_tree_dataset(r), 8, 2),
        TypeError,
        "must be a MetadataDataset",
    ),
    (
        "loader augmix",
        lambda t, r: create_metadata_loader(
            MetadataDataset(_tree_dataset(r), torch.zeros(8)), 8, 2, num_aug_splits=2
        ),
        ValueError,
        "num_aug_splits",
    ),
    (
        "prefetcher type",
        lambda t, r: MetadataPrefetchLoader(DataLoader([1])),
        TypeError,
        "timm's PrefetchLoader",
    ),  # type: ignore[arg-type]
]


@pytest.mark.parametrize(("case", "call", "error", "fragment"), ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_bad_metadata_is_a_clear_error(
    tmp_path: Path,
    image_tree: Path,
    case: str,
    call: Callable[[Path, Path], object],
    error: type[Exception],
    fragment: str,
) -> None:
    with pytest.raises(error, match=re.escape(fragment)):
        call(tmp_path, image_tree)


def test_duplicate_base_names_are_ambiguous(tmp_path: Path) -> None:
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        Image.new("RGB", (4, 4)).save(tmp_path / cls / "same.png")
    table = MetadataTable.from_csv(_csv(tmp_path, "filename,age\nsame.png,1\n"))
    with pytest.raises(ValueError, match="repeated base names"):
        MetadataDataset(torchvision.datasets.ImageFolder(str(tmp_path), allow_empty=True), table)
