import pytest

from vrwkv.engine.classification import ClassificationExperiment, make_config
from vrwkv.engine.config import from_dict, list_presets, load_preset, parse_overrides, to_dict


def test_every_preset_builds_a_valid_config():
    names = list_presets()
    assert {"digits", "vrwkv_tiny_imagenet", "vrwkv_small_imagenet", "vrwkv_base_imagenet",
            "vrwkv_large_imagenet_ft384"} <= set(names)
    for name in names:
        cfg = make_config(name)
        assert cfg.schedule.epochs >= 1 and cfg.data.batch_size >= 1
    small = make_config("vrwkv_small_imagenet")  # inherits the tiny recipe, adds mixup + drop path
    assert (small.model.name, small.model.drop_path_rate, small.task.mixup, small.task.cutmix) == \
        ("vrwkv_small", 0.3, 0.8, 1.0)
    assert small.optim.lr == 1e-3 and small.schedule.warmup_epochs == 20 and small.data.re_prob == 0.25


def test_overrides_are_typed_and_nested():
    cfg = make_config("digits", ["optim.lr=3e-4", "model.kwargs.depth=2", "data.scale=[0.5, 1.0]",
                                 "optim.clip_grad=null", "run.ema=true"])
    assert cfg.optim.lr == 3e-4 and cfg.model.kwargs == {"patch_size": 4, "embed_dim": 96, "depth": 2}
    assert cfg.data.scale == (0.5, 1.0) and cfg.optim.clip_grad is None and cfg.run.ema is True
    assert from_dict(ClassificationExperiment, to_dict(cfg)) == cfg  # YAML round trip


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "unknown config key 'optim.lrr'"),
    ("optim.lr=fast", "optim.lr: expected a number"),
    ("run.accum_steps=1.5", "expected an integer"),
    ("data.scale=[1]", "expected a list of 2"),
    ("nonsense", "not of the form"),
])
def test_bad_overrides_raise_clear_errors(override, message):
    with pytest.raises(ValueError, match=message):
        make_config("digits", [override])


def test_unknown_preset_and_bad_yaml(tmp_path):
    with pytest.raises(ValueError, match="unknown preset 'nope'.*digits"):
        load_preset("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ValueError, match="mapping"):
        load_preset(str(bad))
    custom = tmp_path / "mine.yaml"
    custom.write_text("preset: digits\noptim: {lr: 0.5}\n")
    assert make_config(str(custom)).optim.lr == 0.5 and make_config(str(custom)).data.dataset == "digits"
    assert parse_overrides(["a.b=1", "a.c=x"]) == [(["a", "b"], 1), (["a", "c"], "x")]
    assert make_config("digits", ["model.kwargs={depth: 2}"]).model.kwargs == {"depth": 2}  # a mapping replaces
