"""The retrv-r1 CLI on bad input: one ``retrv-r1: error: ...`` line naming the problem, exit 2."""

import json
import sys
from pathlib import Path

import pytest
import torch

from retrv_r1_plugin.cli import main, read_corpus

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import make_text_model  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    make_text_model(seed=3, max_candidates=8).save_pretrained(path)
    return str(path)


@pytest.fixture
def corpus(tmp_path):
    f = tmp_path / "corpus.jsonl"
    f.write_text('{"id": "a", "text": "plants make sugar from sunlight"}\n{"id": "b", "text": "rockets fly to the moon"}\n')
    return f


def run(args, capsys):
    rc = main(args)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def one_error_line(err: str) -> str:
    """The one ``retrv-r1: error:`` line of ``err`` (progress bars and notes may precede it)."""
    lines = [l for l in err.splitlines() if l.startswith("retrv-r1: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("device", ["bogus", "cuda"])
def test_a_device_torch_cannot_use_is_a_clear_error(device, checkpoint, capsys):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    rc, out, err = run(["rank", "q", "alpha", "beta", "--model", checkpoint, "--device", device], capsys)
    assert rc == 2 and out == ""
    assert f"--device {device!r}" in one_error_line(err)


@pytest.mark.parametrize("args, option", [
    (["search", "q", "--top-k", "0"], "--top-k"),
    (["search", "q", "--top-k", "-3"], "--top-k"),
    (["search", "q", "--top-n", "0"], "--top-n"),
    (["search", "q", "--top-n", "-1"], "--top-n"),
    (["index", "x.jsonl", "--batch-size", "0"], "--batch-size"),
    (["rank", "q", "a", "--reasoning-budget", "-1"], "--reasoning-budget"),
    (["rank", "q", "a", "--max-inspections", "-1"], "--max-inspections"),
])
def test_counts_below_their_minimum_are_usage_errors(args, option, tmp_path, capsys):
    # --model points nowhere: the option must be refused before any model or store is touched
    model = [] if args[0] == "index" else ["--model", str(tmp_path / "no-model")]
    with pytest.raises(SystemExit) as info:
        main(args + model + ["--store", str(tmp_path / "q")] * (args[0] != "rank"))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: must be an int >=" in err
    assert not (tmp_path / "q").exists()


def test_a_bad_model_from_the_environment_names_the_variable(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RETRV_R1_MODEL", str(tmp_path / "nope"))
    rc, _, err = run(["rank", "q", "a"], capsys)
    assert rc == 2
    line = one_error_line(err)
    assert "$RETRV_R1_MODEL=" in line and "no model directory" in line

