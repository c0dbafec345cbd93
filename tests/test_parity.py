import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

import masking
import parity
import theory


def small(**kw):
    """(10, 2) parity, a small MLP: seconds on a CPU."""
    base = dict(n=10, k=2, n_train=400, n_val=400, hidden=256, max_steps=400, eval_every=25, lr=3e-3, t1=0.3)
    return parity.ParityConfig(**{**base, **kw})


def test_data_labels_are_parity_of_S_and_split_is_disjoint():
    S, train, val = parity.make_data(12, 3, 1000, 500, seed=3)
    assert len(S) == 3 and S.tolist() == sorted(S.tolist())
    for rows in (train, val):
        assert set(rows.unique().tolist()) == {-1, 1}
        assert torch.equal(rows[:, -1], rows[:, S].prod(1))
    code = lambda r: set(((r[:, :-1] > 0).long() << torch.arange(12)).sum(1).tolist())
    assert len(code(train)) == 1000 and not code(train) & code(val)


def test_evaluation_masks_only_the_label():
    tokens = parity.to_tokens(parity.make_data(8, 2, 50, 10, 0)[1])
    xt = parity.mask_label(tokens)
    assert (xt[:, -1] == parity.MASK).all() and torch.equal(xt[:, :-1], tokens[:, :-1])


class Oracle(torch.nn.Module):
    """Outputs the parity of S from the visible input bits; checks it never sees y."""

    def __init__(self, S):
        super().__init__()
        self.S = S

    def forward(self, tokens):
        assert (tokens[:, -1] == parity.MASK).all()
        return (tokens[:, self.S] * 2 - 1).prod(1).float()


def test_accuracy_of_an_oracle_is_one_and_of_its_negation_zero():
    cfg = small()
    S, train, _ = parity.make_data(cfg.n, cfg.k, 200, 10, 0)
    tokens = parity.to_tokens(train)
    assert parity.accuracy(Oracle(S), cfg, tokens) == 1.0
    neg = Oracle(S)
    neg.forward = lambda t: -Oracle.forward(neg, t)
    assert parity.accuracy(neg, cfg, tokens) == 0.0


def test_regime_split_on_a_hand_enumerated_case():
    # n = 4, S = {0, 2}, S' = {0, 2, 4}: exactly one of them masked is the signal regime
    S_prime = torch.tensor([0, 2, 4])
    masked = torch.tensor([[1, 0, 0, 0, 0],      # {0}: signal
                           [1, 0, 1, 0, 0],      # {0, 2}: noise (two of S')
                           [0, 1, 0, 1, 0],      # {1, 3}: noise (none of S')
                           [0, 1, 0, 0, 1],      # {1, 4}: signal (the label)
                           [0, 0, 0, 0, 0]],     # nothing masked: noise, no loss
                          dtype=torch.bool)
    rows = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.0])
    out = torch.arange(25, dtype=torch.float).view(5, 5) / 10     # MLP-style real outputs
    cfg = small()
    st = parity.regime_stats(rows, out, masked, S_prime, cfg)
    assert st["signal_frac"] == pytest.approx(2 / 5)
    assert st["loss_signal"] == pytest.approx((1 + 4) / 5) and st["loss_noise"] == pytest.approx((2 + 3) / 5)
    noise_outputs = torch.tensor([0.5, 0.7, 1.1, 1.3])            # masked positions of rows 1 and 2
    assert st["noise_out2"] == pytest.approx(noise_outputs.square().mean().item())


def test_empirical_signal_fraction_matches_theory():
    # the real masking path of training: sample_t + mask_tokens on (20, 6) sequences
    g = torch.Generator().manual_seed(0)
    B, n, k = 200_000, 20, 6
    for t0, t1 in [(0.0, 0.246), (0.0, 1.0), (0.1, 0.4)]:
        t = masking.sample_t(B, t0, t1, generator=g)
        _, masked = masking.mask_tokens(torch.zeros(B, n + 1, dtype=torch.long), t, parity.MASK, generator=g)
        S_prime = torch.tensor([1, 4, 7, 9, 13, 18, 20])
        frac = (masked[:, S_prime].sum(1) == 1).float()
        se = frac.std().item() / math.sqrt(B)
        assert abs(frac.mean().item() - theory.signal_prob(t0, t1, k)) < 4 * se


def test_md_reaches_full_validation_accuracy_on_a_small_task(tmp_path):
    summary, history = parity.train(small(stop_acc=1.0), str(tmp_path), quiet=True)
    assert summary["val_acc"] == 1.0 and summary["steps_to_95"] is not None
    assert history[0]["val_acc"] < 0.8                            # it learned; it did not start there


def test_same_seed_same_curve_and_resume(tmp_path):
    cfg = small(max_steps=60, eval_every=20, stop_acc=2.0)
    _, a = parity.train(cfg, str(tmp_path / "a"), quiet=True)
    _, b = parity.train(cfg, str(tmp_path / "b"), quiet=True)
    strip = lambda h: [{k: v for k, v in e.items() if k != "seconds"} for e in h]
    assert strip(a) == strip(b)
    parity.train(parity.ParityConfig(**{**cfg.__dict__, "max_steps": 40}), str(tmp_path / "c"), quiet=True)
    _, c = parity.train(cfg, str(tmp_path / "c"), resume=True, quiet=True, allow_change=("max_steps",))
    assert strip(c) == strip(a)


def test_transformer_and_label_objective_run(tmp_path):
    for i, kw in enumerate((dict(model="transformer", n_layer=1, d_model=32, n_head=2, mlp_hidden=64, batch_size=64),
                            dict(model="transformer", embed="joint", n_layer=1, d_model=32, n_head=2, mlp_hidden=64,
                                 batch_size=64, objective="label"),
                            dict(objective="label"), dict(loss="ce"), dict(secret_only=True),
                            dict(fresh=True, batch_size=64))):
        s, h = parity.train(small(max_steps=4, eval_every=2, **kw), str(tmp_path / str(i)), quiet=True)
        assert 0 <= s["val_acc"] <= 1 and len(h) == 2


def test_cli_writes_summary_and_plot(tmp_path):
    parity.main(["--n", "10", "--k", "2", "--n-train", "400", "--n-val", "400", "--hidden", "256",
                 "--lr", "3e-3", "--t1", "0.3", "--max-steps", "300", "--out-dir", str(tmp_path)])
    s = json.load(open(tmp_path / "summary.json"))
    for key in ("settings", "train_acc", "val_acc", "steps_to_95", "seconds_to_95"):
        assert key in s
    assert s["settings"]["t1"] == 0.3 and (tmp_path / "curves.png").stat().st_size > 0


def test_compare_writes_table_and_skips_finished_runs(tmp_path, capsys):
    args = ["--compare", "--n", "8", "--k", "2", "--n-train", "150", "--n-val", "100", "--hidden", "64",
            "--max-steps", "40", "--eval-every", "20", "--intervals", "0.2", "1.0", "--seeds", "0",
            "--jobs", "1", "--out-dir", str(tmp_path)]
    parity.main(args)
    s = json.load(open(tmp_path / "summary.json"))
    assert [r["run"] for r in s["table"]] == ["label", "md_0-0.2", "md_0-1"]
    assert (tmp_path / "results.csv").read_text().count("\n") == 4
    for f in ("fig2_accuracy.png", "fig6_label.png", "steps_to_95.png"):
        assert (tmp_path / f).stat().st_size > 0
    capsys.readouterr()
    parity.main(args)
    assert "3 already done" in capsys.readouterr().out


@pytest.mark.parametrize("args,msg", [(["--n", "5", "--k", "6"], "k <= n"), (["--t0", "0.5", "--t1", "0.2"], "t0"),
                                      (["--t1", "1.5"], "[0, 1]"), (["--n-train", "0"], "N > 0")])
def test_bad_arguments_are_one_line_errors(args, msg):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "parity.py"), *args], capture_output=True, text=True)
    assert r.returncode != 0
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error:") and msg in r.stderr


def test_table_rounds_medians():
    rows = [dict(run="md", seed=s, P_S=0.3, steps=100, steps_to_95=100 + s, seconds_to_95=sec, steps_to_train_99=None)
            for s, sec in enumerate((22.18, 22.19))]
    t = parity.table(rows)[0]
    assert t["seconds_median"] == 22.19 and str(t["seconds_median"]) == "22.19"
    assert t["steps_median"] == 100.5 and t["steps_range"] == [100, 101] and t["reached"] == 2


def test_fit_growth_recovers_the_exponent():
    points = [(n, k, 7.0 * n ** (1.5 * k)) for n, k in [(8, 2), (12, 2), (16, 2), (8, 3), (12, 3)]]
    a, b = parity.fit_growth(points)
    assert b == pytest.approx(1.5) and math.exp(a) == pytest.approx(7.0)
    assert parity.fit_growth([(8, 2, 100.0), (8, 2, 120.0)]) is None


def test_ladder_config_and_tasks():
    base = parity.ParityConfig(model="transformer", n_train=256, n_val=512, max_steps=12000)
    md, label = parity.ladder_config(base, 8, 2, "md", 3), parity.ladder_config(base, 12, 3, "label", 0)
    assert (md.n, md.k, md.seed, md.t1, md.n_train, md.n_val, md.max_steps) == (8, 2, 3, 0.538, 64, 128, 6000)
    assert (label.t1, label.n_train, label.n_val, label.max_steps) == (base.t1, 256, 512, 12000)
    assert parity.parse_tasks("8,2  12,3") == [(8, 2), (12, 3)]
    with pytest.raises(ValueError):
        parity.parse_tasks("8,9")


def test_ladder_runs_fits_and_refuses_runs_of_other_settings(tmp_path, capsys):
    args = ["--preset", "transformer", "--ladder", "6,1 8,1", "--seeds", "0", "--jobs", "1", "--max-steps", "200",
            "--eval-every", "50", "--lr", "3e-3", "--warmup", "0", "--fresh", "--no-tie-head", "--d-model", "32",
            "--mlp-hidden", "64", "--n-layer", "1", "--out-dir", str(tmp_path), "--no-plot"]
    parity.main(args)
    s = json.load(open(tmp_path / "ladder.json"))
    assert [(r["objective"], r["n"], r["k"]) for r in s["table"]] == [("label", 6, 1), ("label", 8, 1), ("md", 6, 1),
                                                                      ("md", 8, 1)]
    assert set(s["fits"]) == {"label", "md"}
    with pytest.raises(ValueError, match="other settings"):
        parity.main([a if a != "3e-3" else "1e-3" for a in args])
