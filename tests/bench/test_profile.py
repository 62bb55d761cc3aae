"""The profile breakdown (``vrwkv profile``): attribution rules, and a real profiled call of a tiny model."""
import json

import pytest
import timm

import vrwkv  # noqa: F401  (registers the models)
from vrwkv.bench.profile import OTHER, UNTRACKED, WKV, category_of, format_breakdown, profile_model
from vrwkv.cli import main


def test_operators_inside_the_wkv_count_as_the_wkv_whatever_they_are():
    assert category_of("aten::bmm", ["aten::matmul", "vrwkv::bi_wkv", "SpatialMix"]) == WKV
    assert category_of("aten::mm", ["autograd::engine::evaluate_function: _BlockedBiWKVBackward"]) == WKV
    assert category_of("vrwkv::fused_bi_wkv", []) == WKV
    assert category_of("aten::bmm", ["aten::matmul"]) == "matmul"
    assert category_of("mkldnn::_linear_pointwise", ["_ShiftMixLinearBackward"]) == "matmul"
    assert category_of("vrwkv::fused_q_shift_lerp", []) == "Q-Shift and mixes"
    assert category_of("aten::native_layer_norm", []) == "LayerNorm"
    assert category_of("aten::sigmoid_", []) == "activations"
    assert category_of("aten::something_new", []) == OTHER


@pytest.mark.parametrize("mode", ["infer", "train"])
def test_profile_of_a_tiny_model_adds_up_to_the_call(mode):
    model = timm.create_model("test_vrwkv", img_size=(32, 32))
    b = profile_model(model, "test_vrwkv", (32, 32), batch=2, mode=mode, warmup=1, measure_peak=False)
    assert b.tokens == 2 * (32 // model.patch_size) ** 2
    # the categories (own times of the operators, plus what ran outside them) make up the profiled call
    assert sum(b.seconds.values()) == pytest.approx(b.wall_s, rel=0.05)
    assert b.seconds["matmul"] > 0 and b.seconds[WKV] > 0 and b.seconds[UNTRACKED] >= 0
    assert b.flops > 0 and b.matmul_gflops > 0
    if mode == "train":  # the backward's products are counted too: about three times the forward's
        forward = profile_model(model, "test_vrwkv", (32, 32), batch=2, mode="infer", warmup=0, measure_peak=False)
        assert 2.5 * forward.flops < b.flops < 3.5 * forward.flops
    text = format_breakdown(b, top=3)
    assert "| matmul |" in text and f"| {WKV} |" in text and "µs per token" in text


def test_profile_cli_prints_and_writes_the_breakdown(tmp_path, capsys):
    path = tmp_path / "b.json"
    assert main(["profile", "test_vrwkv", "--size", "32", "--top", "2", "--json", str(path)]) == 0
    assert "| category | µs / token | share |" in capsys.readouterr().out
    saved = json.loads(path.read_text())
    assert saved["model"] == "test_vrwkv" and saved["seconds"]["matmul"] > 0
    # with the fused numba kernels: their ranges are the Bi-WKV's and the mixes'
    assert main(["profile", "test_vrwkv", "--size", "32", "--numba", "--top", "30"]) == 0
    out = capsys.readouterr().out
    assert "vrwkv::fused_bi_wkv" in out and f"| {WKV} |" in out
    assert main(["profile", "test_vrwkv", "--size", "8"]) == 2
    assert "--size" in capsys.readouterr().err
    assert main(["profile", "no_such_model"]) == 2
    assert "cannot build" in capsys.readouterr().err
