from __future__ import annotations

import pytest
import torch

from integration_tests.lightly_pcl.toy import IMAGE, tiny_pcl


class TestPCL:
    def test_shapes_and_frozen_momentum_encoder(self):
        model = tiny_pcl()
        x = torch.randn(5, *IMAGE)
        assert model(x).shape == (5, 8) and model.forward_features(x).shape == (5, 16)
        key = model.forward_momentum(x)
        assert key.shape == (5, 8) and not key.requires_grad
        assert all(not p.requires_grad for p in model.backbone_momentum.parameters())
        assert all(p.requires_grad for p in model.backbone.parameters())

    def test_momentum_update_is_an_ema(self):
        model = tiny_pcl()
        with torch.no_grad():
            for p in model.projection_head.parameters():
                p.add_(1.0)
        before = [p.clone() for p in model.projection_head_momentum.parameters()]
        model.update_momentum(0.75)
        for b, q, k in zip(
            before,
            model.projection_head.parameters(),
            model.projection_head_momentum.parameters(),
            strict=True,
        ):
            torch.testing.assert_close(k, 0.75 * b + 0.25 * q)
        model.update_momentum(0.0)
        for q, k in zip(
            model.projection_head.parameters(), model.projection_head_momentum.parameters(), strict=True
        ):
            torch.testing.assert_close(k, q)

    def test_shuffled_key_batch_equals_unshuffled_in_one_process(self):
        model = tiny_pcl()
        x = torch.randn(6, *IMAGE)
        torch.testing.assert_close(
            model.forward_momentum(x, shuffle=True), model.forward_momentum(x), atol=1e-5, rtol=0
        )

    def test_repr_and_errors(self):
        model = tiny_pcl()
        assert "input_dim=16, hidden_dim=16, output_dim=8" in str(model)
        with pytest.raises(ValueError, match=r"momentum m must be in \[0, 1\]"):
            model.update_momentum(1.5)
        with pytest.raises(ValueError, match="must be positive"):
            type(model)(torch.nn.Identity(), input_dim=0)
