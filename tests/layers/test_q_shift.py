"""Q-Shift and the 1-D token shift against direct loops over the spec's table (spec §1.6)."""
import pytest
import torch

from vrwkv.layers import make_shift, q_shift, token_shift


def loop_q_shift(x, H, W, s, gamma, head_size=None):
    """Direct restatement of the spec table: per output position and channel, read one input position or zero."""
    B, T, C = x.shape
    grid = x.reshape(B, H, W, C)
    out = torch.zeros_like(grid)
    c_group = head_size or C
    g = int(c_group * gamma)
    for h in range(H):
        for w in range(W):
            for c in range(C):
                q = (c % c_group) // g if g else 4
                src = {0: (h, w - s), 1: (h, w + s), 2: (h - s, w), 3: (h + s, w)}.get(q, (h, w))
                if 0 <= src[0] < H and 0 <= src[1] < W:
                    out[:, h, w, c] = grid[:, src[0], src[1], c]
    return out.reshape(B, T, C)


@pytest.mark.parametrize(
    "H,W,C,s,gamma,head_size",
    [
        (3, 5, 8, 1, 0.25, None),
        (4, 3, 10, 1, 0.25, None),  # C not divisible by 4: channels 8, 9 are copied
        (5, 4, 12, 2, 0.25, None),
        (2, 3, 12, 1, 1 / 6, None),  # gamma < 1/4: 2 channels per direction, 4 copied
        (3, 2, 8, 3, 0.25, None),  # shift larger than the grid: the shifted quarters are all zero
        (3, 4, 16, 1, 0.25, 8),  # per-head quarters (VRWKV6's q_shift_multihead)
    ],
)
def test_q_shift_matches_loop(H, W, C, s, gamma, head_size):
    torch.manual_seed(0)
    x = torch.randn(2, H * W, C)
    ref = loop_q_shift(x, H, W, s, gamma, head_size)
    out = q_shift(x, (H, W), shift_pixel=s, channel_gamma=gamma, head_size=head_size)
    assert torch.equal(out, ref)


def test_q_shift_directions_on_a_ramp():
    """Position-coded input: quarter 0 at (h, w) reads the token at (h, w-1), i.e. the value t - 1, and so on."""
    H, W, C = 3, 4, 4
    t = torch.arange(1.0, H * W + 1)  # 1-based so zeros mean "missing neighbour"
    x = t[None, :, None].expand(1, H * W, C).contiguous()
    out = q_shift(x, (H, W))[0].reshape(H, W, C)
    grid = t.reshape(H, W)
    assert torch.equal(out[:, 1:, 0], grid[:, :-1]) and torch.all(out[:, 0, 0] == 0)  # left neighbour
    assert torch.equal(out[:, :-1, 1], grid[:, 1:]) and torch.all(out[:, -1, 1] == 0)  # right neighbour
    assert torch.equal(out[1:, :, 2], grid[:-1, :]) and torch.all(out[0, :, 2] == 0)  # above
    assert torch.equal(out[:-1, :, 3], grid[1:, :]) and torch.all(out[-1, :, 3] == 0)  # below


def test_q_shift_gradient_is_the_transpose():
    """q_shift is linear: <q_shift(x), y> == <x, q_shift^T(y)> computed by autograd, checked against the loop."""
    torch.manual_seed(1)
    H, W, C = 3, 5, 8
    x = torch.randn(1, H * W, C, dtype=torch.float64, requires_grad=True)
    y = torch.randn(1, H * W, C, dtype=torch.float64)
    (q_shift(x, (H, W)) * y).sum().backward()
    x2 = x.detach().clone().requires_grad_()
    (loop_q_shift(x2, H, W, 1, 0.25) * y).sum().backward()
    assert torch.equal(x.grad, x2.grad)


def test_token_shift_matches_loop():
    torch.manual_seed(0)
    x = torch.randn(2, 7, 5)
    for s in (1, 2, 9):
        ref = torch.zeros_like(x)
        for t in range(7):
            if t - s >= 0:
                ref[:, t] = x[:, t - s]
        assert torch.equal(token_shift(x, (1, 7), shift_pixel=s), ref)


def test_bad_arguments_raise():
    x = torch.randn(1, 12, 8)
    with pytest.raises(ValueError, match="grid"):
        q_shift(x, (3, 5))
    with pytest.raises(ValueError, match="channel_gamma"):
        q_shift(x, (3, 4), channel_gamma=0.3)
    with pytest.raises(ValueError, match="shift_mode"):
        make_shift("double_shift")
    assert make_shift("none") is None and make_shift("q_shift", shift_pixel=0) is None


@pytest.mark.parametrize("s,head_size", [(1, None), (2, None), (4, None), (1, 8)])
def test_q_shift_gradcheck(s, head_size):
    """The hand-written backward (the adjoint shift) against finite differences, first and second order, float64;
    s = 4 exceeds the 3-row grid (all shifted quarters zero)."""
    torch.manual_seed(2)
    x = torch.randn(2, 12, 16, dtype=torch.float64, requires_grad=True)
    f = lambda t: q_shift(t, (3, 4), shift_pixel=s, head_size=head_size)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))


def test_q_shift_same_with_and_without_autograd():
    x = torch.randn(2, 20, 10)
    with torch.inference_mode():
        fast = q_shift(x, (4, 5), shift_pixel=2)
    assert torch.equal(fast, q_shift(x.requires_grad_(), (4, 5), shift_pixel=2))
