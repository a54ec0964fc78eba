"""maxsquare_loss (image-wise weighted MaxSquare): hand-worked value, gradcheck, backends."""

import pytest
import torch

import lsr_fast
from lsr_fast import reference
from conftest import all_params, assert_accumulated_close, assert_rounded_close, fast_params


def test_hand_worked():
    # One image, 2 classes, 4 pixels: argmax 0,0,0,1 -> N_0 = 3, N_1 = 1, N = 4.
    probs = torch.tensor([[[[0.8, 0.6], [0.9, 0.3]], [[0.2, 0.4], [0.1, 0.7]]]])
    squares = (probs**2).sum(1).reshape(-1)  # per pixel sum_c p^2
    for alpha in (0.0, 0.2, 1.0):
        w0 = 1 / max(3**alpha * 4 ** (1 - alpha), 1)
        w1 = 1 / max(1**alpha * 4 ** (1 - alpha), 1)
        expected = -(w0 * squares[:3].sum() + w1 * squares[3]) / (1 * 2)
        assert reference.maxsquare_loss(probs, alpha).item() == pytest.approx(expected.item())


def test_weights_are_constants():
    probs = torch.softmax(torch.randn(2, 3, 4, 4), 1).requires_grad_()
    reference.maxsquare_loss(probs, 0.2).backward()
    # The gradient is -2 p w / (B C) with the weights w held fixed.
    pred = probs.argmax(1)
    hist = torch.stack([torch.bincount(pred[b].reshape(-1), minlength=3) for b in range(2)]).double()
    w = 1 / (hist**0.2 * 16**0.8).clamp(min=1)
    expected = -2 * probs.detach() * w.gather(1, pred.reshape(2, -1)).reshape(2, 1, 4, 4).float() / 6
    torch.testing.assert_close(probs.grad, expected)


@pytest.mark.parametrize("device,backend", all_params())
def test_gradcheck_float64(device, backend):
    probs = torch.softmax(torch.randn(2, 3, 3, 4, dtype=torch.float64), 1).to(device).requires_grad_()
    assert torch.autograd.gradcheck(lambda p: lsr_fast.maxsquare_loss(p, alpha=0.2, backend=backend), (probs,))


@pytest.mark.parametrize("device,backend", fast_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 5, 6, 7), (1, 19, 9, 16), (1, 1, 1, 1), (3, 2, 1, 5)])
@pytest.mark.parametrize("alpha", [0.0, 0.2, 1.0])
def test_backend_matches_reference(device, backend, dtype, shape, alpha):
    probs = torch.softmax(torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 2, 1).to(dtype)
    a = probs.clone().requires_grad_()
    b = probs.clone().to(device).requires_grad_()
    want = reference.maxsquare_loss(a, alpha)
    got = lsr_fast.maxsquare_loss(b, alpha=alpha, backend=backend)
    want.backward()
    got.backward()
    # The loss is accumulated in float32 (float64) whatever the input dtype; its terms
    # -w * sum_c p^2 share one sign, so |loss| is the sum of their sizes.
    assert_accumulated_close(got, want, dtype, what="loss")
    # The gradient is rounded to the probabilities' dtype: that dtype's tolerance.
    assert b.grad.dtype == dtype
    assert_rounded_close(b.grad, a.grad, dtype)


@pytest.mark.parametrize("device,backend", all_params())
def test_invalid_inputs(device, backend):
    probs = torch.rand(1, 3, 4, 4, device=device)
    with pytest.raises(ValueError, match="alpha must be in"):
        lsr_fast.maxsquare_loss(probs, alpha=2.0, backend=backend)
    with pytest.raises(ValueError, match=r"probs must be \(B, C, H, W\)"):
        lsr_fast.maxsquare_loss(probs[0], backend=backend)
    with pytest.raises(TypeError, match="probs must be a floating-point"):
        lsr_fast.maxsquare_loss(probs.long(), backend=backend)
