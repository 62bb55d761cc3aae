"""ops.linear: F.linear's function through oneDNN on the CPU without autograd, F.linear everywhere else."""
import sys

import pytest
import torch
import torch.nn.functional as F

from vrwkv.ops.linear import linear, onednn_enabled, onednn_linears, product_takes_buffer

linear_op = sys.modules["vrwkv.ops.linear"]  # (the module: vrwkv.ops re-exports its function under the same name)

needs_onednn = pytest.mark.skipif(not onednn_enabled(), reason="this PyTorch has no oneDNN (torch.ops.mkldnn)")


@pytest.fixture(autouse=True)
def every_product_takes_onednn():
    """The tests of oneDNN's path use small products and strided inputs: take them there whatever the CPU (the
    default's choice per CPU has its own tests, which set the mode back to auto)."""
    with onednn_linears(True):
        yield


def _auto_rule(monkeypatch, intel_mkl: bool, avx512: bool) -> None:
    """The default mode, on a CPU of this kind (Intel with PyTorch's MKL or not; AVX-512 or not)."""
    linear_op.use_onednn(None)
    monkeypatch.setattr(linear_op, "_blas_is_intel_mkl_on_intel", lambda: intel_mkl)
    monkeypatch.setattr(linear_op, "_has_avx512", lambda: avx512)


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


# --- the post-op: linear(..., activation=) ----------------------------------------------------------------------

def _activation_close_to_float64(out: torch.Tensor, x, w, activation: str) -> None:
    """activation(x w^T) within float32 accuracy of float64: the product's error bound carried through the
    activation (ReLU and the sigmoid are 1- and 1/4-Lipschitz), plus the activation's own rounding."""
    ref64 = F.linear(x.double(), w.double())
    ref = torch.relu(ref64) if activation == "relu" else torch.sigmoid(ref64)
    scale = (x.double().abs() @ w.double().abs().t()).amax()
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert (out.double() - ref).abs().max() <= 2e-6 * scale + 2e-7


@needs_onednn
@pytest.mark.parametrize("activation", ["relu", "sigmoid"])
@pytest.mark.parametrize("shape", [(196, 192, 768), (2, 99, 192, 192), (5, 20, 7)])
def test_activation_is_fused_into_the_onednn_product(activation, shape):
    torch.manual_seed(3)
    *lead, K, N = shape
    x, w = torch.randn(*lead, K) * 3, torch.randn(N, K) / K**0.5  # (x * 3: sigmoid's tails and both signs)
    with torch.inference_mode():
        ran = _ops_run(lambda: linear(x, w, activation=activation))
        out = linear(x, w, activation=activation)
    assert "mkldnn::_linear_pointwise" in ran and not {"aten::relu_", "aten::sigmoid_", "aten::relu",
                                                        "aten::sigmoid"} & ran  # one op
    _activation_close_to_float64(out, x, w, activation)
    assert (out >= 0).all() and (activation == "relu" or (out <= 1).all())


@needs_onednn
def test_activation_of_the_channel_major_product():
    torch.manual_seed(4)
    w, rows = torch.randn(96, 192) / 14, torch.randn(300, 192) * 2
    with torch.no_grad():
        out = linear(w, rows, activation="sigmoid")  # sigmoid(w @ rows^T): [96, 300]
    _activation_close_to_float64(out.t(), rows, w, "sigmoid")


@pytest.mark.parametrize("onednn", [True, False])
@pytest.mark.parametrize("activation", ["relu", "sigmoid"])
def test_activation_with_autograd_and_without_onednn(onednn, activation):
    """With autograd the activation follows the product as its own differentiable op; with oneDNN off it follows
    F.linear (in place without autograd): the same function and gradients as the plain ops."""
    torch.manual_seed(5)
    x = torch.randn(17, 24, dtype=torch.float32, requires_grad=True)
    w = (torch.randn(12, 24) / 5).requires_grad_()
    act = torch.relu if activation == "relu" else torch.sigmoid
    with onednn_linears(onednn):
        out = linear(x, w, activation=activation)
        grad = torch.randn_like(out)
        out.backward(grad)
        expected = act(F.linear(x.detach(), w.detach()))
        with torch.no_grad():
            plain = linear(x, w, activation=activation)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    act(F.linear(x64, w64)).backward(grad.double())
    torch.testing.assert_close(out.detach(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(plain, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-5, atol=1e-5)


def test_activation_float64_and_bad_names():
    torch.manual_seed(6)
    x, w = torch.randn(9, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(linear(x, w, activation="sigmoid"), torch.sigmoid(x @ w.t()), rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="activation must be None or one of"):
        linear(x, w, activation="gelu")


@needs_onednn
@pytest.mark.parametrize("avx512", [False, True])
def test_small_products_take_f_linear_without_avx512(monkeypatch, avx512):
    """Below SMALL_PRODUCT_FLOPS oneDNN runs only on AVX-512 CPUs (where it is ~2x MKL); larger products always."""
    _auto_rule(monkeypatch, intel_mkl=False, avx512=avx512)
    torch.manual_seed(9)
    small_x, w = torch.randn(196, 192), torch.randn(768, 192) / 14  # 57.8 MFLOP
    large_x = torch.randn(1568, 192)  # 462 MFLOP
    with torch.inference_mode():
        small, large = _ops_run(lambda: linear(small_x, w)), _ops_run(lambda: linear(large_x, w))
        _close_to_float64(linear(small_x, w), small_x, w)
    assert ("mkldnn::_linear_pointwise" in small) == avx512
    assert "mkldnn::_linear_pointwise" in large


@needs_onednn
@pytest.mark.parametrize("avx512", [False, True])
def test_transposed_inputs_take_f_linear_without_avx512(monkeypatch, avx512):
    """Without AVX-512 a non-contiguous input goes to F.linear (MKL reads it transposed in place; oneDNN's op would
    copy it), in the forward and for the weight gradient grad^T @ x of the backward; contiguous ones stay on oneDNN."""
    _auto_rule(monkeypatch, intel_mkl=False, avx512=avx512)
    torch.manual_seed(10)
    x_t, w = torch.randn(192, 1568).t(), torch.randn(768, 192) / 14  # x: [1568, 192], a transposed view
    with torch.inference_mode():
        transposed, contiguous = _ops_run(lambda: linear(x_t, w)), _ops_run(lambda: linear(x_t.contiguous(), w))
        _close_to_float64(linear(x_t, w), x_t, w)
    assert ("mkldnn::_linear_pointwise" in transposed) == avx512
    assert "mkldnn::_linear_pointwise" in contiguous
    x = x_t.contiguous().requires_grad_()
    weight = w.clone().requires_grad_()
    grad = torch.randn(1568, 768)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        linear(x, weight).backward(grad)
    onednn_calls = sum(e.count for e in prof.key_averages() if e.key == "mkldnn::_linear_pointwise")
    assert onednn_calls == (3 if avx512 else 2)  # forward, grad @ W (contiguous grad); grad^T @ x: MKL without
    _close_to_float64(weight.grad, grad.t().contiguous(), x.detach().t().contiguous())


@needs_onednn
@pytest.mark.parametrize("avx512", [False, True])
def test_intel_cpus_with_mkl_take_f_linear_by_default(monkeypatch, avx512):
    """With PyTorch's MKL on an Intel CPU the default takes F.linear for every product (MKL's own AVX-512 kernels are
    the faster there), forward, backward and with an activation; use_onednn(True) still takes oneDNN."""
    _auto_rule(monkeypatch, intel_mkl=True, avx512=avx512)
    torch.manual_seed(11)
    x, w = torch.randn(1568, 192), torch.randn(768, 192) / 14  # 462 MFLOP: oneDNN's on any other CPU
    with torch.inference_mode():
        plain, activated = _ops_run(lambda: linear(x, w)), _ops_run(lambda: linear(x, w, activation="relu"))
        _activation_close_to_float64(linear(x, w, activation="relu"), x, w, "relu")
    assert "mkldnn::_linear_pointwise" not in plain | activated and "aten::relu_" in activated
    leaf = x.clone().requires_grad_()
    assert "mkldnn::_linear_pointwise" not in _ops_run(lambda: linear(leaf, w).sum().backward())
    with onednn_linears(True), torch.inference_mode():
        assert "mkldnn::_linear_pointwise" in _ops_run(lambda: linear(x, w))
    with onednn_linears(None):
        monkeypatch.setattr(linear_op, "_blas_is_intel_mkl_on_intel", lambda: False)
        assert linear_op.onednn_is_faster(x, w)  # the same product on an AMD CPU (with AVX-512 or without)


def test_the_vendor_rule_reads_this_cpu():
    """The rule's facts come from this machine: the vendor string of /proc/cpuinfo (or the platform's) and whether
    PyTorch has MKL."""
    vendor = linear_op._cpu_vendor()
    try:
        with open("/proc/cpuinfo") as f:
            ids = {line.split(":", 1)[1].strip() for line in f if line.startswith("vendor_id")}
    except OSError:
        ids = set()
    if ids:
        assert ids == {vendor}
    assert linear_op._blas_is_intel_mkl_on_intel() == (vendor == "GenuineIntel" and torch.backends.mkl.is_available())


def test_the_mode_comes_from_use_onednn_or_the_environment(monkeypatch):
    with onednn_linears(None):
        assert linear_op._mode() is None
    monkeypatch.setattr(linear_op, "_setting", linear_op._UNSET)
    for value, mode in (("", False), ("0", False), ("off", False), ("1", True), ("ON", True), ("auto", None)):
        monkeypatch.setenv("VRWKV_ONEDNN", value)
        assert linear_op._mode() is mode
    monkeypatch.delenv("VRWKV_ONEDNN")
    assert linear_op._mode() is None
    monkeypatch.setenv("VRWKV_ONEDNN", "fast")
    with pytest.raises(ValueError, match="VRWKV_ONEDNN must be 1, 0 or auto, got 'fast'"):
        linear(torch.randn(4, 8), torch.randn(3, 8))
    with pytest.raises(TypeError, match="True, False or None"):
        linear_op.use_onednn("yes")


@pytest.mark.parametrize("onednn", [False, True])
def test_into_takes_the_product_where_torch_mm_computes_it(onednn):
    """``into=``: through torch.mm (F.linear's path) the product is written into the buffer, bit for bit F.linear's;
    through oneDNN, with a bias, a batched x, autograd or a buffer that does not fit, a new tensor as without it."""
    x, w = torch.randn(37, 24), torch.randn(16, 24)
    buffer = torch.full((37, 16), float("nan"))
    with onednn_linears(onednn):
        out = linear(x, w, into=buffer)
        if onednn and onednn_enabled():
            assert out.data_ptr() != buffer.data_ptr() and torch.isnan(buffer).all()
        else:
            assert out.data_ptr() == buffer.data_ptr()
            assert torch.equal(out, F.linear(x, w))
        _close_to_float64(out, x, w)
        relu = linear(x, w, activation="relu", into=buffer)
        assert torch.equal(relu, F.linear(x, w).relu()) or onednn
    with onednn_linears(False):
        b = torch.randn(16)
        not_taken = [
            (x, w, b, buffer),  # a bias
            (x.view(1, 37, 24), w, None, buffer),  # not 2-D
            (x, w, None, torch.empty(36, 16)),  # wrong shape
            (x, w, None, torch.empty(16, 37).t()),  # not contiguous
            (x, w, None, torch.empty(37, 16, dtype=torch.float64)),  # another dtype
        ]
        for xi, wi, bi, into in not_taken:
            out = linear(xi, wi, bi, into=into)
            assert out.data_ptr() != into.data_ptr()
            assert torch.equal(out, F.linear(xi, wi, bi))
        xg = x.clone().requires_grad_()
        out = linear(xg, w, into=buffer)
        assert out.data_ptr() != buffer.data_ptr() and out.requires_grad


def test_product_takes_buffer_says_where_into_is_taken():
    x, w = torch.randn(37, 24), torch.randn(16, 24)
    with onednn_linears(False):
        assert product_takes_buffer(x, w)
        assert not product_takes_buffer(x, w, torch.randn(16))  # a bias
        assert not product_takes_buffer(x.view(1, 37, 24), w)  # not 2-D
        assert not product_takes_buffer(x.double(), w)  # dtypes differ
        assert not product_takes_buffer(x.requires_grad_(), w)  # autograd
    if onednn_enabled():
        with onednn_linears(True):
            assert not product_takes_buffer(torch.randn(37, 24), w)  # oneDNN makes its own output
