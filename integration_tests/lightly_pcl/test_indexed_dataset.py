from __future__ import annotations

import pytest
import torch
import torchvision
from lightly.data import LightlyDataset
from lightly_pcl import IndexedDataset, IndexedSample, unpack_indexed_batch
from torch.utils.data import DataLoader, IterableDataset, TensorDataset


class _Stream(IterableDataset):
    def __iter__(self):
        yield from range(3)


class TestIndexedDataset:
    def test_torchvision_dataset_batches_carry_indices(self):
        data = torchvision.datasets.FakeData(
            size=10, image_size=(1, 4, 4), transform=torchvision.transforms.ToTensor()
        )
        batch = next(
            iter(
                DataLoader(
                    IndexedDataset(data),
                    batch_size=4,
                    shuffle=True,
                    generator=torch.Generator().manual_seed(0),
                )
            )
        )
        assert isinstance(batch, IndexedSample)
        (images, targets), indices = batch
        assert images.shape == (4, 1, 4, 4) and indices.dtype == torch.long
        for image, target, index in zip(images, targets, indices, strict=True):
            expected_image, expected_target = data[int(index)]
            assert torch.equal(image, expected_image) and int(target) == expected_target

    def test_lightly_dataset_keeps_its_filename_field(self):
        base = torchvision.datasets.FakeData(size=6, image_size=(3, 8, 8))
        data = IndexedDataset(
            LightlyDataset.from_torch_dataset(base, transform=torchvision.transforms.ToTensor())
        )
        (images, _targets, filenames), indices = next(iter(DataLoader(data, batch_size=3)))
        assert images.shape == (3, 3, 8, 8) and len(filenames) == 3
        assert indices.tolist() == [0, 1, 2] and len(data) == 6

    def test_unpack_rejects_a_batch_without_indices(self):
        batch = next(iter(DataLoader(TensorDataset(torch.randn(4, 2), torch.arange(4)), batch_size=2)))
        with pytest.raises(ValueError, match=r"wrap the dataset in lightly_pcl\.IndexedDataset"):
            unpack_indexed_batch(batch)

    def test_rejects_iterable_and_unsized_datasets(self):
        with pytest.raises(TypeError, match="IterableDataset"):
            IndexedDataset(_Stream())
        with pytest.raises(TypeError, match="__len__ and __getitem__"):
            IndexedDataset(object())  # type: ignore[arg-type]

    def test_repr(self):
        assert "num_samples=4" in repr(IndexedDataset(TensorDataset(torch.zeros(4))))
