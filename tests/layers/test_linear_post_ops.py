"""layers.linear: linear_activated fuses the activation after a Linear, except where hooks must see the output."""
import pytest
import torch
import torch.nn.functional as F

from vrwkv.layers import Linear
from vrwkv.layers.linear import linear_activated
from vrwkv.ops.linear import onednn_enabled, onednn_linears


def _ops_run(fn) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages()}


@pytest.mark.parametrize("activation", ["relu", "sigmoid"])
def test_linear_activated_equals_the_module_then_the_activation(activation):
    torch.manual_seed(0)
    layer, x = Linear(192, 768, bias=True), torch.randn(3, 400, 192) * 2  # (above SMALL_PRODUCT_FLOPS)
    act = torch.relu if activation == "relu" else torch.sigmoid
    with torch.no_grad():
        expected = act(F.linear(x, layer.weight, layer.bias))
        out = linear_activated(layer, x, activation)
        with onednn_linears(True):  # (the default takes MKL on Intel CPUs: then the activation follows in place)
            fused_out = linear_activated(layer, x, activation)
            ran = _ops_run(lambda: linear_activated(layer, x, activation))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused_out, expected, rtol=1e-5, atol=1e-6)
    if onednn_enabled():
        assert "mkldnn::_linear_pointwise" in ran and f"aten::{activation}_" not in ran  # fused


def test_hooks_see_the_modules_own_output_and_keep_it():
    """With a forward hook the module is called (the hook sees its output, pre-activation) and the activation runs
    out of place: the tensor the hook kept is not overwritten."""
    torch.manual_seed(1)
    layer, x = Linear(16, 8, bias=False), torch.randn(5, 16)
    seen = []
    handle = layer.register_forward_hook(lambda m, args, out: seen.append(out))
    try:
        with torch.no_grad():
            activated = linear_activated(layer, x, "relu")
    finally:
        handle.remove()
    plain = F.linear(x, layer.weight)
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], plain)  # not ReLU'd in place
    torch.testing.assert_close(activated, torch.relu(plain))


def test_other_modules_are_called_as_they_are():
    """A plain nn.Linear and a Linear subclass with its own forward go through their call."""
    torch.manual_seed(2)

    class Doubled(Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    x = torch.randn(4, 6)
    for layer in (torch.nn.Linear(6, 3), Doubled(6, 3)):
        with torch.no_grad():
            torch.testing.assert_close(linear_activated(layer, x, "sigmoid"), torch.sigmoid(layer(x)))
    with pytest.raises(ValueError, match="activation must be one of"):
        linear_activated(torch.nn.Linear(6, 3), x, "tanh")
