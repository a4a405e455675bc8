from conftest import run_cli


def test_train_eval_predict_on_tiny_folder(tiny_split_folder, tmp_path):
    run = tmp_path / "run"
    r = run_cli("train", "--data", tiny_split_folder, "--epochs", "2", "--batch-size", "16", "--out", run)
    assert r.returncode == 0, r.stderr
    assert (run / "checkpoints" / "last.pt").is_file()
    r = run_cli("predict", run / "checkpoints" / "best.pt", tiny_split_folder / "test" / "circle")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 8
