r"""Metadata as data: each sample's metadata row travels with its image through timm's data pipeline.

Metadata Normalization (Lu et al., CVPR 2021, https://arxiv.org/abs/2104.09052) needs, for every batch, the
rows :math:`X_b` of the design matrix :math:`X` that the kernel :math:`(X^\top X)^{-1}` was built from. Here
they come from the dataset, like the targets:

- :class:`MetadataTable` holds the metadata of a dataset: an array keyed by sample index, or a CSV keyed by
  file name (categorical columns coded once, with levels reusable on other splits);
- :class:`MetadataDataset` wraps any map-style dataset (timm's ``create_dataset`` / ``ImageDataset``,
  torchvision's ``ImageFolder``, ``FashionMNIST``, ...) and yields ``(image, target, metadata_row)``; every
  row is looked up and checked (missing keys, lengths, non-finite values) once, at construction;
- :class:`MetadataCollate` stacks a batch, runs the usual collate (PyTorch's ``default_collate`` or timm's
  ``fast_collate``) on ``(image, target)`` and returns ``(input, target, X_b)`` with
  :math:`X_b` = ``kernel.design(rows, target)``;
- :func:`create_metadata_loader` is ``timm.data.create_loader`` with that collate, and
  :class:`MetadataPrefetchLoader` carries :math:`X_b` next to timm's own CUDA prefetcher.

The training step then routes :math:`X_b` to the model: ``model(input, metadata=X_b)``.
"""

from __future__ import annotations

import csv
import os
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from timm.data import create_loader
from timm.data.loader import PrefetchLoader, fast_collate
from timm.data.mixup import FastCollateMixup
from torch import Tensor
from torch.utils.data import Dataset, default_collate

from .kernel import MetadataKernel

__all__ = [
    "MetadataCollate",
    "MetadataDataset",
    "MetadataPrefetchLoader",
    "MetadataTable",
    "create_metadata_loader",
]

Match = Literal["auto", "relative", "basename"]
_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _normalise_key(key: str) -> str:
    key = key.strip().replace("\\", "/")
    return key[2:] if key.startswith("./") else key


@dataclass(frozen=True)
class MetadataTable:
    """The metadata of a dataset: one row of :math:`q` numbers per sample, keyed by index or by file name.

    Build it with :meth:`from_array` (row ``i`` belongs to sample ``i``) or :meth:`from_csv` (rows keyed by
    file name). Integer ``values`` are categorical levels :math:`0..L-1` (``MetadataKernel.from_columns``
    codes them); floating ones are continuous.

    Attributes:
        values: shape :math:`(N, q)`, floating or integer, finite.
        columns: the :math:`q` column names.
        keys: ``None`` (keyed by index) or :math:`N` distinct file names.
        levels: for each categorical CSV column, its levels in code order (reuse them on other splits).

    Raises:
        TypeError: if ``values`` is not a real floating or integer tensor.
        ValueError: if ``values`` is not 2-D, holds inf/NaN, or ``columns``/``keys`` do not match it.
    """

    values: Tensor
    columns: tuple[str, ...]
    keys: tuple[str, ...] | None = None
    levels: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        values = self.values
        if not isinstance(values, Tensor):
            raise TypeError(f"values must be a torch.Tensor, got {type(values).__name__}")
        if not (values.is_floating_point() or values.dtype in _INTEGER_DTYPES):
            raise TypeError(f"values must be a real floating or integer tensor, got dtype {values.dtype}")
        if values.dim() != 2:
            raise ValueError(f"values must have shape (N, q), got {tuple(values.shape)}")
        if values.is_floating_point():
            bad = ~torch.isfinite(values).all(dim=1)
            if bool(bad.any()):
                first = int(torch.nonzero(bad)[0])
                where = f"key {self.keys[first]!r}" if self.keys is not None else f"index {first}"
                raise ValueError(
                    f"values: {int(bad.sum())} row(s) hold inf or NaN, the first at row {first} ({where}); "
                    "metadata must be finite"
                )
        if len(self.columns) != values.shape[1]:
            raise ValueError(f"columns must name {values.shape[1]} column(s), got {len(self.columns)}")
        if self.keys is not None:
            if len(self.keys) != values.shape[0]:
                raise ValueError(
                    f"keys must have {values.shape[0]} entries like values, got {len(self.keys)}"
                )
            repeated = [key for key, count in Counter(self.keys).items() if count > 1]
            if repeated:
                raise ValueError(f"keys must be distinct, {repeated[0]!r} appears more than once")

    def __len__(self) -> int:
        return int(self.values.shape[0])

    @classmethod
    def from_array(cls, values: Tensor | np.ndarray, columns: Sequence[str] | None = None) -> MetadataTable:
        """Metadata keyed by sample index: row ``i`` of ``values`` (shape :math:`(N,)` or :math:`(N, q)`)."""
        if isinstance(values, np.ndarray):
            if values.dtype.kind not in "iuf":
                raise TypeError(f"values must be a numeric array, got dtype {values.dtype}")
            values = torch.from_numpy(np.ascontiguousarray(values))
        if isinstance(values, Tensor) and values.dim() == 1:
            values = values.unsqueeze(1)
        if not isinstance(values, Tensor):
            raise TypeError(f"values must be a torch.Tensor or numpy array, got {type(values).__name__}")
        names = tuple(columns) if columns is not None else tuple(f"m{j}" for j in range(values.shape[-1]))
        return cls(values=values, columns=names)

    @classmethod
    def from_csv(
        cls,
        path: str | os.PathLike[str],
        key: str = "filename",
        columns: Sequence[str] | None = None,
        categorical: Sequence[str] | Mapping[str, Sequence[str]] = (),
    ) -> MetadataTable:
        """Metadata keyed by file name, from a CSV file with a header row.

        Continuous columns are parsed as float. Categorical columns are coded by their sorted levels (or by
        the levels given, e.g. ``train_table.levels`` for a validation CSV). When every column is
        categorical the values are int64 codes (``MetadataKernel.from_columns`` treats them as categories);
        when both kinds are present each categorical column is treatment-coded into float 0/1 columns named
        ``"column=level"`` (its first level being the reference), so the table stays one float matrix.

        Args:
            path: the CSV file.
            key: the column holding file names, relative to the dataset root or bare base names
                (default: ``"filename"``).
            columns: the metadata columns, in order (default: every column but ``key``).
            categorical: names of categorical columns, or a mapping name -> levels in code order.

        Raises:
            ValueError: on a missing column, an empty cell, a non-numeric continuous value or an unknown level
                (each naming the file, line and column), non-finite values or duplicate keys.
        """
        path = Path(path)
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            header = list(reader.fieldnames or [])
            records = list(reader)
        names = list(columns) if columns is not None else [c for c in header if c != key]
        missing = [c for c in [key, *names] if c not in header]
        if missing:
            raise ValueError(f"{path}: column(s) {missing} not in the CSV header {header}")
        if not names:
            raise ValueError(f"{path}: no metadata columns besides the key column {key!r}")
        given = dict(categorical) if isinstance(categorical, Mapping) else {c: None for c in categorical}
        unknown = [c for c in given if c not in names]
        if unknown:
            raise ValueError(f"categorical: column(s) {unknown} are not metadata columns {names}")
        cells: dict[str, list[str]] = {c: [] for c in [key, *names]}
        for line, record in enumerate(records, start=2):
            for c in cells:
                value = (record.get(c) or "").strip()
                if not value:
                    raise ValueError(f"{path}, line {line}: column {c!r} is empty; every cell must be filled")
                cells[c].append(value)
        levels: dict[str, tuple[str, ...]] = {}
        coded: dict[str, Tensor] = {}
        for c in names:
            if c in given:
                levels[c] = tuple(given[c] or sorted(set(cells[c])))
                lookup = {level: i for i, level in enumerate(levels[c])}
                for line, value in enumerate(cells[c], start=2):
                    if value not in lookup:
                        raise ValueError(
                            f"{path}, line {line}: column {c!r} has level {value!r}, not one of {levels[c]}"
                        )
                coded[c] = torch.tensor([lookup[v] for v in cells[c]], dtype=torch.int64)
            else:
                numbers = []
                for line, value in enumerate(cells[c], start=2):
                    try:
                        numbers.append(float(value))
                    except ValueError:
                        raise ValueError(
                            f"{path}, line {line}: column {c!r} holds {value!r}, not a number; list the "
                            "column in categorical= if it is a category"
                        ) from None
                coded[c] = torch.tensor(numbers, dtype=torch.float32)
        keys = tuple(_normalise_key(k) for k in cells[key])
        if len(levels) == len(names):
            return cls(torch.stack([coded[c] for c in names], 1), tuple(names), keys, levels)
        parts, out_names = [], []
        for c in names:
            if c in levels:
                for code, level in enumerate(levels[c][1:], start=1):
                    parts.append((coded[c] == code).float())
                    out_names.append(f"{c}={level}")
            else:
                parts.append(coded[c])
                out_names.append(c)
        return cls(torch.stack(parts, 1), tuple(out_names), keys, levels)


def _sample_names(dataset: Any, match: Literal["relative", "basename"]) -> list[str]:
    """File names of every sample: timm's ``filename(i)`` or torchvision's ``samples``."""
    if callable(getattr(dataset, "filenames", None)) and not isinstance(dataset, MetadataDataset):
        names = dataset.filenames(basename=match == "basename")
    elif isinstance(getattr(dataset, "samples", None), Sequence):
        root = str(getattr(dataset, "root", ""))
        paths = [str(sample[0]) for sample in dataset.samples]
        names = [os.path.basename(p) if match == "basename" else os.path.relpath(p, root) for p in paths]
    else:
        raise TypeError(
            f"{type(dataset).__name__} has no file names (neither filenames() like timm's ImageDataset nor "
            ".samples like torchvision's ImageFolder); key the metadata by index (MetadataTable.from_array)"
        )
    return [_normalise_key(str(n)) for n in names]


class MetadataDataset(Dataset[tuple[Any, ...]]):
    """Any map-style dataset, each sample extended by its metadata row: ``(image, target, ..., row)``.

    Rows are aligned to the dataset once, here: by index for an index-keyed table (lengths must agree), by
    file name for a CSV table (timm's ``ImageDataset.filename(i)``, torchvision's ``ImageFolder.samples``;
    extra CSV rows, e.g. other splits', are ignored). ``transform`` reads and writes the wrapped dataset's, so
    ``timm.data.create_loader`` can install its transforms through the wrapper.

    Args:
        dataset: a map-style dataset returning tuples ``(image, target, ...)``.
        metadata: a :class:`MetadataTable`, or an array/tensor of shape :math:`(N,)` / :math:`(N, q)` keyed by
            index.
        match: how CSV keys name files: ``"relative"`` (path relative to the dataset root), ``"basename"``, or
            ``"auto"`` (base names when no key holds a ``/``) (default: ``"auto"``).

    Raises:
        ValueError: on mismatched lengths, file names missing from the table (the count and the first few),
            duplicate base names under ``"basename"``, or non-finite metadata.
        TypeError: if the table is keyed by file name and the dataset has no file names.
    """

    def __init__(
        self, dataset: Any, metadata: MetadataTable | Tensor | np.ndarray, match: Match = "auto"
    ) -> None:
        if not callable(getattr(dataset, "__getitem__", None)) or not callable(
            getattr(dataset, "__len__", None)
        ):
            raise TypeError(
                f"dataset must be a map-style dataset (__getitem__, __len__), got {type(dataset).__name__}"
            )
        table = metadata if isinstance(metadata, MetadataTable) else MetadataTable.from_array(metadata)
        if match not in ("auto", "relative", "basename"):
            raise ValueError(f"match must be 'auto', 'relative' or 'basename', got {match!r}")
        self.dataset = dataset
        self.table = table
        n = len(dataset)
        if table.keys is None:
            if len(table) != n:
                raise ValueError(
                    f"metadata has {len(table)} rows but the dataset has {n} samples; one row each"
                )
            self.rows = table.values
            return
        if match == "auto":
            match = "relative" if any("/" in k for k in table.keys) else "basename"
        names = _sample_names(dataset, match)
        if match == "basename" and len(set(names)) != len(names):
            raise ValueError(
                "match='basename': the dataset has repeated base names; key the CSV by relative path"
            )
        index = {k: i for i, k in enumerate(table.keys)}
        missing = [name for name in names if name not in index]
        if missing:
            raise ValueError(
                f"metadata: {len(missing)} of {n} files have no row in the table (keys matched by {match}), "
                f"e.g. {missing[:3]}"
            )
        self.rows = table.values[torch.tensor([index[name] for name in names], dtype=torch.long)]

    @property
    def transform(self) -> Any:
        """The wrapped dataset's ``transform``."""
        return getattr(self.dataset, "transform", None)

    @transform.setter
    def transform(self, value: Any) -> None:
        self.dataset.transform = value

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        sample = self.dataset[index]
        if not isinstance(sample, (tuple, list)):
            raise TypeError(
                f"the dataset must return (image, target, ...) tuples, got {type(sample).__name__}"
            )
        return (*sample, self.rows[index])

    def targets(self) -> Tensor:
        """Every sample's target without loading images (``dataset.targets`` or timm's reader samples)."""
        targets = getattr(self.dataset, "targets", None)
        if targets is None:
            samples = getattr(getattr(self.dataset, "reader", None), "samples", None)
            if samples is None:
                raise TypeError(f"{type(self.dataset).__name__} lists no targets; pass the labels yourself")
            targets = [target for _, target in samples]
        return torch.as_tensor(targets)

    def kernel(self, labels: bool = True) -> MetadataKernel:
        r"""The training-set kernel :math:`(X^\top X)^{-1}` with :math:`X = [\text{targets}, \text{rows}, 1]`.

        Args:
            labels: keep the targets in the regression (the paper's choice) (default: ``True``).
        """
        return MetadataKernel.from_columns(self.rows, self.targets().long() if labels else None)


class MetadataCollate:
    r"""Collate ``(image, target, ..., row)`` samples into ``(input, target, ..., X_b)``.

    Args:
        kernel: when given, :math:`X_b` = ``kernel.design(rows, target)`` (the target fills the label columns
            when the kernel has any; a floating label column takes integer targets as numbers); otherwise the
            stacked rows.
        collate_fn: the collate for the rest of the sample (default: ``torch.utils.data.default_collate``;
            timm's ``fast_collate`` for its prefetcher).

    Raises:
        ValueError: on an empty batch, or from ``kernel.design`` on rows that do not fit the kernel.
    """

    def __init__(
        self, kernel: MetadataKernel | None = None, collate_fn: Callable[[list[Any]], Any] | None = None
    ):
        if kernel is not None and not isinstance(kernel, MetadataKernel):
            raise TypeError(f"kernel must be a MetadataKernel or None, got {type(kernel).__name__}")
        if isinstance(collate_fn, FastCollateMixup):
            raise ValueError(
                "collate_fn: mixup/cutmix would mix the images but not their metadata rows; not supported"
            )
        self.kernel = kernel
        self.collate_fn = collate_fn or default_collate

    def __call__(self, batch: Sequence[Sequence[Any]]) -> tuple[Any, ...]:
        """Collate one batch."""
        if len(batch) == 0:
            raise ValueError("batch is empty; expected at least one (image, target, row) sample")
        rows = torch.stack([torch.as_tensor(sample[-1]) for sample in batch])
        collated = self.collate_fn([tuple(sample[:-1]) for sample in batch])
        if self.kernel is None:
            return (*collated, rows)
        target = collated[1]
        labels = None
        if self.kernel.label_levels:
            labels = target
            if all(level == 0 for level in self.kernel.label_levels) and not target.is_floating_point():
                labels = target.to(torch.get_default_dtype())
        return (*collated, self.kernel.design(rows, labels))


class _SplitMetadata:
    """Yields ``(input, target)`` of a metadata loader, queueing each batch's ``X_b`` in order."""

    def __init__(self, loader: Any, queue: deque[Tensor]) -> None:
        self.loader = loader
        self.queue = queue

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for input, target, metadata in self.loader:
            self.queue.append(metadata)
            yield input, target

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:  # sampler, batch_sampler, dataset, collate_fn
        return getattr(self.__dict__["loader"], name)


class MetadataPrefetchLoader:
    """timm's ``PrefetchLoader`` with each batch's metadata: yields ``(input, target, X_b)`` on its device.

    timm's prefetcher unpacks exactly ``(input, target)`` pairs; this wrapper feeds it the pairs, keeps the
    metadata in a queue (the prefetcher reads one batch ahead and yields in order), and moves :math:`X_b`
    (a few columns) to the device with ``non_blocking=True`` on the consumer's stream as its batch is yielded.
    Random erasing and normalisation stay the prefetcher's; mixup (``FastCollateMixup``) is not supported.

    Args:
        loader: timm's ``PrefetchLoader`` over a loader whose batches are ``(input, target, X_b)``.
    """

    def __init__(self, loader: PrefetchLoader) -> None:
        if not isinstance(loader, PrefetchLoader):
            raise TypeError(f"loader must be timm's PrefetchLoader, got {type(loader).__name__}")
        self.prefetcher = loader
        self._queue: deque[Tensor] = deque()
        if not isinstance(loader.loader, _SplitMetadata):
            loader.loader = _SplitMetadata(loader.loader, self._queue)  # type: ignore[assignment]
        else:
            self._queue = loader.loader.queue

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        self._queue.clear()
        device = self.prefetcher.device
        for input, target in self.prefetcher:
            yield input, target, self._queue.popleft().to(device, non_blocking=True)

    def __len__(self) -> int:
        return len(self.prefetcher)

    @property
    def sampler(self) -> Any:
        """The underlying loader's sampler (``set_epoch`` under DDP)."""
        return self.prefetcher.sampler

    @property
    def dataset(self) -> Any:
        """The :class:`MetadataDataset`."""
        return self.prefetcher.dataset


def create_metadata_loader(
    dataset: MetadataDataset,
    input_size: int | tuple[int, int] | tuple[int, int, int],
    batch_size: int,
    kernel: MetadataKernel | None = None,
    use_prefetcher: bool = True,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    **kwargs: Any,
) -> Any:
    """``timm.data.create_loader`` for a :class:`MetadataDataset`: batches are ``(input, target, X_b)``.

    Everything of ``create_loader`` applies (transforms, ``distributed`` samplers, workers, ``device``); the
    collate is wrapped in :class:`MetadataCollate` and, with ``use_prefetcher=True``, timm's prefetcher in
    :class:`MetadataPrefetchLoader`. Not supported: mixup/cutmix collates, ``num_aug_splits`` (AugMix) and
    scheduled input sizes (``input_size_choices``), which re-wrap the dataset's samples.

    Args:
        dataset: the :class:`MetadataDataset`.
        input_size: as ``create_loader``.
        batch_size: as ``create_loader``.
        kernel: turns rows into design rows, see :class:`MetadataCollate` (default: ``None``, raw rows).
        use_prefetcher: as ``create_loader`` (default: ``True``, timm's default).
        collate_fn: the base collate (default: ``fast_collate`` with the prefetcher, else
            ``default_collate``).
        **kwargs: more ``create_loader`` arguments.

    Raises:
        TypeError: if ``dataset`` is not a :class:`MetadataDataset`.
        ValueError: for the unsupported options above.
    """
    if not isinstance(dataset, MetadataDataset):
        raise TypeError(f"dataset must be a MetadataDataset, got {type(dataset).__name__}")
    for option in ("num_aug_splits", "input_size_choices"):
        if kwargs.get(option):
            raise ValueError(f"{option}: not supported with metadata (the dataset's samples are re-wrapped)")
    base = collate_fn or (fast_collate if use_prefetcher else default_collate)
    loader = create_loader(
        dataset,  # type: ignore[arg-type]  # map-style, with the transform attribute create_loader sets
        input_size,
        batch_size,
        use_prefetcher=use_prefetcher,
        collate_fn=MetadataCollate(kernel, base),
        **kwargs,
    )
    return MetadataPrefetchLoader(loader) if isinstance(loader, PrefetchLoader) else loader
