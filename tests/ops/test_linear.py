"""ops.linear: F.linear's function through oneDNN on the CPU without autograd, F.linear everywhere else."""
import pytest
import torch
import torch.nn.functional as F

from vrwkv.ops.linear import linear, onednn_enabled, onednn_linears

needs_onednn = pytest.mark.skipif(not onednn_enabled(), reason="this PyTorch has no oneDNN (torch.ops.mkldnn)")


def _ops_run(fn) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages()}


def _close_to_float64(out: torch.Tensor, x, w, b=None) -> None:
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    scale = (x.double().abs() @ w.double().abs().t()).amax()  # error bound of a float32 sum ~ K eps |x||w|
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert (out.double() - ref).abs().max() <= 2e-6 * scale


@needs_onednn
@pytest.mark.parametrize("shape", [(196, 192, 768), (3, 197, 192, 192), (4097, 768, 192), (5, 20, 7)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_float32_without_autograd_runs_onednn_and_equals_f_linear(shape, with_bias):
    torch.manual_seed(0)
    *lead, K, N = shape
    x, w = torch.randn(*lead, K), torch.randn(N, K) / K**0.5
    b = torch.randn(N) if with_bias else None
    with torch.inference_mode():
        assert "mkldnn::_linear_pointwise" in _ops_run(lambda: linear(x, w, b))
        out = linear(x, w, b)
        expected = F.linear(x, w, b)
    # each within a float32 sum's error of the float64 product (the two libraries block the sums differently: on
    # AVX2 machines they differ by ~1e-6 of the largest output at K = 768, by ~1e-7 with AVX-512)
    _close_to_float64(out, x, w, b)
    _close_to_float64(expected, x, w, b)


@needs_onednn
def test_strided_operands_and_the_channel_major_product():
    torch.manual_seed(1)
    storage = torch.randn(192, 2, 300)  # x as a transposed view: [600, 192] with strides (1, 600)... and a step
    x = storage.reshape(192, 600).t()[::3]
    w = torch.randn(192, 96).t()  # a transposed weight [96, 192]
    with torch.no_grad():
        _close_to_float64(linear(x, w), x, w)
        rows = torch.randn(257, 192)
        channel_major = linear(w, rows)  # w @ rows^T: [96, 257]
    assert channel_major.shape == (96, 257)
    _close_to_float64(channel_major.t(), rows, w)


@needs_onednn
@pytest.mark.parametrize("with_bias", [False, True])
def test_gradients_equal_f_linear_and_run_onednn(with_bias):
    torch.manual_seed(2)
    x = torch.randn(3, 37, 48)[:, ::2].requires_grad_()  # a strided input
    w = (torch.randn(24, 48) / 7).requires_grad_()
    b = torch.randn(24, requires_grad=True) if with_bias else None
    grad = torch.randn(3, 19, 24)
    leaves = [t for t in (x, w, b) if t is not None]

    def gradients(fn):
        return torch.autograd.grad(fn(x, w, b), leaves, grad)

    assert "mkldnn::_linear_pointwise" in _ops_run(lambda: gradients(linear))
    for ours, ref in zip(gradients(linear), gradients(F.linear)):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    # a backward that records a graph (second derivatives) is differentiable too: d/dx of <grad_w, ones>
    def second(fn):
        (d_w,) = torch.autograd.grad(fn(x, w, b), (w,), grad, create_graph=True)
        return torch.autograd.grad(d_w.sum(), (x,))[0]

    torch.testing.assert_close(second(linear), second(F.linear), rtol=1e-5, atol=1e-5)
    # only the inputs that need a gradient get one
    frozen_w = w.detach()
    (d_x,) = torch.autograd.grad(linear(x, frozen_w).sum(), (x,))
    torch.testing.assert_close(d_x, torch.ones(3, 19, 24) @ frozen_w)


def test_falls_back_to_f_linear_where_onednn_does_not_apply():
    torch.manual_seed(2)
    x, w = torch.randn(2, 5, 16), torch.randn(8, 16)
    # torch.func transforms: F.linear (oneDNN's op has no batching rule)
    batched = torch.func.vmap(lambda xs: linear(xs, w))(x)
    torch.testing.assert_close(batched, F.linear(x, w))
    d_w = torch.func.grad(lambda weight: linear(x, weight).sum())(w)
    torch.testing.assert_close(d_w, x.sum((0, 1)).expand(8, 16))
    with torch.no_grad():
        # float64 (references, gradcheck): F.linear exactly
        assert torch.equal(linear(x.double(), w.double()), F.linear(x.double(), w.double()))
        # CPU autocast: F.linear's dtype policy (bfloat16 out)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert linear(x, w).dtype == torch.bfloat16
        # switched off, a 1-D input, an empty input
        with onednn_linears(False):
            assert "mkldnn::_linear_pointwise" not in _ops_run(lambda: linear(x, w))
            assert torch.equal(linear(x, w), F.linear(x, w))
        assert torch.equal(linear(x[0, 0], w), F.linear(x[0, 0], w))
        # under a dispatch mode (FLOP counter): aten ops, counted
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            linear(x, w)
        assert counter.get_total_flops() == 2 * 10 * 16 * 8
        assert linear(x[:, :0], w).shape == (2, 0, 8)


@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated")
def test_tracing_records_plain_ops():
    w = torch.randn(8, 16)
    traced = torch.jit.trace(lambda x: linear(x, w), torch.randn(3, 16))
    assert "mkldnn" not in str(traced.graph)
    x = torch.randn(5, 16)
    torch.testing.assert_close(traced(x), F.linear(x, w))


def test_layers_linear_is_nn_linear_computed_by_the_op():
    from vrwkv.layers import Linear

    torch.manual_seed(3)
    layer = Linear(16, 8)
    plain = torch.nn.Linear(16, 8)
    plain.load_state_dict(layer.state_dict())  # same parameters and names
    x = torch.randn(4, 16, requires_grad=True)
    out = layer(x)
    out.sum().backward()
    torch.testing.assert_close(layer.weight.grad, x.detach().sum(0).expand(8, 16))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), plain(x), rtol=1e-6, atol=1e-6)
        if onednn_enabled():
            assert "mkldnn::_linear_pointwise" in _ops_run(lambda: layer(x))
