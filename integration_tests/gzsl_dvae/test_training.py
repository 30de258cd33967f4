from __future__ import annotations

import numpy as np
import pytest
import torch
from gzsl_dvae import CADAVAE, DisentangledVAE, train_vae

SMALL = {"visual_hidden": (32, 32), "attribute_hidden": (16, 16), "latent_dim": 4}


def _data(n: int = 60, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    attrs = rng.random((3, 5))
    feats = attrs[labels] @ rng.random((5, 8)) + 0.05 * rng.standard_normal((n, 8))
    return feats.astype(np.float32), labels, attrs


@pytest.mark.parametrize("model_cls", [CADAVAE, DisentangledVAE])
def test_history_and_loss_decrease(model_cls: type) -> None:
    feats, labels, attrs = _data()
    torch.manual_seed(0)
    model = model_cls(8, 5, 3, **SMALL) if model_cls is DisentangledVAE else model_cls(8, 5, **SMALL)
    seen_epochs = []
    history = train_vae(
        model,
        feats,
        labels,
        attrs,
        epochs=8,
        batch_size=10,
        lr=3e-3,
        callback=lambda e, terms: seen_epochs.append(e),
    )
    assert len(history) == 8 and seen_epochs == list(range(8))
    assert history[-1]["reconstruction"] < history[0]["reconstruction"]
    assert not model.training


def test_errors() -> None:
    feats, labels, attrs = _data()
    model = CADAVAE(8, 5, **SMALL)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="missing a class"):
        train_vae(model, feats, labels, attrs[:2])
    bad = feats.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="`features` contains NaN"):
        train_vae(model, bad, labels, attrs)
    with pytest.raises(ValueError, match="at least `batch_size`"):
        train_vae(model, feats[:5], labels[:5], attrs, batch_size=10)
    with pytest.raises(ValueError, match="`labels` has 59 entries"):
        train_vae(model, feats, labels[:-1], attrs)
    with pytest.raises(ValueError, match="`lr`"):
        train_vae(model, feats, labels, attrs, lr=0.0)
