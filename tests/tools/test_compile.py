"""torch.compile of a tiny VRWKV on CPU (inductor, C++ kernels), and the clean eager fallback without a compiler."""
import pytest
import torch
from conftest import rel_err

import vrwkv
from vrwkv.tools.compile import compile_model, cpp_compiler


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny():
    torch.manual_seed(0)
    # one block keeps the inductor's C++ build short; V1 is the harder case (a graph break per Bi-WKV call)
    return vrwkv.create_model("test_vrwkv", depth=1, img_size=32).eval()


@pytest.mark.skipif(cpp_compiler() is None, reason="no C++ compiler: the fallback test below covers this machine")
def test_compile_model_inductor_matches_eager():
    model = _tiny()
    compiled = compile_model(model)
    assert compiled is not model and compiled._orig_mod is model
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert rel_err(compiled(x), model(x)) < 1e-5


def test_compile_model_falls_back_without_a_cxx_compiler(monkeypatch):
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config.cpp, "cxx", (None, "/nonexistent/bin/g++"))
    assert cpp_compiler() is None
    model = _tiny()
    with pytest.warns(RuntimeWarning, match="needs a C\\+\\+ compiler"):
        out = compile_model(model)
    assert out is model  # eager: runs as before
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.isfinite(out(x)).all()
