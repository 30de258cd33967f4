from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from gzsl_dvae import extract_features, image_folder
from PIL import Image


def _write_folder(root: Path, classes: int = 2, per_class: int = 3) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = (rng.random((20, 20)) * 255).astype(np.uint8)
            Image.fromarray(pixels, mode="L").save(folder / f"{i}.png")
    return root


def test_extract_from_folder_with_timm_name(tmp_path: Path) -> None:
    root = _write_folder(tmp_path / "images")
    torch.manual_seed(0)
    feats, labels, names = extract_features("resnet10t", root, image_size=32, in_chans=1, batch_size=4)
    reference = timm.create_model("resnet10t", pretrained=False, num_classes=0, in_chans=1)
    assert feats.shape == (6, reference.num_features) and feats.dtype == np.float32
    np.testing.assert_array_equal(labels, [0, 0, 0, 1, 1, 1])
    assert names == ["class_0", "class_1"]


def test_module_with_head_gives_pre_logits_of_num_classes_zero_model(tmp_path: Path) -> None:
    root = _write_folder(tmp_path / "images")
    torch.manual_seed(0)
    trained = timm.create_model("resnet10t", pretrained=False, num_classes=7, in_chans=1)
    headless = timm.create_model("resnet10t", pretrained=False, num_classes=0, in_chans=1)
    headless.load_state_dict({k: v for k, v in trained.state_dict().items() if not k.startswith("fc.")})
    a, _, _ = extract_features(trained, root, image_size=32, in_chans=1)
    b, _, _ = extract_features(headless, root, image_size=32, in_chans=1)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert trained.training  # the mode is restored


def test_dataset_input_and_plain_module() -> None:
    data = torch.utils.data.TensorDataset(torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 1]))
    linear = torch.nn.Linear(3, 2)
    feats, labels, names = extract_features(linear, data, batch_size=2)
    np.testing.assert_allclose(feats, linear(data.tensors[0]).detach().numpy(), rtol=1e-6)
    assert names is None and labels.tolist() == [0, 1, 0, 1, 1]


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="image folder"):
        image_folder(tmp_path / "missing")
    with pytest.raises(TypeError, match="`model`"):
        extract_features(42, tmp_path)  # type: ignore[arg-type]
