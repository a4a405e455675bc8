"""The whole loop on a tiny folder: train, evaluate, predict. In the fast tier through `imgclf.cli.main` in this
process (the command line's own code, one torch import); as real processes in the slow tier."""

import json

import pytest
from conftest import run_cli

from imgclf.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")  # in-process trainings: one intra-op thread (conftest)


@pytest.mark.slow
def test_train_eval_predict_on_tiny_folder(tiny_split_folder, tmp_path):
    run = tmp_path / "run"
    r = run_cli("train", "--data", tiny_split_folder, "--epochs", "2", "--batch-size", "16", "--out", run)
    assert r.returncode == 0, r.stderr
    assert (run / "checkpoints" / "last.pt").is_file()
    r = run_cli("eval", run / "checkpoints" / "best.pt", "--data", tiny_split_folder, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["count"] == 24  # every test picture
    r = run_cli("predict", run / "checkpoints" / "best.pt", tiny_split_folder / "test" / "circle")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 8


def test_train_eval_predict_in_this_process(tiny_split_folder, tmp_path, capsys):
    run, test = tmp_path / "run", tiny_split_folder / "test"
    assert main(["train", "--data", str(tiny_split_folder), "--epochs", "2", "--batch-size", "16", "--device", "cpu",
                 "--out", str(run)]) == 0
    assert "Traceback" not in capsys.readouterr().err
    assert {p.name for p in (run / "checkpoints").iterdir()} == {"best.pt", "last.pt"}
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]

    assert main(["eval", str(run / "checkpoints" / "last.pt"), "--data", str(tiny_split_folder), "--json",
                 "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["count"] == 24 and sum(map(sum, result["confusion"])) == 24
    assert result["accuracy"] == pytest.approx(records[-1]["val_acc"], abs=1e-9)  # what training measured

    assert main(["predict", str(run / "checkpoints" / "best.pt"), str(test / "circle"), str(test / "square"),
                 "--json", "--topk", "3", "--device", "cpu"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["path"] for r in rows] == sorted(map(str, (test / "circle").glob("*.png"))) + \
        sorted(map(str, (test / "square").glob("*.png")))
    assert all(sorted(t["label"] for t in r["top"]) == ["circle", "square", "triangle"] for r in rows)
