import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, SHARED_DATA

import wikitext
from machinery import cli, corpus, files, optim

WT2 = os.path.join(SHARED_DATA, "wikitext-2")
RANKS = os.path.join(SHARED_DATA, "gpt2-tokenizer", "gpt2.tiktoken")
needs_data = pytest.mark.skipif(not os.path.exists(WT2), reason="needs ../shared/data")


def tiny_cfg(tmp_path, **kw):
    """The tiny preset on local WikiText-2: train on valid, evaluate on test (no internet)."""
    base = dict(wikitext.PRESETS["tiny"], data=WT2, tokenizer_file=RANKS, train_split="valid",
                cache_dir=str(tmp_path / "cache"))
    return wikitext.WikiConfig(**{**base, **kw})


@needs_data
def test_tokenizer_from_local_rank_file():
    enc = corpus.gpt2_tokenizer(RANKS)
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.n_vocab == 50257 and enc.eot_token == 50256


def test_tokenizer_file_missing():
    with pytest.raises(cli.UserError):
        corpus.gpt2_tokenizer("/nonexistent/gpt2.tiktoken")


@needs_data
def test_memmap_cache_round_trip(tmp_path, monkeypatch):
    data = tmp_path / "wt"
    data.mkdir()
    shutil.copy(os.path.join(WT2, "wiki.test.raw"), data / "wiki.test.raw")
    cfg = tiny_cfg(tmp_path, data=str(data))
    enc = corpus.gpt2_tokenizer(RANKS)
    ids = wikitext.load_split(cfg, "test", enc)
    want = enc.encode_ordinary(open(data / "wiki.test.raw", encoding="utf-8").read())
    assert ids.dtype == np.uint16 and np.array_equal(np.asarray(ids), np.array(want))
    monkeypatch.setattr(corpus, "encode", None)          # the cache alone must serve it now
    assert np.array_equal(np.asarray(wikitext.load_split(cfg, "test", enc)), np.array(want))


def test_get_batch_windows():
    tokens = np.arange(1000, dtype=np.uint16)
    x = wikitext.get_batch(tokens, 4, 10, torch.Generator().manual_seed(0))
    assert x.shape == (4, 10) and (x.diff(dim=1) == 1).all()


@needs_data
def test_a_few_steps_on_wikitext2_reduce_the_loss(tmp_path):
    cfg = tiny_cfg(tmp_path, max_steps=30, eval_every=30, log_every=5)
    summary, history = wikitext.train(cfg, str(tmp_path / "run"), quiet=True)
    train = [h["train_loss"] for h in history if "train_loss" in h]
    assert train[-1] < train[0] - 1.0, train
    assert summary["test_loss"] < math.log(50304) - 1.0          # well below a uniform model
    assert len(summary["test_loss_bins"]) == 10
    s = json.load(open(tmp_path / "run" / "summary.json"))
    for key in ("settings", "test_loss", "train_loss_in_window", "test_loss_bins", "steps", "tokens", "seconds"):
        assert key in s


@needs_data
def test_resume_is_bit_identical(tmp_path, monkeypatch):
    cfg = tiny_cfg(tmp_path, max_steps=6, ckpt_every=3, log_every=1, eval_every=6)
    _, straight = wikitext.train(cfg, str(tmp_path / "a"), quiet=True)

    saves = []
    real_save = files.atomic_torch_save

    def crash_after_first_checkpoint(obj, path, **kw):
        real_save(obj, path, **kw)
        saves.append(obj["step"])
        raise KeyboardInterrupt                                   # the machine goes down at step 3
    monkeypatch.setattr(files, "atomic_torch_save", crash_after_first_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        wikitext.train(cfg, str(tmp_path / "b"), quiet=True)
    monkeypatch.setattr(files, "atomic_torch_save", real_save)
    assert saves == [3]
    _, resumed = wikitext.train(cfg, str(tmp_path / "b"), resume=True, quiet=True)
    losses = lambda h: [(e["step"], e["train_loss"]) for e in h if "train_loss" in e]
    assert losses(resumed) == losses(straight)                    # exact equality on CPU
    tests = lambda h: [(e["step"], e["test_loss"]) for e in h if "test_loss" in e]
    assert tests(resumed) == tests(straight)


@needs_data
def test_non_finite_loss_stops_and_keeps_checkpoint(tmp_path, monkeypatch):
    cfg = tiny_cfg(tmp_path, max_steps=6, ckpt_every=2, log_every=1, eval_every=6)
    real = wikitext.masking.md_loss
    calls = []

    def poisoned(*a, **k):
        calls.append(1)
        out = real(*a, **k)
        return out * float("nan") if len(calls) == 3 else out
    monkeypatch.setattr(wikitext.masking, "md_loss", poisoned)
    with pytest.raises(cli.UserError, match="step 3.*step 2"):
        wikitext.train(cfg, str(tmp_path / "run"), quiet=True)
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=False)["step"] == 2


def fake_run(out_dir, spec, loss, seed=0):
    d = wikitext.run_dir(str(out_dir), wikitext.replace(wikitext.WikiConfig(), **spec, seed=seed))
    os.makedirs(d, exist_ok=True)
    json.dump(dict(test_loss=loss, train_loss_in_window=loss + 0.1, test_loss_bins=[loss] * 10,
                   test_loss_curve=[[100, loss + 1], [200, loss]], steps=200, seconds=1.0),
              open(os.path.join(d, "summary.json"), "w"))


def test_sweep_skips_finished_runs_and_plots(tmp_path, monkeypatch):
    for i, spec in enumerate(wikitext.SWEEP):
        fake_run(tmp_path, spec, 5.0 + abs(i - 4.5) / 10)
    monkeypatch.setattr(wikitext, "train", lambda *a, **k: pytest.fail("a finished run was retrained"))
    results = wikitext.sweep_intervals(wikitext.WikiConfig(), wikitext.SWEEP, str(tmp_path))
    assert len(results["runs"]) == 11 and results["runs"][4]["test_loss"] == pytest.approx(5.05)
    assert (tmp_path / "sweep.csv").read_text().count("\n") == 12
    wikitext.plot_sweep(json.load(open(tmp_path / "sweep.json")), str(tmp_path))
    for f in ("fig3_loss_vs_interval.png", "fig7_loss_vs_step.png", "loss_per_t_bin.png"):
        assert (tmp_path / f).stat().st_size > 0


def test_sweep_trains_only_missing_runs(tmp_path, monkeypatch):
    fake_run(tmp_path, dict(t0=0.0, t1=0.1), 6.0)
    trained = []

    def fake_train(cfg, out_dir, **k):
        trained.append((cfg.t0, cfg.t1, cfg.seed))
        fake_run(tmp_path, dict(t0=cfg.t0, t1=cfg.t1), 5.5, cfg.seed)
        return dict(test_loss=5.5, train_loss_in_window=5.6, seconds=1.0), []
    monkeypatch.setattr(wikitext, "train", fake_train)
    windows = [dict(t0=0.0, t1=0.1), dict(t0=0.4, t1=0.5)]
    wikitext.sweep_intervals(wikitext.WikiConfig(), windows, str(tmp_path))
    assert trained == [(0.4, 0.5, 0)]
    results = wikitext.sweep_intervals(wikitext.WikiConfig(), windows, str(tmp_path), seeds=[0, 1])    # a second seed
    assert trained == [(0.4, 0.5, 0), (0.0, 0.1, 1), (0.4, 0.5, 1)]
    assert [(r["window"], r["seeds"], r["mean"]) for r in results["table"]] == [("U0-0.1", [0, 1], 5.75),
                                                                                 ("U0.4-0.5", [0, 1], 5.5)]


def test_parse_intervals():
    assert wikitext.parse_intervals("0-0.1,0.45-0.55") == [dict(t0=0.0, t1=0.1), dict(t0=0.45, t1=0.55)]
    assert wikitext.parse_intervals("beta:0.34:0.03") == [dict(t_dist="beta", t_mean=0.34, t_std=0.03)]
    with pytest.raises(ValueError, match="bell-shaped"):
        wikitext.parse_intervals("beta:0.3:0.4")
    with pytest.raises(ValueError):
        wikitext.parse_intervals("0.6-0.4")
    with pytest.raises(ValueError):
        wikitext.parse_intervals("abc")


def test_lr_schedule():
    """wikitext.py's schedule: linear warm-up, then nanoGPT's cosine to min_lr at max_steps."""
    cfg = wikitext.WikiConfig(lr=1e-3, min_lr=1e-4, warmup=10, max_steps=110)
    lr_at = lambda step: optim.lr_at(step, cfg.lr, warmup=cfg.warmup, max_steps=cfg.max_steps, schedule="cosine",
                                     min_lr=cfg.min_lr)
    assert lr_at(0) == pytest.approx(1e-4)
    assert lr_at(9) == pytest.approx(1e-3)
    assert lr_at(60) == pytest.approx(5.5e-4)
    assert lr_at(110) == pytest.approx(1e-4)


@needs_data
def test_interval_auto_centres_on_corpus_t_star(tmp_path):
    t0, t1 = wikitext.auto_interval(tiny_cfg(tmp_path), 0.1)
    assert t1 - t0 == pytest.approx(0.1) and 0.4 < (t0 + t1) / 2 < 0.5


@pytest.mark.parametrize("args,msg", [(["--t0", "0.6", "--t1", "0.4"], "t0"),
                                      (["--preset", "tiny", "--data", "/nonexistent"], "not a folder"),
                                      (["--preset", "tiny", "--block-size", "999"], "--block-size 999 exceeds")])
def test_bad_input_is_one_line_error(tmp_path, args, msg):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "wikitext.py"), *args], capture_output=True, text=True,
                       cwd=tmp_path)
    assert r.returncode != 0
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error:") and msg in r.stderr
    assert os.listdir(tmp_path) == []                            # the refused run left no empty out/wikitext


@needs_data
def test_ddp_under_torchrun_on_cpu(tmp_path):
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                        os.path.join(ROOT, "wikitext.py"), "--preset", "tiny", "--device", "cpu", "--data", WT2,
                        "--train-split", "valid", "--tokenizer-file", RANKS, "--cache-dir", str(tmp_path / "c"),
                        "--out-dir", str(tmp_path / "run"), "--max-steps", "4", "--batch-size", "16",
                        "--eval-every", "4"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-8000:]
    assert r.stdout.count("wrote") == 1                          # rank 0 alone reports and saves
    s = json.load(open(tmp_path / "run" / "summary.json"))
    assert s["steps"] == 4 and math.isfinite(s["test_loss"])


def test_benchmark_reports_both_heads_and_profiles(capsys):
    cfg = wikitext.WikiConfig(**{**wikitext.PRESETS["tiny"], "t0": 0.0, "t1": 0.1})
    out = wikitext.benchmark(cfg, "cpu", False, steps=2, warmup=1, profile=True)
    heads = out["masked_head"], out["full_head"]
    assert all(h["tokens_per_sec"] > 0 and h["mfu"] is None and h["peak_memory_gib"] is None for h in heads)
    assert out["speedup"] == pytest.approx(heads[0]["tokens_per_sec"] / heads[1]["tokens_per_sec"])
    assert "aten::mm" in capsys.readouterr().out                   # the profiler table was printed


def test_bytes_are_the_text_utf8_and_round_trip(tmp_path):
    """Issue 32: --tokenizer bytes. Every character's UTF-8 bytes are its ids (one to four of them), so every
    byte value text can hold occurs and comes back; MASK (256) never comes out of text; the cache keeps them."""
    enc = corpus.Bytes()
    text = "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000)      # every code point
    ids = enc.encode_ordinary(text)
    assert ids == list(text.encode("utf-8")) and enc.decode(ids) == text
    assert set(ids) == set(range(256)) - {0xC0, 0xC1} - set(range(0xF5, 0x100))      # all UTF-8 can hold
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "test.txt").write_text(text)
    cfg = wikitext.WikiConfig(data=str(tmp_path / "d"), tokenizer="bytes", cache_dir=str(tmp_path / "cache"))
    cached = wikitext.load_split(cfg, "test", enc)
    assert cached.dtype == np.uint16 and np.asarray(cached).tolist() == ids


def test_a_tiny_byte_model_learns_below_its_unigram_entropy(tmp_path):
    """Issue 32: the byte-level path end to end, test-sized. On text whose every byte its neighbours
    decide (a period of 8), a model that uses context leaves the unigram plateau (H_1 of the training
    bytes, log 8) well behind, and its summary says at which evaluation it did."""
    (tmp_path / "d").mkdir()
    for split in ("train", "test"):
        (tmp_path / "d" / f"{split}.txt").write_text("abcdefgh" * 200)
    cfg = wikitext.WikiConfig(**{**wikitext.PRESETS["tiny"], "tokenizer": "bytes", "data": str(tmp_path / "d"),
                                 "cache_dir": str(tmp_path / "cache"), "block_size": 16, "batch_size": 16,
                                 "micro_batch": 16, "max_steps": 200, "eval_every": 50, "eval_seqs": 16,
                                 "lr": 3e-3, "t0": 0.1, "t1": 0.5})
    summary, _ = wikitext.train(cfg, str(tmp_path / "run"), quiet=True)
    assert summary["unigram_entropy"] == pytest.approx(math.log(8), rel=1e-9)
    assert summary["test_loss"] < summary["unigram_entropy"] - 0.5, summary
    assert summary["left_plateau_at"] in (50, 100, 150, 200)
