"""The float64 references against the official fixtures (produced from the kernel source, see data/GOLDEN_README.md)."""
import pytest
import torch

from conftest import rel_err
from vrwkv.ops.wkv.reference import naive_official_bi_wkv, naive_paper_bi_wkv


@pytest.mark.parametrize("case", [0, 1, 2], ids=["T37", "T196", "T320"])
def test_references_match_fixture(golden, case):
    c = golden("vrwkv_t")["wkv_op_cases"][case]
    args = (c["k"], c["v"], c["w_div_T"], c["u_div_T"])
    assert rel_err(naive_official_bi_wkv(*args), c["y_kernel_ts32_eps"]) < 1e-13
    assert rel_err(naive_official_bi_wkv(*args, chunks=16), c["y_kernel_ts16_eps"]) < 1e-13
    assert rel_err(naive_paper_bi_wkv(*args), c["y_paper"]) < 1e-13
    # the two semantics really differ on these cases (so the tests above can tell them apart)
    assert rel_err(c["y_paper"], c["y_kernel_ts32_eps"]) > 1e-3


def test_official_equals_distance_formula_for_short_sequences():
    """For T <= 32 (one token per chunk) the kernel computes exp(-|t-i| w + k_i) for i != t (spec section 2.3)."""
    torch.manual_seed(0)
    B, T, C = 2, 9, 5
    k, v = torch.randn(B, T, C, dtype=torch.float64), torch.randn(B, T, C, dtype=torch.float64)
    w, u = torch.randn(C, dtype=torch.float64), torch.randn(C, dtype=torch.float64)
    # exp(-d w) = exp(-w) exp(-(d-1) w): dividing every non-self weight by e^w equals raising u by w
    y_dist = naive_paper_bi_wkv(k, v, w, u + w)
    y_kernel = naive_official_bi_wkv(k, v, w, u, eps=0.0)
    assert rel_err(y_kernel, y_dist) < 1e-12
