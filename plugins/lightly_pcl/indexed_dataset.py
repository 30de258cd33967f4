"""A dataset wrapper that yields each sample's dataset index, which PCL's E-step and loss need."""

from __future__ import annotations

from collections.abc import Sized
from typing import Any, Generic, NamedTuple, TypeVar

from torch.utils.data import Dataset, IterableDataset

__all__ = ["IndexedDataset", "IndexedSample", "unpack_indexed_batch"]

T_co = TypeVar("T_co", covariant=True)


class IndexedSample(NamedTuple):
    """One sample and its dataset index; the default collate keeps the pair, so a batch is one too.

    Attributes:
        sample: What the wrapped dataset returns, e.g. ``(views, target, filename)`` for a
            ``LightlyDataset`` with a multi-view transform or ``(image, target)`` for torchvision datasets.
        index: The position in the dataset (an ``int``; a ``(B,)`` long tensor after collation).
    """

    sample: Any
    index: Any


class IndexedDataset(Dataset[IndexedSample], Generic[T_co]):
    """Wrap a map-style dataset so that item ``i`` is ``IndexedSample(dataset[i], i)``.

    PCL clusters the whole training set by dataset index and looks up each training sample's prototypes by
    that index. Lightly's ``LightlyDataset`` yields ``(image, target, filename)`` and torchvision datasets
    yield ``(image, target)``; neither carries the index, so wrap the training dataset (with the augmenting
    transform) and the clustering dataset (with the evaluation transform) of the same images in this class.

    Args:
        dataset: A map-style dataset with ``__len__`` and ``__getitem__`` (``LightlyDataset``, any
            torchvision dataset, a ``TensorDataset``...).

    Raises:
        TypeError: If ``dataset`` is an ``IterableDataset`` or has no ``__len__``/``__getitem__``.

    Examples:
        >>> from lightly.data import LightlyDataset
        >>> from lightly.transforms import MoCoV2Transform
        >>> train = IndexedDataset(LightlyDataset("images/", transform=MoCoV2Transform()))
        >>> (views, targets, filenames), indices = next(iter(DataLoader(train, batch_size=256)))
    """

    def __init__(self, dataset: Dataset[T_co]) -> None:
        if isinstance(dataset, IterableDataset):
            raise TypeError(
                "IndexedDataset needs a map-style dataset with __len__ and __getitem__; an IterableDataset "
                "has no stable sample index"
            )
        if not isinstance(dataset, Sized) or not hasattr(dataset, "__getitem__"):
            raise TypeError(
                f"IndexedDataset needs a dataset with __len__ and __getitem__, got {type(dataset).__name__}"
            )
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> IndexedSample:
        return IndexedSample(self.dataset[index], index)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.dataset!r}, num_samples={len(self)})"


def unpack_indexed_batch(batch: Any) -> tuple[Any, Any]:
    """Split a collated batch into ``(sample, indices)``.

    Args:
        batch: A batch from a ``DataLoader`` over an :class:`IndexedDataset`.

    Returns:
        The collated sample (what the wrapped dataset yields, batched) and the ``(B,)`` index tensor.

    Raises:
        ValueError: If the batch carries no dataset indices, i.e. the dataset was not wrapped.
    """
    if isinstance(batch, IndexedSample):
        return batch.sample, batch.index
    raise ValueError(
        f"PCL needs the dataset index of every sample, but the batch is a {type(batch).__name__} without "
        "one: wrap the dataset in lightly_pcl.IndexedDataset (for the training and the clustering dataloader)"
    )
