"""Typed configs: YAML presets load, bad keys and unreachable resolutions are refused early."""

import pytest

from greedygrow.config import (
    PRESETS_DIR,
    Config,
    ConfigError,
    GrowConfig,
    config_diff,
    grow_config,
    load_config,
    resolve,
    save_config,
    shell_config,
    validate,
)


def _ready(overrides=(), config_file=None) -> Config:
    cfg = resolve(load_config(config_file, overrides))
    validate(cfg)
    return cfg


@pytest.mark.parametrize("path", sorted(PRESETS_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_preset_loads_and_validates(path, tmp_path):
    cfg = load_config(path)
    if (
        "grow" in path.stem
    ):  # against the phase-1 preset of its name (scenes-128-core), else core-cpu
        phase1 = PRESETS_DIR / path.name.replace("grow", "core")
        core = resolve(load_config(phase1 if phase1.is_file() else "core-cpu"))
        save_config(core, tmp_path / "core" / "config.yaml")
        cfg = grow_config(str(tmp_path / "core"), cfg.model.resolution, "greedy", None, path)
    validate(resolve(cfg))


def test_presets_load_by_name_and_unknown_names_list_them():
    assert load_config("demo-core") == load_config(PRESETS_DIR / "demo-core.yaml")
    with pytest.raises(ConfigError, match=r"presets:.*core-cpu"):
        load_config("no-such-preset")


def test_defaults_are_a_valid_phase1_config():
    cfg = _ready()
    assert cfg.phase == "core" and cfg.data.min_native == 0
    assert shell_config(cfg).kind == "shallow"


def test_overrides_are_typed_and_applied():
    cfg = _ready(
        ["run.steps=7", "optim.lr=1e-3", "model.core_overrides.depth=2", "run.precision=bf16"]
    )
    assert cfg.run.steps == 7 and cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.model.core_overrides == {"depth": 2} and cfg.run.precision == "bf16"


def test_unknown_key_on_command_line_is_refused_with_the_valid_keys():
    with pytest.raises(ConfigError, match=r"run\.stepz.*Valid keys under 'run'.*steps"):
        load_config(overrides=["run.stepz=10"])


def test_unknown_section_is_refused():
    with pytest.raises(ConfigError, match="optimizer"):
        load_config(overrides=["optimizer.lr=1"])


def test_unknown_key_in_yaml_file_is_refused_naming_the_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("run:\n  steps: 5\n  batchsize: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*run\.batchsize"):
        load_config(f)


def test_wrong_type_is_refused():
    with pytest.raises(ConfigError, match=r"run\.steps"):
        load_config(overrides=["run.steps=many"])


def test_override_without_equals_is_refused():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(overrides=["run.steps"])


def test_unknown_core_override_field_is_refused():
    with pytest.raises(ConfigError, match=r"core_overrides.*widht"):
        _ready(["model.core_overrides.widht=64"])


def test_missing_config_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.resolution=48"],  # not grid × 2^k
        ["grow.mode=greedy", "grow.core=x", "model.resolution=16"],  # grown shell needs ≥ 2G
        ["grow.mode=greedy", "grow.core=x", "model.resolution=4096"],  # deeper than the family
    ],
)
def test_unreachable_resolution_is_refused(overrides):
    with pytest.raises(ConfigError, match=r"model\.resolution=\d+ does not work.*(reach|grid)"):
        _ready(overrides)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["data.caption_dropout=1.0"], "caption_dropout"),
        (["run.precision=fp16"], "precision"),
        (["optim.schedule=linear"], "optim.schedule"),
        (["grow.mode=sideways", "grow.core=x"], "grow.mode"),
        (["grow.mode=greedy"], "needs a phase-1 run"),
        (
            ["grow.mode=greedy", "grow.core=x", "grow.freeze_steps=10", "model.resolution=64"],
            "unfreeze",
        ),
        (["data.source=folder"], "data.path"),
        (["data.text_max_length=64"], "text_len"),
        (["data.text_table_mb=-1"], "data.text_table_mb must be >= 0"),
        (["data.scene_cache_mb=-1"], "data.scene_cache_mb must be >= 0"),
    ],
)
def test_invalid_values_are_refused(overrides, match):
    with pytest.raises(ConfigError, match=match):
        _ready(overrides)


def test_grow_resolves_the_high_resolution_subset_and_freeze_steps():
    greedy = _ready(["grow.mode=greedy", "grow.core=x", "model.resolution=128"])
    assert greedy.data.min_native == 128 and greedy.grow.freeze_steps == -1
    assert shell_config(greedy).kind == "grown"
    unfreeze = _ready(["grow.mode=unfreeze", "grow.core=x", "model.resolution=64", "run.steps=400"])
    assert unfreeze.grow.freeze_steps == 100
    joint = _ready(["grow.mode=joint", "grow.core=x", "model.resolution=64"])
    assert joint.grow.freeze_steps == 0


def test_saved_config_reads_back_equal(tmp_path):
    cfg = _ready(
        ["run.steps=3", "model.core_overrides.depth=1", "model.shell_overrides.channels=[32]"]
    )
    save_config(cfg, tmp_path / "config.yaml")
    back = load_config(tmp_path / "config.yaml")
    assert back == cfg
    assert shell_config(back).channels == (32,)


def test_config_diff_names_the_keys_that_matter():
    a = _ready(["run.steps=10", "optim.lr=1e-3"])
    b = _ready(["run.steps=20", "optim.lr=2e-3", "model.core_overrides.depth=2"])
    diff = config_diff(a, b)
    assert any(d.startswith("optim.lr") for d in diff)
    assert any(d.startswith("model.core_overrides") for d in diff)
    assert not any(d.startswith("run.steps") for d in diff)  # extending a run is a resume


@pytest.mark.parametrize(
    ("mode", "freeze_steps", "frozen_at"),
    [
        ("greedy", -1, {0: True, 1: True, 10**9: True}),
        ("unfreeze", 5, {0: True, 4: True, 5: False, 6: False}),
        ("unfreeze", 0, {0: False, 1: False}),
        ("joint", 0, {0: False, 7: False}),
        ("scratch", 0, {0: False, 7: False}),
        (None, None, {0: False}),
    ],
)
def test_core_frozen_at_table(mode, freeze_steps, frozen_at):
    grow = GrowConfig(mode=mode, core="x", freeze_steps=freeze_steps)
    for step, frozen in frozen_at.items():
        assert grow.core_frozen_at(step) is frozen, (mode, step)


@pytest.mark.parametrize(
    ("mode", "freeze_steps", "message"),
    [
        ("greedy", "100", "greedy keeps the core frozen for ever"),
        ("unfreeze", "-1", "must be >= 0 for --mode unfreeze"),
        ("joint", "100", "--mode joint trains the core from step 0"),
        ("scratch", "5", "--mode scratch trains the core from step 0"),
        ("frozen", "-1", "grow.mode must be one of"),
        ("unfreeze", "2.5", r"grow\.freeze_steps"),
    ],
)
def test_bad_mode_or_freeze_steps_is_refused(mode, freeze_steps, message):
    over = [f"grow.mode={mode}", "grow.core=x", f"grow.freeze_steps={freeze_steps}"]
    with pytest.raises(ConfigError, match=message):
        _ready([*over, "model.resolution=64"])
