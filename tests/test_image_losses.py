"""kdforge.losses.image: the Haar transform WKD distils and LPIPS built from a local backbone file."""
from __future__ import annotations

import pytest
import torch
import torchvision

from kdforge.losses.image import haar_dwt, lpips_network, wavelet_loss


def test_haar_dwt_is_orthonormal_and_splits_smooth_from_detail():
    x = torch.randn(2, 3, 16, 16)
    low, highs = haar_dwt(x, levels=3)
    assert low.shape == (2, 3, 2, 2) and [h.shape for h in highs] == [(2, 9, 8, 8), (2, 9, 4, 4), (2, 9, 2, 2)]
    energy = low.pow(2).sum() + sum(h.pow(2).sum() for h in highs)  # an orthonormal transform keeps the energy
    torch.testing.assert_close(energy, x.pow(2).sum())
    flat = torch.full((1, 1, 8, 8), 0.3)
    assert all(h.abs().max() == 0 for h in haar_dwt(flat, 2)[1])  # a flat image has no detail
    with pytest.raises(ValueError, match="even"):
        haar_dwt(torch.randn(1, 1, 6, 6), levels=2)


def test_wavelet_loss_ignores_the_low_band():
    x = torch.randn(2, 3, 8, 8)
    assert wavelet_loss(x + 0.7, x, levels=2) < 1e-6  # a constant offset lives in the low band only
    assert wavelet_loss(x.flip(-1), x, levels=2) > 0.1


def test_lpips_loads_the_backbone_from_a_local_file(tmp_path):
    torch.manual_seed(0)
    backbone = torchvision.models.alexnet(weights=None)
    path = tmp_path / "alexnet.pth"
    torch.save(backbone.state_dict(), path)
    net = lpips_network("alex", path)
    torch.testing.assert_close(net.net.slice1[0].weight, backbone.features[0].weight)
    torch.testing.assert_close(getattr(net.net.slice5, "10").weight, backbone.features[10].weight)
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    assert net(x, x).abs().max() < 1e-6 and (net(x, y) > 0).all()
    net.train(True)
    assert not net.training  # dropout in the heads stays off
    with pytest.raises(FileNotFoundError, match="not found"):
        lpips_network("alex", tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="not a torchvision vgg16"):
        lpips_network("vgg", path)
    with pytest.raises(ValueError, match="net must be one of"):
        lpips_network("resnet", path)
