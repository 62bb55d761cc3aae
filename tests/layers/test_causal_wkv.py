"""Causal WKV (original RWKV attention, for the ablation) against its float64 loop reference."""
import pytest
import torch

from conftest import rel_err
from vrwkv.layers import causal_wkv, naive_causal_wkv


def direct_formula(k, v, w, u):
    """The weights written out without any log-space trick, float64 (only safe for moderate inputs)."""
    B, T, C = k.shape
    y = torch.empty(B, T, C, dtype=torch.float64)
    for t in range(T):
        num = torch.exp(u + k[:, t]) * v[:, t]
        den = torch.exp(u + k[:, t])
        for i in range(t):
            a = torch.exp(-(t - i - 1) * w + k[:, i])
            num, den = num + a * v[:, i], den + a
        y[:, t] = num / den
    return y


def test_reference_is_the_formula():
    torch.manual_seed(0)
    k, v = torch.randn(2, 6, 3, dtype=torch.float64), torch.randn(2, 6, 3, dtype=torch.float64)
    w, u = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    assert rel_err(naive_causal_wkv(k, v, w, u), direct_formula(k, v, w, u)) < 1e-14


@pytest.mark.parametrize(
    "B,T,C,k_scale,decay_scale",
    [(2, 1, 3, 1.0, 1.0), (1, 37, 5, 1.0, 5.0), (2, 50, 4, 10.0, 20.0), (1, 64, 3, 40.0, 100.0)],
    ids=str,
)
def test_causal_wkv_matches_reference(B, T, C, k_scale, decay_scale):
    """Odd T, T = 1, extreme keys (exponents of several hundred) and decays; w = decay / T as in the model.

    float32 error grows like eps * T * |w| (the prefix sums are taken relative to the first token).
    """
    torch.manual_seed(T)
    k = torch.randn(B, T, C) * k_scale
    v = torch.randn(B, T, C) * 3 + 1
    w, u = torch.randn(C) * decay_scale / T, torch.randn(C) * k_scale
    ref = naive_causal_wkv(k, v, w, u)
    assert rel_err(causal_wkv(k.double(), v.double(), w.double(), u.double()), ref) < 1e-12
    assert rel_err(causal_wkv(k, v, w, u), ref) < 2e-5


def test_causal_wkv_constant_and_tiny_values():
    """All-equal values give that value back; values far from zero keep their small variations."""
    k, w, u = torch.randn(1, 9, 4), torch.randn(4), torch.randn(4)
    v = torch.full((1, 9, 4), -2.5)
    assert torch.allclose(causal_wkv(k, v, w, u), v, rtol=1e-6, atol=0)
    v = 1000 + 1e-3 * torch.randn(1, 9, 4, dtype=torch.float64)
    y = causal_wkv(k.double(), v, w.double(), u.double()) - 1000
    assert rel_err(y, naive_causal_wkv(k, v, w, u) - 1000) < 1e-8


def test_causal_wkv_is_causal():
    torch.manual_seed(0)
    k, v = torch.randn(1, 10, 4, dtype=torch.float64), torch.randn(1, 10, 4, dtype=torch.float64)
    w, u = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    y = causal_wkv(k, v, w, u)
    k2, v2 = k.clone(), v.clone()
    k2[:, 6:] += 1.0
    v2[:, 6:] -= 2.0
    y2 = causal_wkv(k2, v2, w, u)
    # equal up to rounding (the per-channel offset of the numerator is taken over the whole sequence)
    assert rel_err(y2[:, :6], y[:, :6]) < 1e-13 and rel_err(y2[:, 6:], y[:, 6:]) > 1e-2


def test_causal_wkv_gradcheck():
    torch.manual_seed(0)
    args = [torch.randn(2, 5, 3, dtype=torch.float64), torch.randn(2, 5, 3, dtype=torch.float64),
            torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)]
    args = [a.requires_grad_() for a in args]
    assert torch.autograd.gradcheck(causal_wkv, args)


def test_causal_wkv_bad_shapes():
    with pytest.raises(ValueError, match=r"\[B, T, C\]"):
        causal_wkv(torch.randn(4, 3), torch.randn(4, 3), torch.randn(3), torch.randn(3))
    with pytest.raises(ValueError, match="w and u"):
        causal_wkv(torch.randn(1, 4, 3), torch.randn(1, 4, 3), torch.randn(4), torch.randn(3))
