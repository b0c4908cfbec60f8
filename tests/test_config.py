"""vaedec/config.py: defaults, YAML, key=value overrides, errors naming the key, the `--dry-run` round trip,
and every shipped configs/*.yaml."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from conftest import ROOT

import vaedec.config as config_mod
from vaedec.cli import main
from vaedec.config import (
    ConfigError,
    TrainConfig,
    dump_config,
    flatten,
    is_ldm_yaml,
    load_train_config,
    read_yaml,
    validate_train_config,
)

SHIPPED = sorted((ROOT / "configs").glob("*.yaml"))


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_load_and_validate() -> None:
    cfg = load_train_config(None)
    assert cfg == TrainConfig()
    validate_train_config(cfg)
    assert (
        cfg.optim.betas == (0.5, 0.9)
        and cfg.loss.disc_start_step == 50001
        and cfg.run.mixed_precision == "no"
    )


def test_yaml_overrides_nested_fields_only(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    # `1e-5` without a dot is a string to YAML 1.1 (PyYAML): it must still arrive as a number.
    path.write_text(
        "loss:\n  disc_weight: 0.3\noptim:\n  lr: 1e-5\n  betas: [0.6, 0.95]\nmodel:\n  vae: null\n"
    )
    cfg = load_train_config(path)
    assert cfg.loss.disc_weight == 0.3 and cfg.optim.lr == 1e-5 and cfg.optim.betas == (0.6, 0.95)
    assert isinstance(cfg.optim.lr, float) and isinstance(cfg.optim.betas, tuple)
    # everything else keeps its default
    default = TrainConfig()
    assert cfg == dataclasses.replace(
        default,
        loss=dataclasses.replace(default.loss, disc_weight=0.3),
        optim=dataclasses.replace(default.optim, lr=1e-5, betas=(0.6, 0.95)),
    )


def test_config_files_layer_in_order(tmp_path) -> None:
    """A recipe file, then a schedule file over it: the later file wins field by field, the rest stays."""
    recipe = write_yaml(tmp_path / "recipe.yaml", {"loss": {"pixel_loss": "l2", "disc_weight": 0.3},
                                                   "optim": {"lr": 1e-5}})
    schedule = write_yaml(tmp_path / "schedule.yaml", {"optim": {"lr": 5e-4}, "run": {"max_steps": 7}})
    cfg = load_train_config([recipe, schedule], ["run.max_steps=9"])
    assert (cfg.loss.pixel_loss, cfg.loss.disc_weight, cfg.optim.lr, cfg.run.max_steps) == (
        "l2",
        0.3,
        5e-4,
        9,
    )
    assert load_train_config([schedule, recipe]).optim.lr == 1e-5
    result = CliRunner().invoke(
        main, ["train", "S", "--config", str(recipe), "--config", str(schedule), "--dry-run"]
    )
    assert result.exit_code == 0, result.output
    dumped = yaml.safe_load(result.stdout)
    assert dumped["optim"]["lr"] == 5e-4 and dumped["loss"]["pixel_loss"] == "l2"
    assert dumped["run"]["output"] == "runs/schedule"  # named after the last file


def test_key_value_overrides_dotted_and_bare(tmp_path) -> None:
    path = write_yaml(tmp_path / "c.yaml", {"run": {"max_steps": 10}, "optim": {"lr": 1.0e-4}})
    overrides = [
        "optim.lr=2e-5",
        "max_steps=7",
        "disc_norm=group",
        "disc_lr=3e-5",
        "model.vae=some/folder",
        "run.seed=3",
        "train_post_quant_conv=false",
    ]
    cfg = load_train_config(path, overrides)
    assert cfg.optim.lr == 2e-5 and cfg.optim.disc_lr == 3e-5  # the override wins over the file
    assert cfg.run.max_steps == 7 and cfg.run.seed == 3  # bare key resolved to its one section
    assert (
        cfg.loss.disc_norm == "group"
        and cfg.model.vae == "some/folder"
        and cfg.model.train_post_quant_conv is False
    )
    assert (
        load_train_config(None, ["optim.disc_lr="]).optim.disc_lr is None
    )  # empty value = None where allowed


def test_ambiguous_bare_key_is_an_error(monkeypatch) -> None:
    # No field name is shared by two sections today, so a section with a clashing `lr` is added for the test.
    @dataclasses.dataclass(frozen=True)
    class Extra:
        lr: float = 0.1

    real = config_mod._section_types()
    monkeypatch.setattr(config_mod, "_section_types", lambda: {**real, "extra": Extra})
    with pytest.raises(ConfigError, match=r"'lr' is ambiguous.*optim\.lr.*extra\.lr"):
        load_train_config(None, ["lr=1e-4"])
    assert load_train_config(None, ["optim.lr=1e-4"]).optim.lr == 1e-4  # the dotted form resolves it


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("optim.nope=1", "optim.nope"),
        ("nope=1", "nope"),
        ("lossy.disc_weight=1", "lossy.disc_weight"),  # unknown section, written as a dotted key
        ("run.max_steps=abc", "run.max_steps"),
        ("run.max_steps=1.5", "run.max_steps"),
        ("max_steps=true", "run.max_steps"),
        ("model.train_post_quant_conv=maybe", "model.train_post_quant_conv"),
        ("loss.disc_loss=wasserstein", "loss.disc_loss"),
        ("optim.betas=[0.5]", "optim.betas"),
        ("optim.lr=fast", "optim.lr"),
    ],
)
def test_bad_override_names_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_train_config(None, [override])


def test_override_without_equals_sign() -> None:
    with pytest.raises(ConfigError, match="max_steps"):
        load_train_config(None, ["max_steps"])


def test_yaml_errors_name_the_section_or_key(tmp_path) -> None:
    with pytest.raises(ConfigError, match="unknown section 'lossy'"):
        load_train_config(write_yaml(tmp_path / "a.yaml", {"lossy": {"disc_weight": 1.0}}))
    with pytest.raises(ConfigError, match=r"b\.yaml: unknown config key 'loss\.disc_wieght'"):
        load_train_config(write_yaml(tmp_path / "b.yaml", {"loss": {"disc_wieght": 1.0}}))
    with pytest.raises(ConfigError, match=r"c\.yaml: .*run\.max_steps"):
        load_train_config(write_yaml(tmp_path / "c.yaml", {"run": {"max_steps": "many"}}))
    with pytest.raises(ConfigError, match="'loss' must be a mapping"):
        load_train_config(write_yaml(tmp_path / "d.yaml", {"loss": 3}))
    with pytest.raises(ConfigError, match="does not exist"):
        load_train_config(tmp_path / "missing.yaml")
    # A section whose keys are all commented out is empty, not an error.
    (tmp_path / "e.yaml").write_text("loss:\n  # disc_weight: 0.5\nrun:\n  max_steps: 7\n")
    assert load_train_config(tmp_path / "e.yaml").run.max_steps == 7


def test_validation_rejects_values_that_would_fail_later() -> None:
    for override, message in [
        ("run.max_steps=0", "run.max_steps"),
        ("optim.ema_decay=1.0", "optim.ema_decay"),
        ("data.batch_size_per_device=0", "data.batch_size_per_device"),
        ("optim.lr=-1", "optim.lr"),
    ]:
        with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
            load_train_config(None, [override])


@pytest.mark.parametrize("config", [None, ROOT / "configs" / "demo.yaml"], ids=["defaults", "demo"])
def test_dry_run_prints_yaml_that_round_trips(tmp_path, config) -> None:
    args = ["train", str(tmp_path / "shards"), "max_steps=5", "optim.lr=3e-5", "disc_norm=none"]
    if config is not None:
        args += ["--config", str(config)]
    result = CliRunner().invoke(main, [*args, "--dry-run", "--output", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    printed = write_yaml(tmp_path / "printed.yaml", yaml.safe_load(result.stdout))
    cfg = load_train_config(printed)
    expected = load_train_config(
        config,
        [
            "max_steps=5",
            "optim.lr=3e-5",
            "disc_norm=none",
            f"data.shards={tmp_path / 'shards'}",
            f"run.output={tmp_path / 'out'}",
        ],
    )
    assert cfg == expected
    assert result.stdout == dump_config(expected)  # stdout holds the YAML and nothing else
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_cli_options_beat_overrides_and_default_output_is_named_after_the_config(tmp_path) -> None:
    def dry(*args: str) -> TrainConfig:
        result = CliRunner().invoke(main, ["train", "S", *args, "--dry-run"])
        assert result.exit_code == 0, result.output
        return load_train_config(write_yaml(tmp_path / "p.yaml", yaml.safe_load(result.stdout)))

    assert dry("run.output=elsewhere", "--output", "here").run.output == "here"
    assert dry("data.shards=other").data.shards == "S"
    assert dry().run.output == "runs/run"
    assert dry("--config", str(ROOT / "configs" / "demo.yaml")).run.output == "runs/demo"


def test_cli_reports_config_errors_without_traceback(tmp_path) -> None:
    result = CliRunner().invoke(main, ["train", "S", "run.max_steps=abc", "--dry-run"])
    assert result.exit_code == 1 and "run.max_steps" in result.output and "Traceback" not in result.output


def test_shipped_configs_exist() -> None:
    assert ROOT / "configs" / "demo.yaml" in SHIPPED


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_config_loads_and_validates(path: Path) -> None:
    cfg = load_train_config(path)
    validate_train_config(cfg)
    data = read_yaml(path)
    if not is_ldm_yaml(data):  # our own format: every key in the file arrives in the config unchanged
        for key, value in flatten(data, str(path)).items():
            section, name = key.split(".")
            got = getattr(getattr(cfg, section), name)
            if isinstance(got, float) and isinstance(value, str):
                value = float(value)  # YAML 1.1 reads 4.5e-6 as a string; float fields accept it
            assert got == (tuple(value) if isinstance(value, list) else value), key


def test_numeric_looking_strings_stay_strings_in_string_fields() -> None:
    cfg = load_train_config(None, ["run.output=1e3", "optim.lr=1e-5"])
    assert cfg.run.output == "1e3"  # a folder name, not the float 1000.0
    assert cfg.optim.lr == 1e-5  # YAML 1.1 reads 1e-5 as a string; a float field takes it


def test_train_arguments_keep_yaml_special_characters() -> None:
    """SHARDS, --output and --vae reach the config as written, though ': ' and ' #' mean something in YAML."""
    args = ["train", "pipe:cat /d/{name} # x: y", "--output", "runs/a #1: b", "--vae", "v: w #z", "--dry-run"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    cfg = yaml.safe_load(result.output)
    assert (
        cfg["data"]["shards"] == args[1]
        and cfg["run"]["output"] == args[3]
        and cfg["model"]["vae"] == args[5]
    )


def test_typed_values_come_last_unparsed_and_checked_like_overrides(tmp_path) -> None:
    """load_train_config's `values` (what the CLI hands over for SHARDS, --output, --vae, --mix) override the
    YAML and the key=value text, keep every character, and are type-checked and validated as the rest."""
    path = write_yaml(tmp_path / "c.yaml", {"run": {"max_steps": 10, "output": "from-yaml"}})
    cfg = load_train_config(path, ["run.output=from-text", "max_steps=20"],
                            {"run.output": "runs/a #1: b", "data.mix": ["x: y #z:0.25"], "max_steps": 30})
    assert (cfg.run.output, cfg.data.mix, cfg.run.max_steps) == ("runs/a #1: b", ("x: y #z:0.25",), 30)
    with pytest.raises(ConfigError, match="run.max_steps: expected an integer"):
        load_train_config(None, values={"run.max_steps": "30"})
    with pytest.raises(ConfigError, match="data.mix entry 'nowhere' must look like PATH:P"):
        load_train_config(None, values={"data.mix": ["nowhere"]})
