"""Every path a user can type, wrong in each way it can be wrong: one line on stderr
("error: ..."), never a traceback, and nothing overwritten before the error."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, SHARED_DATA

import eval_8b
import model as model_lib
import parity
import theory
import wikitext
from machinery import cli, corpus, files, llada

WT2 = os.path.join(SHARED_DATA, "wikitext-2")
RANKS = os.path.join(SHARED_DATA, "gpt2-tokenizer", "gpt2.tiktoken")
needs_data = pytest.mark.skipif(not os.path.exists(WT2), reason="needs ../shared/data")
PARITY = ["--n", "8", "--k", "2", "--n-train", "100", "--n-val", "50", "--hidden", "32", "--max-steps", "4",
          "--eval-every", "2", "--no-plot"]


def one_line_error(main, args):
    """What the user sees: run_cli's message, checked to be a single 'error:' line."""
    with pytest.raises(SystemExit) as e:
        cli.run_cli(lambda: main(args))
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
    msg = one_line_error(parity.main, PARITY + ["--out-dir", out, "--resume", "--hidden", "64", "--max-steps", "8",
                                                "--allow-change", "hidden", "max_steps"])
    assert "does not fit this run's settings" in msg


@needs_data
def test_wikitext_corrupt_checkpoint(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "ckpt.pt").write_bytes(b"PK\x03\x04 garbage")
    (out / "run.json").write_text(json.dumps({"script": "wikitext.py"}))
    msg = one_line_error(wikitext.main, wikitext_args(tmp_path, "--out-dir", str(out), "--resume"))
    assert "ckpt.pt" in msg and "corrupt" in msg
    assert sorted(os.listdir(out)) == ["ckpt.pt", "run.json"] and not (tmp_path / "cache").exists()   # before any work


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
    files.atomic_torch_save({"x": torch.arange(3)}, path)
    assert files.load_checkpoint(path)["x"].tolist() == [0, 1, 2]


def test_import_graph_flows_one_way():
    """scripts -> {model, masking, theory, machinery}: no file imports a script (so no script imports
    another); the science modules import only one another (never the machinery, apart from cli's
    one-line errors at theory.py's command line); the machinery imports the science and itself."""
    import ast
    science = {"model", "masking", "theory"}
    top = [f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")]
    scripts = {"parity", "wikitext", "pretrain_8b", "sft_8b", "eval_8b", "gpu_check"}
    assert scripts | science == set(top), set(top) ^ (scripts | science)
    machinery = [os.path.join("machinery", f) for f in os.listdir(os.path.join(ROOT, "machinery")) if f.endswith(".py")]

    def imports(path):
        tree = ast.parse(open(os.path.join(ROOT, path)).read())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        return {m.split(".")[0] for m in names} & (set(top) | {"machinery"})
    for name in top:
        allowed = (science | {"machinery"}) - {name} if name in scripts or name == "theory" else science - {name}
        assert imports(name + ".py") <= allowed, (name, imports(name + ".py") - allowed)
    for path in machinery:
        assert imports(path) <= science | {"machinery"}, (path, imports(path))


@pytest.mark.parametrize("script", ["parity", "wikitext", "theory", "pretrain_8b", "sft_8b", "eval_8b"])
def test_every_flag_says_what_it_does(script):
    """--help: each flag has words before its default, not only "(default)"."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, script + ".py"), "--help"], capture_output=True, text=True,
                       env={**os.environ, "COLUMNS": "1000"}, timeout=60)
    assert r.returncode == 0, r.stderr
    options = []                   # one entry per flag: its line and any continuation lines
    for line in r.stdout.split("options:")[1].splitlines():
        if line.startswith("  -"):
            options.append(line.strip())
        elif line.startswith("    ") and options:
            options[-1] += "  " + line.strip()
    assert len(options) > 5
    for line in options:
        flag, _, text = line.partition("  ")
        assert re.search(r"[a-zA-Z]{3}", re.sub(r"\(.*?\)", "", text)), (script, line)
        assert "Table 4: 'tiny'" not in line


# ----------------------------------------------------------------------------- issue 19: nothing lost, nothing wrong

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def script_error(script, args, cwd=None):
    """Run a script as a user would; it must fail with exactly one 'error:' line."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True,
                       env=ENV, cwd=cwd or ROOT, timeout=300)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and r.stderr.strip().count("\n") == 0, r.stderr
    return r.stderr


def snapshot(folder):
    return {os.path.join(d, f): open(os.path.join(d, f), "rb").read() for d, _, fs in os.walk(folder) for f in fs}


def docs_file(path, n=300, extra=()):
    lines = [json.dumps({"text": f"document {i} says {' '.join(['word'] * (i % 7 + 3))}."}) for i in range(n)]
    path.write_text("\n".join(lines + list(extra)) + "\n")
    return str(path)


def tiny_pretrain(data, out, *extra):
    return ["--preset", "tiny", "--device", "cpu", "--data", data, "--out-dir", str(out), "--max-steps", "2",
            "--save-every", "2", "--eval-every", "2", "--no-plot", *extra]


@pytest.mark.parametrize("marker", ["summary.json", "step_0000008"])
@pytest.mark.parametrize("script", ["pretrain_8b.py", "sft_8b.py"])
def test_a_fresh_8b_run_refuses_an_out_dir_holding_a_run(tmp_path, script, marker):
    out = tmp_path / "run"
    (out / "step_0000004").mkdir(parents=True)
    (out / "step_0000004" / "extra.pt").write_bytes(b"the earlier run")
    (out / marker).mkdir() if marker.startswith("step_") else (out / marker).write_text("{}")
    (out / "run.json").write_text(json.dumps({"script": script}))
    before = snapshot(out)
    msg = script_error(script, ["--preset", "tiny", "--device", "cpu", "--data", str(tmp_path / "x.jsonl"),
                                "--out-dir", str(out)])
    assert "holds an earlier run" in msg and "--resume" in msg
    assert snapshot(out) == before


def test_a_fresh_parity_or_wikitext_run_refuses_an_earlier_run(tmp_path):
    out = str(tmp_path / "run")
    parity.main(PARITY + ["--out-dir", out])
    before = snapshot(out)
    assert "holds an earlier run" in one_line_error(parity.main, PARITY + ["--out-dir", out, "--t1", "0.5"])
    assert "holds a run of parity.py, not of wikitext.py" in one_line_error(wikitext.main, ["--out-dir", out,
                                                                                            "--preset", "tiny"])
    assert snapshot(out) == before


def test_resume_with_other_settings_names_them_and_writes_nothing(tmp_path):
    out = str(tmp_path / "run")
    parity.main(PARITY + ["--out-dir", out])
    before = snapshot(out)
    msg = one_line_error(parity.main, PARITY + ["--out-dir", out, "--resume", "--t1", "0.5", "--lr", "0.01"])
    assert "t1 0.246 -> 0.5" in msg and "lr 0.001 -> 0.01" in msg and "--allow-change" in msg
    assert snapshot(out) == before
    # knowingly: allowed, and recorded beside the results
    parity.main(PARITY + ["--out-dir", out, "--resume", "--max-steps", "6", "--allow-change", "max_steps"])
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["changed_on_resume"] == {"max_steps": [4, 6]} and summary["settings"]["max_steps"] == 6


def test_resume_with_nothing_to_resume_says_so_and_starts_fresh(tmp_path, capsys):
    """--resume into an --out-dir with no checkpoint (a first run under a preemptible launcher, or a
    mistyped --out-dir) starts a fresh run, and says so, so the typo does not pass unnoticed."""
    parity.main(PARITY + ["--out-dir", str(tmp_path / "p"), "--resume"])
    assert f"--resume: no checkpoint in {tmp_path / 'p'} yet; starting a fresh run" in capsys.readouterr().out
    r = subprocess.run([sys.executable, os.path.join(ROOT, "pretrain_8b.py"),
                        *tiny_pretrain(docs_file(tmp_path / "docs.jsonl"), tmp_path / "8b", "--resume")],
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    assert f"--resume: no checkpoint in {tmp_path / '8b'} yet; starting a fresh run" in r.stdout
    assert json.load(open(tmp_path / "8b" / "summary.json"))["steps"] == 2


def test_8b_resume_with_another_interval_is_refused(tmp_path):
    data = docs_file(tmp_path / "docs.jsonl")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "pretrain_8b.py"),
                        *tiny_pretrain(data, tmp_path / "run")],
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    before = snapshot(tmp_path / "run")
    msg = script_error("pretrain_8b.py", tiny_pretrain(data, tmp_path / "run", "--resume", "--t0", "0.45",
                                                       "--t1", "0.55"))
    assert "t0 0.0 -> 0.45" in msg and "t1 1.0 -> 0.55" in msg
    assert snapshot(tmp_path / "run") == before


def test_a_model_only_last_checkpoint_exports_and_is_not_resumed(tmp_path):
    """--last-save-model-only drops the optimizer from the run's last checkpoint (two thirds of the
    bytes at 8B): the run still exports; resuming from it is refused in one line, nothing touched."""
    import torch.distributed.checkpoint as dcp
    data = docs_file(tmp_path / "docs.jsonl")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "pretrain_8b.py"),
                        *tiny_pretrain(data, tmp_path / "run", "--last-save-model-only")],
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    saved = dcp.FileSystemReader(str(tmp_path / "run" / "step_0000002")).read_metadata().state_dict_metadata
    assert saved and all(k.startswith("model.") for k in saved)
    assert (tmp_path / "run" / "export" / "config.json").exists()
    before = snapshot(tmp_path / "run")
    msg = script_error("pretrain_8b.py", tiny_pretrain(data, tmp_path / "run", "--resume", "--max-steps", "4",
                                                       "--allow-change", "max_steps"))
    assert "holds the model only" in msg
    assert snapshot(tmp_path / "run") == before


@needs_data
def test_wikitext_cache_is_keyed_by_content(tmp_path):
    """Two folders of one name, and a file edited in place, each get their own tokens."""
    a, b = tmp_path / "a" / "wt", tmp_path / "b" / "wt"
    for folder, text in ((a, "alpha beta gamma " * 300), (b, "one two three four " * 300)):
        folder.mkdir(parents=True)
        for split in ("train", "test"):
            (folder / f"{split}.txt").write_text(text)
    cfg = wikitext.WikiConfig(**{**wikitext.PRESETS["tiny"], "data": str(a), "tokenizer_file": RANKS,
                                 "cache_dir": str(tmp_path / "cache")})
    enc = corpus.gpt2_tokenizer(RANKS)
    ta = wikitext.load_split(cfg, "train", enc)
    tb = wikitext.load_split(wikitext.replace(cfg, data=str(b)), "train", enc)
    assert ta.tolist() == enc.encode_ordinary("alpha beta gamma " * 300)
    assert tb.tolist() == enc.encode_ordinary("one two three four " * 300)
    (a / "train.txt").write_text("changed in place " * 200)
    assert wikitext.load_split(cfg, "train", enc).tolist() == enc.encode_ordinary("changed in place " * 200)
    (tmp_path / "empty" / "wt").mkdir(parents=True)
    (tmp_path / "empty" / "wt" / "train.txt").write_text("")
    with pytest.raises(ValueError, match="holds no text"):
        wikitext.load_split(wikitext.replace(cfg, data=str(tmp_path / "empty" / "wt")), "train", enc)


@pytest.mark.parametrize("script,args,want", [
    ("pretrain_8b.py", ["--preset", "tiny", "--micro-batch", "0"], "--micro-batch must be positive"),
    ("pretrain_8b.py", ["--dry-run", "--micro-batch", "-2"], "--micro-batch must be positive"),
    ("pretrain_8b.py", ["--preset", "tiny", "--batch-size", "0"], "--batch-size must be positive"),
    ("pretrain_8b.py", ["--preset", "tiny", "--ac", "some"], "--ac must be auto, none, full, selective or every-N"),
    ("pretrain_8b.py", ["--dry-run", "--gpu-gib", "0"], "--gpu-gib must be positive"),
    ("sft_8b.py", ["--dry-run", "--ac", "every-0"], "--ac must be auto"),
    ("sft_8b.py", ["--preset", "tiny", "--micro-batch", "0"], "--micro-batch must be positive"),
    ("sft_8b.py", ["--dry-run", "--batch-size", "0"], "--batch-size must be positive"),
    ("wikitext.py", ["--preset", "tiny", "--micro-batch", "0"], "--micro-batch must be positive"),
    ("wikitext.py", ["--preset", "tiny", "--batch-size", "0", "--dry-run"], "--batch-size must be positive"),
    ("parity.py", ["--micro-batch", "-1"], "--micro-batch must be >= 0"),
    ("parity.py", ["--lr", "0"], "--lr must be positive, got 0.0"),
    ("wikitext.py", ["--preset", "tiny", "--grad-clip", "-1"], "--grad-clip must be >= 0"),
    ("wikitext.py", ["--preset", "tiny", "--eval-every", "0"], "--eval-every must be positive"),
    ("pretrain_8b.py", ["--dry-run", "--lr=-1e-4"], "--lr must be positive"),
    ("pretrain_8b.py", ["--preset", "tiny", "--decay-frac", "2"], "--decay-frac must be in [0, 1]"),
    ("sft_8b.py", ["--dry-run", "--beta2", "1"], "--beta2 must be in [0, 1)"),
    ("sft_8b.py", ["--preset", "tiny", "--weight-decay", "-0.1"], "--weight-decay must be >= 0"),
    ("theory.py", ["--draws", "0"], "--draws must be positive"),
    ("eval_8b.py", ["--tasks", "arc_easy", "--mc-num", "0"], "--mc-num must be positive"),
    ("eval_8b.py", ["--tasks", "arc_easy", "--mc-batch", "-1"], "--mc-batch must be positive"),
    ("eval_8b.py", ["--tasks", "arc_easy", "--batch-size", "0"], "--batch-size must be positive"),
    ("eval_8b.py", ["--tasks", "arc_easy", "--cfg", "-0.5"], "--cfg must be >= 0"),
    ("eval_8b.py", ["--tasks", "arc_easy", "--limit", "0"], "--limit must be positive"),
])
def test_sizes_are_checked_before_anything_loads(tmp_path, script, args, want):
    msg = script_error(script, [*args, "--out-dir", str(tmp_path / "out")]
                       + ([] if script == "theory.py" else ["--device", "cpu"]), cwd=tmp_path)
    assert want in msg
    assert not (tmp_path / "out" / "summary.json").exists()


@pytest.mark.parametrize("case", ["empty", "truncated"])
def test_bad_pretraining_jsonl_is_one_line(tmp_path, case):
    path = tmp_path / "docs.jsonl"
    path.write_text("" if case == "empty" else '{"text": "a whole document"}\n{"text": "cut sh')
    msg = script_error("pretrain_8b.py", tiny_pretrain(str(path), tmp_path / "run"))
    assert ("is empty" if case == "empty" else "JSON parse error") in msg


def test_pretraining_rows_without_text_are_counted_not_dropped(tmp_path):
    data = docs_file(tmp_path / "docs.jsonl")
    lines = open(data).read().splitlines()
    for i in (1, 3, 5, 7, 9):                      # among the first rows, which every run reads
        lines[i] = json.dumps({"body": f"no text {i}"})
    open(data, "w").write("\n".join(lines) + "\n")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "pretrain_8b.py"),
                        *tiny_pretrain(data, tmp_path / "run")],
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.load(open(tmp_path / "run" / "summary.json"))
    assert summary["skipped_rows"]["no 'text' field"] == 5, summary["skipped_rows"]
    assert "skipped rows" in r.stdout and "5 no 'text' field" in r.stdout


def test_export_path_that_is_a_file_is_refused_before_training(tmp_path):
    (tmp_path / "taken").write_text("x")
    msg = script_error("pretrain_8b.py", tiny_pretrain(str(tmp_path / "x.jsonl"), tmp_path / "run", "--export",
                                                       str(tmp_path / "taken")))
    assert "--export" in msg and "not a folder" in msg and not (tmp_path / "run" / "log.jsonl").exists()


@pytest.mark.parametrize("name", ["out/sft/exprt", "../models/llada-typo", "typo"])
def test_init_that_does_not_exist_names_where_it_looked(tmp_path, name):
    (tmp_path / "out").mkdir()
    msg = script_error("sft_8b.py", ["--init", name, "--device", "cpu", "--out-dir", str(tmp_path / "run")],
                       cwd=tmp_path)
    assert f"--init {name}" in msg and os.path.abspath(os.path.join(tmp_path, name)) in msg
    assert "not tried as a Hub id" in msg and "tokenizer" not in msg


def test_hub_style_init_that_cannot_be_had_names_both(tmp_path):
    msg = script_error("sft_8b.py", ["--init", "nobody-here/no-model", "--device", "cpu", "--out-dir",
                                     str(tmp_path / "run")], cwd=tmp_path)
    assert str(tmp_path / "nobody-here" / "no-model") in msg and "the Hub id nobody-here/no-model" in msg


@pytest.mark.parametrize("case", ["empty", "truncated-jsonl", "truncated-csv"])
def test_bad_local_task_files_are_one_line(tmp_path, case):
    data = tmp_path / "evals"
    (data / "arc_easy").mkdir(parents=True)
    (data / "mmlu" / "test").mkdir(parents=True)
    path = data / "arc_easy" / "ARC-Easy-test.jsonl"
    if case == "empty":
        path.write_text("\n")
    elif case == "truncated-jsonl":
        path.write_text('{"id": "1", "question": "q"}\n{"id": "2", "quest')
    else:
        path = data / "mmlu" / "test" / "abstract_algebra_test.csv"
        path.write_text("question,choice0,choice1,choice2,choice3,answer\nq,a,b,c,d,1\nq2,a,b")
    with pytest.raises(ValueError, match="holds no items" if case == "empty" else "truncated"):
        eval_8b.check_task_file(str(path))


@needs_data
def test_a_failing_evaluation_leaves_a_finished_one_as_it_was(tmp_path):
    pytest.importorskip("lm_eval")
    import shutil
    m = model_lib.Transformer(model_lib.get_config("tiny", vocab_size=262, mask_id=257, block_size=64))
    folder = tmp_path / "export"
    llada.save_safetensors(m, str(folder))
    (folder / "config.json").write_text(json.dumps(llada.config_to_json(m.cfg, eos_token_id=256)))
    llada.byte_tokenizer().save(str(folder / "tokenizer.json"))
    data = tmp_path / "evals"
    shutil.copytree(os.path.join(SHARED_DATA, "evals", "arc_challenge"), data / "arc_challenge")
    args = ["--checkpoint", str(folder), "--tasks", "arc_challenge", "--data-dir", str(data), "--limit", "2",
            "--device", "cpu", "--mc-num", "2", "--out-dir", str(tmp_path / "eval")]
    r = subprocess.run([sys.executable, os.path.join(ROOT, "eval_8b.py"), *args], capture_output=True, text=True,
                       env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    written = ("summary.json", "results.md", "results/arc_challenge.json")
    results = {f: (tmp_path / "eval" / f).read_bytes() for f in written}
    again = subprocess.run([sys.executable, os.path.join(ROOT, "eval_8b.py"), *args], capture_output=True, text=True,
                           env=ENV, timeout=300)             # the same command: says where its result is
    assert again.returncode == 0 and "already holds this run" in again.stdout, again.stderr[-2000:]
    assert "holds an earlier run" in script_error("eval_8b.py", [*args[:-4], "--mc-num", "3", *args[-2:]])
    weights = {f: (folder / f).read_bytes() for f in os.listdir(folder)}          # 31.1: other weights, same path
    torch.manual_seed(1)
    llada.save_safetensors(model_lib.Transformer(m.cfg), str(folder))
    assert "finished on other checkpoint" in script_error("eval_8b.py", args)
    for f, saved in weights.items():
        (folder / f).write_bytes(saved)
    path = data / "arc_challenge" / "ARC-Challenge-test.jsonl"
    path.write_text(path.read_text()[:5000])                     # cut mid-line
    assert "truncated" in script_error("eval_8b.py", [*args[:-4], "--mc-num", "3", *args[-2:], "--resume"])
    assert {f: (tmp_path / "eval" / f).read_bytes() for f in results} == results
    assert not [f for f in os.listdir(tmp_path / "eval") if f.endswith(".tmp")]


# ----------------------------------------------------------------------------- issue 26: round 3

def run_script(script, args, cwd, env=None, timeout=300):
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True,
                          env=env or ENV, cwd=cwd, timeout=timeout)


def test_the_readmes_parity_commands_run_one_after_another(tmp_path):
    """A newcomer types the README's first command, then its next: each run has a folder of its own,
    named by its settings; the same finished command again says where its result is, writes nothing."""
    small = PARITY[:-1]                                 # the README's commands, at a toy size, plots on
    first = run_script("parity.py", ["--t1", "0.246", *small], tmp_path)
    second = run_script("parity.py", ["--objective", "label", *small], tmp_path)
    assert first.returncode == 0 and second.returncode == 0, second.stderr
    runs = sorted(os.listdir(tmp_path / "out" / "parity"))
    assert runs == ["label_n8k2_mlp_s0", "md_U0-0.246_n8k2_mlp_s0"]
    before = snapshot(tmp_path / "out")
    again = run_script("parity.py", ["--t1", "0.246", *small], tmp_path)
    assert again.returncode == 0 and "already holds this run, finished" in again.stdout
    assert "out/parity/md_U0-0.246_n8k2_mlp_s0/summary.json" in again.stdout
    assert snapshot(tmp_path / "out") == before


def finished_pretrain(tmp_path):
    data = docs_file(tmp_path / "docs.jsonl")
    r = run_script("pretrain_8b.py", tiny_pretrain(data, tmp_path / "run"), ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return data


def test_resume_never_starts_fresh_over_a_finished_run(tmp_path):
    """--resume of a finished pre-training run whose checkpoints were removed started fresh and wrote
    over its summary.json and export: with its settings it says where the result is; with others it
    is refused; nothing changes either way."""
    data = finished_pretrain(tmp_path)
    for ckpt in fsdp_checkpoints(tmp_path / "run"):
        import shutil
        shutil.rmtree(ckpt)
    before = snapshot(tmp_path / "run")
    same = run_script("pretrain_8b.py", tiny_pretrain(data, tmp_path / "run", "--resume"), ROOT)
    assert same.returncode == 0 and "already holds this run, finished" in same.stdout, same.stderr[-2000:]
    msg = script_error("pretrain_8b.py", tiny_pretrain(data, tmp_path / "run", "--resume", "--max-steps", "4",
                                                       "--allow-change", "max_steps"))
    assert "holds a finished run with other settings and no checkpoint to continue from" in msg
    assert snapshot(tmp_path / "run") == before


def fsdp_checkpoints(folder):
    return [os.path.join(folder, d) for d in os.listdir(folder) if d.startswith("step_")]


@pytest.mark.parametrize("writer,owner", [("pretrain_8b.py", "wikitext.py"), ("wikitext.py", "pretrain_8b.py"),
                                          ("parity.py", "pretrain_8b.py"), ("theory.py", "parity.py"),
                                          ("parity.py --compare", "wikitext.py")])
def test_no_script_writes_into_another_scripts_folder(tmp_path, writer, owner):
    """--resume (or theory.py / parity.py --compare, which write a summary) into a folder holding
    another script's run is refused before anything is written."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"script": owner}))
    (out / "summary.json").write_text(json.dumps({"script": owner, "test_loss": 1.0}))
    before = snapshot(out)
    script, *extra = writer.split()
    args = {"pretrain_8b.py": tiny_pretrain(str(tmp_path / "x.jsonl"), out, "--resume"),
            "wikitext.py": ["--preset", "tiny", "--out-dir", str(out), "--resume"],
            "parity.py": PARITY + ["--out-dir", str(out), "--resume", *extra],
            "theory.py": ["--draws", "100", "--out-dir", str(out), "--no-plot"]}[script]
    msg = script_error(script, args, cwd=tmp_path)
    assert f"holds a run of {owner}" in msg
    assert snapshot(out) == before


def test_exports_are_never_written_over(tmp_path):
    """--resume --export DIR wrote over an earlier export; --export inside a checkpoint folder was
    accepted and --keep later deleted it."""
    data = docs_file(tmp_path / "docs.jsonl")
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "config.json").write_text("{}")
    msg = script_error("pretrain_8b.py", tiny_pretrain(data, tmp_path / "run", "--resume", "--export", str(tmp_path / "e")))
    assert "holds an earlier export" in msg and (tmp_path / "e" / "config.json").read_text() == "{}"
    msg = script_error("pretrain_8b.py", tiny_pretrain(data, tmp_path / "run2", "--export",
                                                       str(tmp_path / "run2" / "step_0000002" / "export")))
    assert "lies inside --out-dir's checkpoints" in msg


def test_a_second_writer_is_refused_and_a_stale_lock_is_taken_over(tmp_path):
    """Two runs writing one --out-dir at once: the second is refused while the first lives (its lock
    names its pid); the lock of a process that is gone is taken over."""
    import socket
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        (out / ".lock").write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname()}))
        msg = one_line_error(parity.main, PARITY + ["--out-dir", str(out)])
        assert f"is being written by another run (pid {holder.pid}" in msg
    finally:
        holder.communicate(b"")
    parity.main(PARITY + ["--out-dir", str(out)])           # the holder is gone: its lock is stale
    assert json.load(open(out / "summary.json"))["steps"] == 4 and not (out / ".lock").exists()


@needs_data
def test_a_sweep_reuses_only_runs_of_its_own_settings(tmp_path):
    out = tmp_path / "sweep"
    args = wikitext_args(tmp_path, "--sweep", "--intervals", "0-0.5", "--out-dir", str(out))
    wikitext.main(args)
    msg = one_line_error(wikitext.main, [*args, "--lr", "0.01"])
    assert "holds a finished run with other settings" in msg
    assert "names an interval twice" in one_line_error(wikitext.main, wikitext_args(
        tmp_path, "--sweep", "--intervals", "0-0.5,0-0.5", "--out-dir", str(out)))
    assert "names a seed twice" in one_line_error(parity.main, PARITY + ["--compare", "--seeds", "0", "0",
                                                                         "--out-dir", str(tmp_path / "c")])


@needs_data
def test_wikitext_seconds_add_up_over_a_resume_and_a_finished_run_is_left_alone(tmp_path):
    out = str(tmp_path / "run")
    wikitext.main(wikitext_args(tmp_path, "--out-dir", out, "--ckpt-every", "1"))
    first = json.load(open(os.path.join(out, "summary.json")))
    wikitext.main(wikitext_args(tmp_path, "--out-dir", out, "--resume", "--max-steps", "4", "--allow-change",
                                "max_steps"))
    second = json.load(open(os.path.join(out, "summary.json")))
    assert second["steps"] == 4 and second["seconds"] > first["seconds"] > 0
    before = snapshot(out)
    wikitext.main(wikitext_args(tmp_path, "--out-dir", out, "--resume", "--max-steps", "4"))   # finished: said, kept
    assert snapshot(out) == before


@needs_data
@pytest.mark.parametrize("split", ["valid", "validation"])
def test_wikitext_never_tests_on_its_training_split(tmp_path, split):
    msg = one_line_error(wikitext.main, wikitext_args(tmp_path, "--eval-split", split, "--out-dir", str(tmp_path / "o")))
    assert "is the split trained on" in msg


def test_wikitext_splits_that_pick_one_file_are_refused(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "all_train_test.txt").write_text("text " * 500)
    cfg = wikitext.WikiConfig(**{**wikitext.PRESETS["tiny"], "data": str(tmp_path / "d")})
    with pytest.raises(cli.UserError, match="both pick"):
        wikitext.check_splits(cfg)


def test_too_few_ngram_counts_is_an_error_not_an_estimate(tmp_path):
    """theory.py on a 9-token corpus divided by zero; on a tiny one it wrote t* = 0.5 from weights {2: 1}."""
    with pytest.raises(ValueError, match="too few counts"):
        theory.ngram_weights(list(range(9)) * 2)
    import numpy as np
    with pytest.raises(ValueError, match="no 2-gram seen 5 times"):      # each token ~6 times, no pair 5 times
        theory.ngram_weights(np.random.default_rng(0).integers(0, 10, 60))


@needs_data
def test_theory_on_a_tiny_corpus_is_one_line(tmp_path):
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("the cat sat on the mat. " * 3)
    msg = one_line_error(theory.main, ["--corpus", str(corpus), "--tokenizer-file", RANKS, "--draws", "100",
                                       "--out-dir", str(tmp_path / "t"), "--no-plot"])
    assert "too few counts" in msg


@pytest.mark.parametrize("args,want", [
    (["--t1", "0"], "--t1 0 masks nothing"),
    (["--hidden", "0"], "--hidden must be positive"), (["--hidden", "-3"], "--hidden must be positive"),
    (["--model", "transformer", "--d-model", "0"], "--d-model must be positive"),
    (["--model", "transformer", "--n-layer", "0"], "--n-layer must be positive"),
    (["--model", "transformer", "--n-head", "0"], "--n-head must be positive"),
    (["--model", "transformer", "--mlp-hidden", "-1"], "--mlp-hidden must be positive"),
    (["--stop-acc", "-1"], "--stop-acc must be above chance"), (["--threads", "-1"], "--threads must be >= 0"),
    (["--n", "200", "--k", "2"], "n must be at most 62"), (["--device", "mps"], "no MPS device"),
    (["--compare", "--label-steps", "-5"], "--label-steps must be positive"),
])
def test_degenerate_parity_settings_write_no_summary(tmp_path, args, want):
    msg = one_line_error(parity.main, PARITY + ["--out-dir", str(tmp_path / "o"), *args])
    assert want in msg and not (tmp_path / "o").exists()


@pytest.mark.parametrize("seed", ["-1", str(2 ** 40)])
@pytest.mark.parametrize("script", ["parity.py", "wikitext.py", "pretrain_8b.py", "theory.py", "eval_8b.py"])
def test_one_rule_for_the_seed(tmp_path, script, seed):
    args = {"parity.py": ["--max-steps", "1"], "wikitext.py": ["--preset", "tiny"],
            "pretrain_8b.py": ["--preset", "tiny", "--dry-run"], "theory.py": ["--draws", "10"],
            "eval_8b.py": ["--tasks", "arc_easy"]}[script]
    msg = script_error(script, [*args, "--seed", seed, "--out-dir", str(tmp_path / "o")], cwd=tmp_path)
    assert f"--seed must be an integer in [0, 2^31), got {seed}" in msg


@pytest.mark.parametrize("args,want", [(["--plan-mfu", "0"], "--plan-mfu must be positive"),
                                       (["--plan-mfu", "-0.4"], "--plan-mfu must be positive"),
                                       (["--plan-mfu", "40"], "is a fraction of the peak"),
                                       (["--world-size", "-1"], "--world-size must be positive"),
                                       (["--benchmark", "--bench-steps", "0"], "--bench-steps must be positive"),
                                       (["--benchmark", "--bench-layers", "-1"], "--bench-layers must be >= 0")])
def test_plan_and_benchmark_flags_are_checked(tmp_path, args, want):
    assert want in script_error("pretrain_8b.py", ["--dry-run", "--no-trace", *args], cwd=tmp_path)


def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    """parity printed torch's `[enforce fail at inline_container.cc:672]` and left ckpt.pt.tmp behind."""
    out = tmp_path / "run"
    parity.main(PARITY + ["--out-dir", str(out), "--eval-every", "2"])
    good = (out / "ckpt.pt").read_bytes()
    real = torch.save

    def full_disk(obj, path):
        with open(path, "wb") as f:
            f.write(b"half a checkpoint")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                           "data/3: file write failed")
    monkeypatch.setattr(torch, "save", full_disk)
    msg = one_line_error(parity.main, PARITY + ["--out-dir", str(out), "--eval-every", "2", "--resume",
                                                "--max-steps", "8", "--allow-change", "max_steps"])
    monkeypatch.setattr(torch, "save", real)
    assert msg.startswith(f"error: could not write {out / 'ckpt.pt'}") and "free space" in msg
    assert f"the last complete checkpoint is {out / 'ckpt.pt'} (step 4), intact: continue with --resume" in msg
    assert (out / "ckpt.pt").read_bytes() == good and not [f for f in os.listdir(out) if f.endswith(".tmp")]


@pytest.mark.parametrize("env,want", [({"WORLD_SIZE": "2"}, "sets WORLD_SIZE=2 but not RANK"),
                                      ({"RANK": "1"}, "sets RANK=1 but not WORLD_SIZE"),
                                      ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"},
                                       "but not MASTER_PORT")])
def test_stale_launcher_variables_are_one_line_not_a_silent_wait(tmp_path, env, want):
    r = run_script("pretrain_8b.py", ["--preset", "tiny", "--device", "cpu", "--out-dir", str(tmp_path / "o")], tmp_path,
                   env={**ENV, **env})
    assert r.returncode == 1 and r.stderr.startswith("error: the environment") and want in r.stderr, r.stderr


def test_a_world_that_never_meets_is_one_line_within_the_timeout(tmp_path):
    from machinery.distributed import free_port
    env = {**ENV, "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    r = run_script("wikitext.py", ["--preset", "tiny", "--dist-timeout", "2", "--out-dir", str(tmp_path / "o")],
                   tmp_path, env=env, timeout=120)
    assert r.returncode == 1 and "did not meet within --dist-timeout 2s" in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("error:")


def test_sigterm_names_the_last_checkpoint_and_the_command_that_continues(tmp_path):
    """Ctrl-C or a scheduler's SIGTERM: one line with the last complete checkpoint and the --resume command."""
    import signal
    import time
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "parity.py"), *PARITY[:-3], "--max-steps", "100000",
                             "--eval-every", "2", "--stop-acc", "2", "--no-plot", "--out-dir", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=ENV)
    deadline = time.time() + 120
    while not (out / "ckpt.pt").exists() and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("stopped (SIGTERM); the last complete checkpoint is ") and str(out / "ckpt.pt") in line
    assert line.endswith("--resume") and "continue with: python parity.py" in line


def test_a_bug_keeps_its_traceback():
    """run_cli turned every ValueError, torch's included, into one line; only a UserError is the user's."""
    def bug():
        torch.zeros(2).view(3)              # a RuntimeError of torch's: a bug, not the user's
    with pytest.raises(RuntimeError):
        cli.run_cli(bug)
    with pytest.raises(ValueError, match="not the user's"):
        cli.run_cli(lambda: (_ for _ in ()).throw(ValueError("a ValueError of ours: not the user's")))


@needs_data
def test_wikitext_under_torchrun_agrees_on_an_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(ROOT, "wikitext.py"), *wikitext_args(tmp_path, "--out-dir", str(tmp_path / "o"),
                                                                          "--train-split", "nosuchsplit")],
                       capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=300)
    ours = [line for line in (r.stdout + r.stderr).splitlines() if line.startswith("error:")]
    assert r.returncode != 0 and len(ours) == 1 and "no *nosuchsplit*" in ours[0], r.stderr[-2000:]


def test_unreadable_text_names_the_file_and_line(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train.txt").write_bytes(b"fine line\nsecond\n\xff\xfe bad\n")
    with pytest.raises(cli.UserError, match=r"train.txt is not UTF-8 text \(line 3"):
        files.read_text(str(tmp_path / "d" / "train.txt"), "--data file")


@pytest.mark.parametrize("item,want", [({"choices": {"text": [], "label": []}}, "has no choices"),
                                       ({"choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "C"},
                                        "answerKey 'C', not among its labels")])
def test_arc_items_lenient_lm_eval_would_misread_are_refused(tmp_path, item, want):
    path = tmp_path / "ARC-Easy-test.jsonl"
    path.write_text(json.dumps({"id": "q1", "question": "?", "answerKey": "A", **item}) + "\n")
    with pytest.raises(cli.UserError, match=want):
        eval_8b.check_task_file(str(path))


def test_a_tokenizer_without_mask_is_told_how_to_fix_it():
    from tokenizers import Tokenizer, models
    tok = Tokenizer(models.WordLevel({"a": 0, "<|endoftext|>": 1, "[UNK]": 2}, unk_token="[UNK]"))
    with pytest.raises(cli.UserError, match="add it as a special token"):
        llada.token_ids(tok)


def test_the_md_step_and_the_schedule_are_written_once_and_model_py_is_the_network_alone():
    """Issue 27: one MD training step (masking.md_step_loss; parity.py writes its three lines out, as
    its log splits the loss by regime) and one schedule (machinery/optim.lr_at) serve every script,
    none defines its own; model.py holds no parallelism (FSDP, checkpointing, DTensor:
    machinery/fsdp.parallelize's)."""
    import ast
    for name in ("parity", "wikitext", "pretrain_8b", "sft_8b", "eval_8b", "machinery/fsdp", "machinery/plan"):
        tree = ast.parse(open(os.path.join(ROOT, name + ".py")).read())
        calls = {n.func.attr for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)}
        defined = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        assert not defined & {"md_micro_loss", "md_step_loss", "sample_t", "mask_tokens", "lr_at", "get_lr"}, name
        if name in ("wikitext", "pretrain_8b", "sft_8b", "machinery/plan"):
            assert "md_step_loss" in calls, name
        if name == "parity":
            assert {"sample_t", "mask_tokens", "md_loss", "md_mse_loss"} <= calls, calls
    model_src = open(os.path.join(ROOT, "model.py")).read()
    for word in ("torch.distributed", "fully_shard", "DTensor", "checkpoint(", "shard_like"):
        assert word not in model_src, word


# ----------------------------------------------------------------------------- issue 31: round 4

def small_text_data(folder, words=("alpha", "beta", "gamma", "delta")):
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        (folder / f"{split}.txt").write_text(" ".join(words[(i * 7) % len(words)] for i in range(2000)))
    return str(folder)


def byte_args(tmp_path, data, *extra):
    return ["--preset", "tiny", "--tokenizer", "bytes", "--data", data, "--train-split", "train",
            "--cache-dir", str(tmp_path / "cache"), "--max-steps", "4", "--ckpt-every", "2", "--no-plot", *extra]


def test_a_run_is_its_inputs_content_on_resume_on_done_and_in_a_sweep(tmp_path):
    """31.1: --resume after the training text was edited in place, the same finished command after the
    test text changed, and a sweep reusing a finished run on changed data: each refused in one line,
    naming what changed; nothing written."""
    data = small_text_data(tmp_path / "d")
    out = str(tmp_path / "run")
    wikitext.main(byte_args(tmp_path, data, "--out-dir", out, "--max-steps", "2"))
    (tmp_path / "d" / "train.txt").write_text((tmp_path / "d" / "train.txt").read_text().replace("alpha", "omega"))
    before = snapshot(out)
    msg = one_line_error(wikitext.main, byte_args(tmp_path, data, "--out-dir", out, "--resume", "--allow-change",
                                                  "max_steps"))
    assert "the train changed since" in msg and "--allow-change train" in msg and snapshot(out) == before
    (tmp_path / "d" / "train.txt").write_text((tmp_path / "d" / "train.txt").read_text().replace("omega", "alpha"))
    (tmp_path / "d" / "test.txt").write_text("delta gamma " * 500)
    msg = one_line_error(wikitext.main, byte_args(tmp_path, data, "--out-dir", out, "--max-steps", "2"))
    assert "finished on other test" in msg and snapshot(out) == before
    sweep = str(tmp_path / "sweep")
    wikitext.main(byte_args(tmp_path, data, "--sweep", "--intervals", "0-1", "--out-dir", sweep, "--max-steps", "2"))
    (tmp_path / "d" / "test.txt").write_text("beta alpha " * 500)
    msg = one_line_error(wikitext.main, byte_args(tmp_path, data, "--sweep", "--intervals", "0-1", "--out-dir", sweep,
                                                  "--max-steps", "2"))
    assert "holds a finished run on other test" in msg


def test_sft_resume_after_the_answers_changed_is_refused(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"{i}+1?"}, {"role": "assistant", "content": str(i + 1)}]}
            for i in range(60)]
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    args = ["--preset", "tiny", "--device", "cpu", "--data", str(tmp_path / "rows.jsonl"), "--max-steps", "4",
            "--save-every", "2", "--out-dir", str(tmp_path / "run"), "--no-plot"]
    r = run_script("sft_8b.py", [*args, "--max-steps", "2"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    for row in rows:
        row["messages"][1]["content"] = "42"
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    msg = script_error("sft_8b.py", [*args, "--resume", "--allow-change", "max_steps"], cwd=tmp_path)
    assert "the data changed since" in msg and "--allow-change data" in msg


@pytest.mark.parametrize("script,args", [
    ("parity.py", ["--lr", "inf"]), ("parity.py", ["--init-std", "inf"]), ("wikitext.py", ["--weight-decay", "inf"]),
    ("wikitext.py", ["--window", "nan", "--interval", "auto"]), ("pretrain_8b.py", ["--lr", "inf", "--dry-run"]),
    ("pretrain_8b.py", ["--dry-run", "--gpu-gib", "nan"]), ("pretrain_8b.py", ["--dry-run", "--plan-mfu", "nan"]),
    ("sft_8b.py", ["--dist-timeout", "inf"]), ("wikitext.py", ["--dist-timeout", "nan"]),
    ("eval_8b.py", ["--tasks", "arc_easy", "--cfg", "nan"])])
def test_every_float_flag_is_finite(tmp_path, script, args):
    """31.2: NaN and inf in any float flag, one check for all (a NaN passes every range check)."""
    flag = next(args[i - 1] for i, v in enumerate(args) if v in ("inf", "nan"))
    msg = script_error(script, [*args, "--out-dir", str(tmp_path / "o")], cwd=tmp_path)
    assert f"{flag} must be a finite number" in msg and not (tmp_path / "o").exists()


def test_no_checkpoint_with_non_finite_weights_is_written_or_resumed(tmp_path):
    """31.2: a learning rate that blows the weights up stops the run before it saves them (and writes no
    summary); a checkpoint that holds NaN weights (an older version's) is refused by --resume."""
    out = tmp_path / "run"
    msg = one_line_error(parity.main, PARITY + ["--out-dir", str(out), "--lr", "1e30", "--grad-clip", "0"])
    assert "the weights hold NaN or inf at step 2: not saved" in msg
    assert not (out / "summary.json").exists() and not (out / "ckpt.pt").exists()
    parity.main(PARITY + ["--out-dir", str(out)])
    ck = torch.load(out / "ckpt.pt", weights_only=False)
    ck["model"]["W.weight"][0, 0] = float("nan")
    torch.save(ck, out / "ckpt.pt")
    (out / "summary.json").unlink()
    msg = one_line_error(parity.main, PARITY + ["--out-dir", str(out), "--resume", "--max-steps", "6",
                                                "--allow-change", "max_steps"])
    assert "holds NaN or inf weights: it cannot be resumed" in msg


def test_pretraining_that_blows_up_keeps_only_finite_checkpoints(tmp_path):
    """31.2: --lr inf was accepted, its checkpoint of 37 non-finite tensors named "the last complete
    checkpoint", and --resume from it failed again. A rate whose update overflows float32 now stops the run
    in one line before the non-finite weights are saved: the last finite checkpoint is the one named, and it
    resumes (with a sane rate) and trains on."""
    run = tmp_path / "run"
    data = docs_file(tmp_path / "docs.jsonl")
    args = tiny_pretrain(data, run, "--save-every", "1", "--log-every", "1", "--grad-clip", "0",
                         "--schedule", "constant")
    first = run_script("pretrain_8b.py", [*args, "--max-steps", "3"], ROOT)
    assert first.returncode == 0, first.stderr[-3000:]
    (run / "summary.json").unlink()
    longer = [*args, "--max-steps", "6", "--resume"]
    msg = script_error("pretrain_8b.py", [*longer, "--lr", "1e39", "--allow-change", "lr", "max_steps"])
    assert "the weights hold NaN or inf at step 4" in msg and "step_0000003" in msg, msg
    assert max(os.path.basename(d) for d in fsdp_checkpoints(run)) == "step_0000003"     # step 4 not saved
    again = run_script("pretrain_8b.py", [*longer, "--allow-change", "max_steps"], ROOT)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.load(open(run / "summary.json"))["steps"] == 6


def test_a_resume_that_would_train_nothing_is_refused(tmp_path):
    """31.5: --resume --max-steps 2 of a 4-step run trained nothing and rewrote the summary."""
    out = str(tmp_path / "run")
    parity.main(PARITY + ["--out-dir", out])
    before = snapshot(out)
    msg = one_line_error(parity.main, PARITY + ["--out-dir", out, "--resume", "--max-steps", "2", "--allow-change",
                                                "max_steps"])
    assert "is at step 4, past --max-steps 2: nothing to train" in msg and snapshot(out) == before


def test_plot_runs_draws_only_runs_of_its_own_kind(tmp_path):
    """31.6: a WikiText run was drawn as Fig. 4; SFT's figure mixed in pre-training runs."""
    other = tmp_path / "wt"
    other.mkdir()
    (other / "summary.json").write_text(json.dumps(dict(script="wikitext.py", settings=dict(t0=0, t1=1),
                                                        test_loss_curve=[[1, 2.0]])))
    msg = script_error("pretrain_8b.py", ["--plot-runs", str(other), "--out-dir", str(tmp_path / "fig")])
    assert "holds a run of wikitext.py, not of pretrain_8b.py" in msg
    msg = script_error("sft_8b.py", ["--plot-runs", str(other), "--out-dir", str(tmp_path / "fig")])
    assert "not of sft_8b.py" in msg


@pytest.mark.parametrize("script,args,want", [
    ("wikitext.py", ["--preset", "tiny", "--window", "0.2"], "--window applies with --interval auto"),
    ("wikitext.py", ["--preset", "tiny", "--t-mean", "0.3"], "--t-mean applies with --t-dist beta or logit-normal"),
    ("wikitext.py", ["--preset", "tiny", "--seeds", "0", "1"], "--seeds applies with --sweep"),
    ("parity.py", ["--allow-change", "max_steps"], "--allow-change applies with --resume"),
    ("parity.py", ["--intervals", "0.3"], "--intervals applies with --compare"),
    ("pretrain_8b.py", ["--preset", "tiny", "--plan-mfu", "0.3"], "--plan-mfu applies with --dry-run"),
    ("sft_8b.py", ["--preset", "tiny", "--world-size", "4"], "--world-size applies with --dry-run")])
def test_flags_this_command_would_ignore_are_refused(tmp_path, script, args, want):
    """31.7: --window nan with --interval auto trained U[0, 1]; --allow-change was accepted and ignored."""
    assert want in script_error(script, [*args, "--out-dir", str(tmp_path / "o")], cwd=tmp_path)


def test_a_refused_command_writes_nothing_and_a_collection_keeps_the_union(tmp_path):
    """31.8: a refused --compare rewrote run.json; theory.py into its own folder with other settings
    wrote over its summary; a second --compare with other intervals replaced the table with its subset."""
    out = tmp_path / "c"
    base = PARITY + ["--compare", "--jobs", "1", "--seeds", "0", "--out-dir", str(out)]
    parity.main(base + ["--intervals", "0.3"])
    before = snapshot(out)
    assert "other settings" in one_line_error(parity.main, base + ["--intervals", "0.3", "--lr", "0.01"])
    assert snapshot(out) == before
    parity.main(base + ["--intervals", "0.5"])
    table = json.load(open(out / "summary.json"))["table"]
    assert [r["run"] for r in table] == ["label", "md_0-0.5", "md_0-0.3"]
    theory_out = str(tmp_path / "t")
    theory.main(["--draws", "100", "--no-plot", "--out-dir", theory_out])
    before = snapshot(theory_out)
    msg = one_line_error(theory.main, ["--draws", "200", "--no-plot", "--out-dir", theory_out])
    assert "holds an earlier run of theory.py with other settings" in msg and snapshot(theory_out) == before


def test_a_finished_8b_run_is_extended_into_an_export_of_its_own(tmp_path):
    """31.9: --resume --allow-change max_steps into a finished pre-training run was refused by the run's own
    export; now the default command extends it, the earlier export stays as it was, and summary.json
    names the export that holds the longer run's weights."""
    data = docs_file(tmp_path / "docs.jsonl")
    r = run_script("pretrain_8b.py", tiny_pretrain(data, tmp_path / "run"), ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    first = snapshot(tmp_path / "run" / "export")
    r = run_script("pretrain_8b.py", tiny_pretrain(data, tmp_path / "run", "--resume", "--max-steps", "4",
                                                   "--allow-change", "max_steps"), ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.load(open(tmp_path / "run" / "summary.json"))
    assert summary["steps"] == 4 and summary["export"] == str(tmp_path / "run" / "export_step_0000004")
    assert summary["changed_on_resume"] == {"max_steps": [2, 4]}
    assert snapshot(tmp_path / "run" / "export") == first
    assert (tmp_path / "run" / "export_step_0000004" / "config.json").exists()


def test_a_finished_compare_is_extended_with_allow_change(tmp_path):
    out = tmp_path / "c"
    base = PARITY + ["--compare", "--jobs", "1", "--seeds", "0", "--intervals", "0.3", "--out-dir", str(out),
                     "--stop-acc", "2"]
    parity.main(base)
    parity.main(base + ["--max-steps", "6", "--allow-change", "max_steps"])
    rows = json.load(open(out / "summary.json"))["runs"]
    assert [r["steps"] for r in rows] == [6, 6]


@pytest.mark.parametrize("case", ["sft-not-utf8", "pretrain-not-utf8", "theory-draws", "dist-timeout"])
def test_round_4_user_errors_are_one_line(tmp_path, case):
    """31.10-11: pyarrow's UnicodeDecodeError for a non-UTF-8 SFT jsonl; a byte position for a non-UTF-8
    pre-training text; numpy's allocation error for --draws 10**12 (and an empty out-dir left)."""
    bad = tmp_path / "bad"
    bad.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    if case == "sft-not-utf8":
        msg = script_error("sft_8b.py", ["--preset", "tiny", "--device", "cpu", "--data", str(bad), "--out-dir",
                                         str(tmp_path / "o")])
        assert "is not UTF-8 text (line 2" in msg
    elif case == "pretrain-not-utf8":
        txt = tmp_path / "docs.txt"
        txt.write_bytes(b"a fine document\nanother\ncaf\xe9 au lait\n")
        msg = script_error("pretrain_8b.py", tiny_pretrain(str(txt), tmp_path / "o"))
        assert "is not UTF-8 text (line 3" in msg
    elif case == "theory-draws":
        msg = script_error("theory.py", ["--draws", str(10 ** 12), "--out-dir", str(tmp_path / "o")])
        assert "--draws 1,000,000,000,000 is more than" in msg
    else:
        msg = script_error("wikitext.py", ["--preset", "tiny", "--dist-timeout", "inf"], cwd=tmp_path)
        assert "--dist-timeout must be a finite number" in msg
    assert not (tmp_path / "o").exists()


def test_sft_rows_are_trained_as_written_or_counted_as_skipped():
    """31.4: a user turn after the last assistant turn was dropped silently and the row trained; an empty
    answer was trained on; skipped_rows stayed {} for both."""
    import sft_8b
    turn = lambda role, text: {"role": role, "content": text}
    rows = [{"messages": [turn("user", "q"), turn("assistant", "a")]},
            {"messages": [turn("user", "q"), turn("assistant", "a"), turn("user", "and then?")]},
            {"messages": [turn("user", "q"), turn("assistant", "   ")]}]
    ids, _, skipped = sft_8b.encode_rows(rows, llada.byte_tokenizer(), 256, 64)
    assert len(ids) == 1
    assert skipped == {"turns after the last assistant turn": (1, 1), "an empty answer": (2, 1)}


def test_an_empty_lock_is_taken_over(tmp_path):
    """31.11: an empty .lock (a writer killed while taking it) was never taken over ("pid None on None")."""
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text("")
    parity.main(PARITY + ["--out-dir", str(out)])
    assert json.load(open(out / "summary.json"))["steps"] == 4 and not (out / ".lock").exists()


def test_sigterm_of_a_compare_names_what_is_kept_and_how_to_continue(tmp_path):
    """31.11: Ctrl-C or SIGTERM of parity.py --compare --jobs 2 printed a bare "stopped (SIGTERM)"."""
    import signal
    import time
    out = tmp_path / "c"
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "parity.py"), *PARITY[:-3], "--compare", "--jobs", "2",
                             "--seeds", "0", "--intervals", "0.3", "--max-steps", "100000", "--eval-every", "2",
                             "--stop-acc", "2", "--no-plot", "--out-dir", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=ENV)
    deadline = time.time() + 120
    while not list(out.glob("*/ckpt.pt")) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"stopped (SIGTERM); every finished run in {out} is kept, and each unfinished one keeps "
                           f"its last checkpoint; continue with: python parity.py"), line
    assert not list(out.glob("*/.lock"))


def test_an_interrupted_run_of_any_kind_says_what_is_kept(tmp_path):
    """31.11: eval_8b.py's Ctrl-C printed a bare "interrupted" and left an empty --out-dir. Run gives every
    interrupt its note (here a run whose results are written one by one), and removes a folder it made
    and left empty."""
    from machinery.run import Partial, Run
    out = tmp_path / "new" / "eval"
    with pytest.raises(KeyboardInterrupt) as e:
        with Run("eval_8b.py", {"x": 1}, str(out), checkpoints=Partial("results")):
            raise KeyboardInterrupt
    assert e.value.note.startswith(f"the results scored so far are in {out / 'results'}; continue with: ")
    assert e.value.note.endswith("--resume") and not (tmp_path / "new").exists()
