"""Configuration files (issue 16, point 1): `imgclf train --config FILE`, `--print-config`, RUN/config.yaml,
the recipes as YAML files, `imgclf.fit(config=...)`; every bad key or value is one line naming it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import write_class_folder

import imgclf
from imgclf.cli import build_parser, main, train_config
from imgclf.config import TrainConfig
from imgclf.configfile import RECIPES, config_yaml, read_config, recipe_folder, recipe_names
from imgclf.errors import EXIT_USAGE, UserError

pytestmark = pytest.mark.usefixtures("one_thread")  # in-process trainings: one intra-op thread (conftest)


def resolved(*argv: str) -> TrainConfig:
    """The TrainConfig `imgclf train ARGV` would train with."""
    return train_config(build_parser().parse_args(["train", *map(str, argv)]))


def printed(capsys, *argv) -> str:
    assert main(["train", *map(str, argv), "--print-config"]) == 0
    return capsys.readouterr().out


def one_error_line(capsys, *argv) -> str:
    assert main(["train", *map(str, argv)]) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("imgclf: error: "), err
    return err[0]


def test_print_config_round_trips_to_the_same_configuration(tmp_path, capsys):
    argv = ["--recipe", "records", "--lr", "0.1", "--img-size", "40", "--model-args", '{"width": 8}', "--no-tta",
            "--patience", "2", "--data", "some folder: with colon", "--out", tmp_path / "r"]
    text = printed(capsys, *argv)
    (tmp_path / "a.yaml").write_text(text)
    assert resolved("--config", tmp_path / "a.yaml") == resolved(*argv)
    assert printed(capsys, "--config", tmp_path / "a.yaml") == text  # and prints the same file again
    cfg = resolved("--config", tmp_path / "a.yaml")
    assert (cfg.model.name, cfg.optim.lr, cfg.data.img_size, cfg.run.tta, cfg.data.data) == \
        ("fastnet", 0.1, 40, False, "some folder: with colon")


def test_flags_win_over_the_file_and_the_file_over_the_recipe(tmp_path):
    (tmp_path / "run.yaml").write_text("lr: 1e-3  # YAML reads this as text: read as the flag would\n"
                                       "batch-size: 32\nepochs: 7\nmodel_args: {width: 4}\n")
    cfg = resolved("--recipe", "notes", "--config", tmp_path / "run.yaml", "--epochs", "2")
    assert cfg.optim.lr == 1e-3 and cfg.data.batch_size == 32  # the file over the recipe's 0.01 and 64
    assert cfg.optim.epochs == 2  # the flag over the file
    assert cfg.optim.momentum == 0.0 and cfg.data.augment == "none"  # the recipe's, where the file is silent
    assert json.loads(cfg.model.args) == {"width": 4}


@pytest.mark.parametrize(("text", "words"), [
    ("lrr: 0.1\n", "unknown key 'lrr'; did you mean 'lr'?"),
    ("batch_sise: 8\n", "unknown key 'batch_sise'; did you mean 'batch_size'?"),
    ("optim:\n  momentun: 0.5\n", "unknown key 'optim.momentun'; did you mean 'optim.momentum'?"),
    ("lr: fast\n", "lr: 'fast' is not a number (--lr takes a number)"),
    ("epochs: 2.5\n", "epochs: 2.5 is not a whole number"),
    ("nesterov: 1\n", "nesterov: 1 is not true or false"),
    ("augment: flp\n", "augment: 'flp' is not one of auto, none, flip"),
    ("- lr: 0.1\n", "must be a mapping of option: value lines"),
    ("lr: [0.1\n", "is not valid YAML at line 2"),
])
def test_a_bad_key_or_value_is_one_line_naming_it(tmp_path, capsys, text, words):
    (tmp_path / "bad.yaml").write_text(text)
    line = one_error_line(capsys, "--config", tmp_path / "bad.yaml")
    assert str(tmp_path / "bad.yaml") in line and words in line, line


def test_a_missing_file_is_one_line(tmp_path, capsys):
    line = one_error_line(capsys, "--config", tmp_path / "nope.yaml")
    assert "cannot read the configuration file" in line and "nope.yaml" in line


def test_range_errors_of_file_values_name_the_option(tmp_path, capsys):
    (tmp_path / "r.yaml").write_text("lr: -1\n")
    assert "--lr must be positive, got -1" in one_error_line(capsys, "--config", tmp_path / "r.yaml")


def test_recipes_are_yaml_files_read_by_the_same_path():
    assert set(recipe_names()) == {"default", "fast", "fast-long", "finetune", "notes", "photos", "records"} == set(RECIPES)
    for name in recipe_names():
        path = Path(str(recipe_folder() / f"{name}.yaml"))
        assert path.read_text().startswith("#")  # each says what it is, for the person reading it
        assert resolved("--recipe", name) == resolved("--config", path)
        TrainConfig.from_dict(RECIPES[name])  # valid
    fast, long, records = (resolved("--recipe", name) for name in ("fast", "fast-long", "records"))
    assert (fast.model.name, fast.optim.lr, fast.optim.weight_decay, fast.run.tta) == ("fastnet_small", 0.75, 1.33e-3, True)
    # the CPU's time-to-accuracy recipes: progressive resizing, one evaluation after the last epoch
    assert (fast.data.progressive_resize, fast.run.val_every, fast.run.tta_shift, fast.optim.epochs) == (20, 0, False, 5)
    assert (long.model.name, long.data.progressive_resize, long.run.val_every, long.run.tta_shift, long.optim.epochs) \
        == ("fastnet", 20, 0, True, 9)
    # the speed records' own: full-size pictures throughout, an evaluation every epoch
    assert (records.model.name, records.data.progressive_resize, records.run.val_every, records.optim.epochs) \
        == ("fastnet", None, 1, 4)
    assert resolved("--recipe", "notes").optim.lr == 0.01
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert '"recipes/*.yaml"' in pyproject  # shipped in the wheel


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cfgdata")
    write_class_folder(root / "train", ["a", "b"], 6, seed=1)
    write_class_folder(root / "test", ["a", "b"], 3, seed=2)
    return root


@pytest.mark.slow
def test_a_run_folder_holds_config_yaml_that_reruns_it(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(tiny), "--epochs", "1", "--batch-size", "4", "--device", "cpu",
                 "--precision", "fp32", "--lr", "0.02", "--out", str(run)]) == 0
    capsys.readouterr()
    written = TrainConfig.from_dict(json.loads((run / "config.json").read_text()))
    assert resolved("--config", run / "config.yaml") == written
    assert resolved("--config", run / "config.json") == written  # config.json's own layout is read too
    assert (run / "config.yaml").read_text().endswith(config_yaml(written).split("\n", 2)[2])
    line = one_error_line(capsys, "--config", run / "config.yaml")  # its out is taken: said in one line
    assert "already holds a run" in line
    assert main(["train", "--config", str(run / "config.yaml"), "--out", str(tmp_path / "again")]) == 0
    capsys.readouterr()
    assert read_config(tmp_path / "again" / "config.yaml")["run", "out"] == str(tmp_path / "again")


def test_fit_takes_a_config_file(tiny, tmp_path, capsys):
    (tmp_path / "fit.yaml").write_text(f"data: {tiny}\nbatch_size: 4\nlr: 0.02\nepochs: 3\ndevice: cpu\n"
                                       f"precision: fp32\nout: {tmp_path / 'fit'}\n")
    run = imgclf.fit(None, None, config=tmp_path / "fit.yaml", epochs=1)
    capsys.readouterr()
    assert (run.config.optim.lr, run.config.optim.epochs, run.config.data.data) == (0.02, 1, str(tiny))
    assert len(run.metrics) == 1
    with pytest.raises(imgclf.UserError, match="unknown key 'bacth_size'; did you mean 'batch_size'"):
        (tmp_path / "typo.yaml").write_text("bacth_size: 4\n")
        imgclf.fit("tutorial_cnn", tiny, config=tmp_path / "typo.yaml")


def test_a_fifo_or_a_huge_file_as_configuration_is_one_line_not_a_hang(tmp_path):
    """`train --config FIFO` waited for ever for a writer; a 50 MB file was read whole."""
    import os

    from imgclf.configfile import MAX_YAML, read_yaml

    os.mkfifo(tmp_path / "fifo.yaml")
    with pytest.raises(UserError, match=r"fifo.yaml: not a regular file \(a FIFO\)"):
        read_yaml(tmp_path / "fifo.yaml")
    (tmp_path / "big.yaml").write_text("# " + "x" * MAX_YAML + "\nepochs: 1\n")
    with pytest.raises(UserError, match="over the 1,048,576 a configuration needs"):
        read_yaml(tmp_path / "big.yaml")
    (tmp_path / "ok.yaml").write_text("epochs: 1\n")
    assert read_yaml(tmp_path / "ok.yaml") == {"epochs": 1}
