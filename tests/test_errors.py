"""Every path a user can type, wrong in each way it can be wrong: one line on stderr
("error: ..."), never a traceback, and nothing overwritten before the error."""
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, SHARED_DATA

import common
import parity
import theory
import wikitext

WT2 = os.path.join(SHARED_DATA, "wikitext-2")
RANKS = os.path.join(SHARED_DATA, "gpt2-tokenizer", "gpt2.tiktoken")
needs_data = pytest.mark.skipif(not os.path.exists(WT2), reason="needs ../shared/data")
PARITY = ["--n", "8", "--k", "2", "--n-train", "100", "--n-val", "50", "--hidden", "32", "--max-steps", "4",
          "--eval-every", "2", "--no-plot"]


def one_line_error(main, args):
    """What the user sees: run_cli's message, checked to be a single 'error:' line."""
    with pytest.raises(SystemExit) as e:
        common.run_cli(lambda: main(args))
    msg = str(e.value.code)
    assert msg.startswith("error: ") and "\n" not in msg, msg
    return msg


def wikitext_args(tmp_path, *extra):
    return ["--preset", "tiny", "--data", WT2, "--train-split", "valid", "--tokenizer-file", RANKS,
            "--cache-dir", str(tmp_path / "cache"), "--max-steps", "2", "--no-plot", *extra]


@pytest.mark.parametrize("script", ["parity.py", "wikitext.py", "theory.py"])
def test_out_dir_that_is_a_file(tmp_path, script):
    target = tmp_path / "taken"
    target.write_text("not a folder")
    r = subprocess.run([sys.executable, os.path.join(ROOT, script), "--out-dir", str(target), "--no-plot",
                        *(["--max-steps", "1"] if script != "theory.py" else ["--draws", "100"])],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode != 0 and r.stderr.strip().count("\n") == 0, r.stderr
    assert r.stderr.startswith("error: --out-dir") and "not a folder" in r.stderr
    assert target.read_text() == "not a folder"


def test_out_dir_that_cannot_be_created(tmp_path):
    (tmp_path / "file").write_text("x")
    msg = one_line_error(parity.main, PARITY + ["--out-dir", str(tmp_path / "file" / "run")])
    assert "cannot be written" in msg


def test_corrupt_checkpoint_is_one_line_and_nothing_is_overwritten(tmp_path):
    out = tmp_path / "run"
    parity.main(PARITY + ["--out-dir", str(out)])
    ckpt = out / "ckpt.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:500])                      # a half-written file
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    msg = one_line_error(parity.main, PARITY + ["--out-dir", str(out), "--resume", "--max-steps", "8"])
    assert str(ckpt) in msg and "corrupt" in msg and "without --resume" in msg
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before


def test_checkpoint_of_another_configuration(tmp_path):
    out = str(tmp_path / "run")
    parity.main(PARITY + ["--out-dir", out])
    msg = one_line_error(parity.main, PARITY + ["--out-dir", out, "--resume", "--hidden", "64", "--max-steps", "8"])
    assert "does not fit this run's settings" in msg


@needs_data
def test_wikitext_corrupt_checkpoint(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "ckpt.pt").write_bytes(b"PK\x03\x04 garbage")
    msg = one_line_error(wikitext.main, wikitext_args(tmp_path, "--out-dir", str(out), "--resume"))
    assert "ckpt.pt" in msg and "corrupt" in msg
    assert os.listdir(out) == ["ckpt.pt"] and not (tmp_path / "cache").exists()   # failed before any work


@needs_data
@pytest.mark.parametrize("case", ["not_utf8", "empty_test", "no_split", "missing"])
def test_wikitext_bad_data_folder(tmp_path, case):
    data = tmp_path / "data"
    data.mkdir()
    (data / "wiki.valid.raw").write_text(open(os.path.join(WT2, "wiki.valid.raw")).read()[:20000])
    if case == "not_utf8":
        (data / "wiki.test.raw").write_bytes(b"\xff\xfe\x00 binary")
    elif case == "empty_test":
        (data / "wiki.test.raw").write_text("")
    args = wikitext_args(tmp_path, "--out-dir", str(tmp_path / "out"))
    args[args.index("--data") + 1] = str(data) if case != "missing" else str(tmp_path / "nowhere")
    msg = one_line_error(wikitext.main, args)
    expected = {"not_utf8": "is not UTF-8 text", "empty_test": "the test split of",
                "no_split": "no *test*.raw", "missing": "is not a folder"}[case]
    assert expected in msg, msg


@needs_data
@pytest.mark.parametrize("case", ["garbage", "folder"])
def test_bad_tokenizer_file(tmp_path, case):
    bad = tmp_path / "tok"
    bad.mkdir() if case == "folder" else bad.write_bytes(b"\x00\x01 not ranks\n")
    args = wikitext_args(tmp_path, "--out-dir", str(tmp_path / "out"))
    args[args.index("--tokenizer-file") + 1] = str(bad)
    msg = one_line_error(wikitext.main, args)
    assert str(bad) in msg


@needs_data
def test_cache_dir_that_is_a_file(tmp_path):
    (tmp_path / "cache").write_text("x")
    msg = one_line_error(wikitext.main, wikitext_args(tmp_path, "--out-dir", str(tmp_path / "out")))
    assert "--cache-dir" in msg


@pytest.mark.parametrize("case", ["folder", "binary", "missing"])
def test_theory_bad_corpus(tmp_path, case):
    corpus = tmp_path / "corpus.txt"
    if case == "folder":
        corpus.mkdir()
    elif case == "binary":
        corpus.write_bytes(b"\x80\x81\x82")
    msg = one_line_error(theory.main, ["--corpus", str(corpus), "--out-dir", str(tmp_path / "out"),
                                       "--draws", "100", "--no-plot"])
    assert str(corpus) in msg


def test_load_checkpoint_reads_a_good_file(tmp_path):
    path = str(tmp_path / "ok.pt")
    common.atomic_torch_save({"x": torch.arange(3)}, path)
    assert common.load_checkpoint(path)["x"].tolist() == [0, 1, 2]


def test_import_graph_has_no_cycle():
    """Dependencies flow one way: scripts -> {model, masking, theory, common}; theory imports no script."""
    src = open(os.path.join(ROOT, "theory.py")).read()
    assert "import wikitext" not in src and "import parity" not in src
    for lib in ("common.py", "masking.py", "model.py"):
        text = open(os.path.join(ROOT, lib)).read()
        assert not any(f"import {m}" in text for m in ("wikitext", "parity", "theory", "pretrain_8b"))
