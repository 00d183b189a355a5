"""prepare_qat / remove_qat: the README's QAT example (a small model trained a few steps on CPU whose loss
falls), where the modules go, and how they come out."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mono_quant as mq


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))


def test_the_readme_example_trains_and_its_loss_falls():
    model = mq.prepare_qat(_model())
    x = torch.randn(256, 8)
    y = (x[:, :1] * 2 - x[:, 1:2]).tanh()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.3 * losses[0]
    qparams = {name: fq.calculate_qparams() for name, fq in mq.fake_quantizers(model).items()}
    assert set(qparams) == {
        "0.input_fake_quant",
        "0.parametrizations.weight.0",
        "2.input_fake_quant",
        "2.parametrizations.weight.0",
    }
    assert qparams["0.parametrizations.weight.0"][0].shape == (32,)  # per output channel
    assert qparams["2.input_fake_quant"][0].shape == ()


def test_the_weights_are_fake_quantized_and_the_gradient_reaches_them():
    model = mq.prepare_qat(_model(), activation=None)
    layer = model[0]
    fq = layer.parametrizations.weight[0]
    w = layer.parametrizations.weight.original
    wq = layer.weight  # observes the weight, then fake-quantizes it with the updated qparams
    assert torch.equal(wq, torch.fake_quantize_per_channel_affine(w, fq.scale, fq.zero_point, 0, -128, 127))
    model(torch.randn(4, 8)).sum().backward()
    assert w.grad is not None and bool(w.grad.abs().sum() > 0)
    assert not hasattr(layer, "input_fake_quant")


def test_remove_restores_the_trained_weights_and_the_state_dict_keys():
    plain = _model()
    keys = set(plain.state_dict())
    model = mq.prepare_qat(plain, weight={"observer": "minmax", "dtype": torch.float8_e4m3fn})
    assert isinstance(model[0].parametrizations.weight[0].observer, mq.MinMaxObserver)
    with torch.no_grad():
        model[0].parametrizations.weight.original.add_(1.0)
    trained = model[0].parametrizations.weight.original.detach().clone()
    model(torch.randn(3, 8))
    with pytest.raises(ValueError, match="prepared already"):
        mq.prepare_qat(model)
    mq.remove_qat(model)
    assert set(model.state_dict()) == keys and not mq.fake_quantizers(model)
    assert torch.equal(model[0].weight, trained)
    x = torch.randn(3, 8)
    assert torch.equal(model(x), model[2](torch.relu(model[0](x))))


def test_bad_arguments():
    with pytest.raises(TypeError, match="activation=3 must be None, an observer name"):
        mq.prepare_qat(_model(), activation=3)
    with pytest.raises(TypeError, match="modules="):
        mq.prepare_qat(_model(), modules=[nn.Linear])
    made = mq.prepare_qat(_model(), activation="minmax", weight=None, modules=(nn.Linear,))
    assert isinstance(made[0].input_fake_quant.observer, mq.MinMaxObserver)
