"""The loaders on tiny fixture trees written here in each dataset's released layout."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pml_softtriple.datasets import CUB, Cars196, StanfordOnlineProducts
from pytorch_metric_learning.datasets.base_dataset import BaseDataset


def _image(path: Path, value: int, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = 3 if mode == "RGB" else 1
    array = np.full((6, 5, channels), value, dtype=np.uint8).squeeze()
    Image.fromarray(array, mode=None).convert(mode).save(path)


@pytest.fixture
def cub_root(tmp_path: Path) -> Path:
    base = tmp_path / "CUB_200_2011"
    classes = {
        1: "001.Black_footed_Albatross",
        2: "002.Laysan_Albatross",
        101: "101.White_Pelican",
        200: "200.Yellow",
    }
    images, labels, image_id = [], [], 0
    for cid, folder in classes.items():
        for j in range(2):
            image_id += 1
            rel = f"{folder}/{folder.split('.')[1]}_{j:04d}.jpg"
            _image(base / "images" / rel, cid, mode="L" if cid == 101 else "RGB")  # CUB has grey images
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {cid}")
    (base / "images.txt").write_text("\n".join(images) + "\n")
    (base / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    return tmp_path


def test_cub_class_disjoint_split_and_labels(cub_root: Path):
    train, test = CUB(cub_root, "train"), CUB(cub_root, "test")
    assert isinstance(train, BaseDataset)
    assert train.class_ids == [1, 1, 2, 2] and train.labels == [0, 0, 1, 1]
    assert test.class_ids == [101, 101, 200, 200] and test.labels == [0, 0, 1, 1]
    assert not set(train.class_ids) & set(test.class_ids)
    image, label = test[0]
    assert image.mode == "RGB" and image.size == (5, 6) and label == 0
    assert np.asarray(image)[0, 0].tolist() == [101, 101, 101]
    both = CUB(cub_root / "CUB_200_2011", "train+test", transform=lambda im: torch.tensor(np.asarray(im)))
    assert len(both) == 8 and both.labels == [0, 0, 1, 1, 2, 2, 3, 3] and both.num_classes == 4
    assert both[7][0].shape == (6, 5, 3)


def test_cub_missing_files(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=r"CUB: expected .*images.txt.*CUB_200_2011/\{images.txt"):
        CUB(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match=r"root folder .* does not exist"):
        CUB(tmp_path / "nope")
    with pytest.raises(
        ValueError, match=r"split must be one of \('train', 'test', 'train\+test'\), got 'val'"
    ):
        CUB(tmp_path, "val")


def _cars_images(root: Path, entries):
    for rel, cid in entries:
        _image(root / rel, cid)


def test_cars196_official_mat_layout(tmp_path: Path):
    from scipy.io import savemat

    entries = [
        ("car_ims/000001.jpg", 1, 0),
        ("car_ims/000002.jpg", 98, 1),
        ("car_ims/000003.jpg", 99, 0),
        ("car_ims/000004.jpg", 196, 1),
        ("car_ims/000005.jpg", 1, 1),
    ]
    dtype = [
        ("relative_im_path", "O"),
        ("bbox_x1", "O"),
        ("bbox_y1", "O"),
        ("bbox_x2", "O"),
        ("bbox_y2", "O"),
        ("class", "O"),
        ("test", "O"),
    ]
    annotations = np.array([[(p, 1, 2, 3, 4, c, t) for p, c, t in entries]], dtype=dtype)
    savemat(
        tmp_path / "cars_annos.mat", {"annotations": annotations, "class_names": np.array([["a", "b"]], "O")}
    )
    _cars_images(tmp_path, [(p, c) for p, c, _ in entries])

    train, test = Cars196(tmp_path, "train"), Cars196(tmp_path, "test")
    # The metric-learning split ignores the dataset's own test flag: classes 1-98 vs 99-196.
    assert train.class_ids == [1, 98, 1] and train.labels == [0, 1, 0]
    assert test.class_ids == [99, 196] and test.labels == [0, 1]
    assert Path(test.paths[1]).name == "000004.jpg" and test[1][1] == 1


def test_cars196_pml_folder_layout(tmp_path: Path):
    names = ["AM General Hummer SUV 2000", "Acura/RL Sedan 2012"] + [f"car {i}" for i in range(3, 197)]
    (tmp_path / "names.csv").write_text("\n".join(names) + "\n")
    (tmp_path / "anno_train.csv").write_text("a.jpg,1,2,3,4,1\nb.jpg,1,2,3,4,2\nc.jpg,1,2,3,4,150\n")
    (tmp_path / "anno_test.csv").write_text("d.jpg,1,2,3,4,99\ne.jpg,1,2,3,4,98\n")
    split_of = {"a.jpg": "train", "b.jpg": "train", "c.jpg": "train", "d.jpg": "test", "e.jpg": "test"}
    class_of = {"a.jpg": 1, "b.jpg": 2, "c.jpg": 150, "d.jpg": 99, "e.jpg": 98}
    for file, part in split_of.items():
        folder = names[class_of[file] - 1].replace("/", "-")
        _image(tmp_path / "car_data" / "car_data" / part / folder / file, class_of[file])

    train, test = Cars196(tmp_path, "train"), Cars196(tmp_path, "test")
    assert train.class_ids == [1, 2, 98] and train.labels == [0, 1, 2]
    assert test.class_ids == [150, 99] and test.labels == [1, 0]
    assert "Acura-RL Sedan 2012" in train.paths[1]
    assert test[0][0].getpixel((0, 0)) == (150, 150, 150)


def test_cars196_missing_layout(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=r"Cars196: expected .*cars_annos.mat.* or .*names.csv"):
        Cars196(tmp_path)


@pytest.mark.parametrize("nested", [True, False])
def test_stanford_online_products(tmp_path: Path, nested: bool):
    base = tmp_path / "Stanford_Online_Products" if nested else tmp_path
    header = "image_id class_id super_class_id path\n"
    train_rows = [
        (1, 1, 1, "bicycle_final/1_0.JPG"),
        (2, 1, 1, "bicycle_final/1_1.JPG"),
        (3, 7, 2, "cabinet_final/7_0.JPG"),
    ]
    test_rows = [(4, 11319, 3, "chair_final/11319_0.JPG"), (5, 11400, 3, "chair_final/11400_0.JPG")]
    for name, rows in (("Ebay_train.txt", train_rows), ("Ebay_test.txt", test_rows)):
        base.mkdir(parents=True, exist_ok=True)
        (base / name).write_text(header + "".join(f"{a} {b} {c} {d}\n" for a, b, c, d in rows))
        for _, cid, _, rel in rows:
            _image(base / rel, cid % 256)
    train, test = StanfordOnlineProducts(tmp_path, "train"), StanfordOnlineProducts(tmp_path, "test")
    assert train.labels == [0, 0, 1] and train.super_class_ids == [1, 1, 2]
    assert test.class_ids == [11319, 11400] and test.labels == [0, 1]
    assert len(StanfordOnlineProducts(tmp_path, "train+test")) == 5
    assert "StanfordOnlineProducts(root=" in repr(train) and "num_classes=2" in repr(train)
    image, label = test[1]
    assert label == 1 and image.getpixel((1, 1)) == (11400 % 256,) * 3


def test_usable_in_a_dataloader(cub_root: Path):
    from torchvision import transforms

    dataset = CUB(cub_root, "train", transform=transforms.ToTensor())
    images, labels = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    assert images.shape == (4, 3, 6, 5) and labels.tolist() == [0, 0, 1, 1]
