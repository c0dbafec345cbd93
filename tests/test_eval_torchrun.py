"""eval_8b.py as the paper's tables run it: hours of scoring under torchrun. No rank is killed by a
timeout while another works, every rank stops on any rank's error (one line from rank 0), a scored
task is never lost, and nothing is scored from a broken model (issue 25). Tiny export, the local task
files in ../shared/data/evals, gloo on CPUs; faults are planted by tests/fault.py."""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, SHARED_DATA

from machinery import files, llada
import model as model_lib

pytest.importorskip("lm_eval")
import eval_8b  # noqa: E402

EVALS = os.path.join(SHARED_DATA, "evals")
pytestmark = pytest.mark.skipif(not os.path.exists(EVALS), reason="needs ../shared/data")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
FAULT = os.path.join(ROOT, "tests", "fault.py")


def export(folder, nan=False, tokenizer=None, seed=0):
    torch.manual_seed(seed)
    m = model_lib.Transformer(model_lib.get_config("tiny", vocab_size=262, mask_id=257, block_size=256))
    if nan:
        with torch.no_grad():
            m.transformer.blocks[0].q_proj.weight[0, 0] = float("nan")
    llada.save_safetensors(m, str(folder))
    (folder / "config.json").write_text(json.dumps(llada.config_to_json(m.cfg, eos_token_id=256)))
    (tokenizer or llada.byte_tokenizer()).save(str(folder / "tokenizer.json"))
    return str(folder)


def evaluate(tmp_path, *args, nproc=1, fault=None, timeout=300):
    """eval_8b.py as a user runs it (under torchrun for nproc > 1), optionally through tests/fault.py."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    target = [FAULT, "eval_8b.py"] if fault else [os.path.join(ROOT, "eval_8b.py")]
    return subprocess.run(launcher + target + ["--device", "cpu", "--data-dir", EVALS, *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, env={**ENV, **(fault or {})})


def error_lines(r):
    return [line for line in (r.stdout + r.stderr).splitlines() if line.startswith("error:")]


def test_a_rank_far_behind_the_others_is_not_killed_by_a_timeout(tmp_path):
    """Issue 25.1: lm-eval meets the ranks between request types while they score alone for hours.
    With --dist-timeout 2 s, rank 1 comes to the meeting 6 s late and the evaluation still finishes:
    the meetings go over a group of their own that waits RANK_WAIT. (Over the launcher's group, as
    before, the other rank's barrier times out.)"""
    ckpt = export(tmp_path / "export")
    r = evaluate(tmp_path, "--checkpoint", ckpt, "--tasks", "arc_challenge", "--limit", "4", "--mc-num", "2",
                 "--dist-timeout", "2", "--out-dir", str(tmp_path / "eval"), nproc=2,
                 fault={"FAULT": "slow", "FAULT_RANK": "1", "FAULT_SECONDS": "6"})
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.load(open(tmp_path / "eval" / "summary.json"))
    assert s["world_size"] == 2 and s["results"]["arc_challenge"]["items"] == 4


@pytest.mark.parametrize("fault", ["user-error", "bug"])
def test_an_error_on_one_rank_stops_every_rank_with_rank_0s_one_line(tmp_path, fault):
    """Issue 25.2: an error on rank 1 alone (here planted in its loglikelihood) is met by rank 0, which
    prints it once: a user error as one line, a bug as its traceback; every rank exits, none hangs."""
    ckpt = export(tmp_path / "export")
    r = evaluate(tmp_path, "--checkpoint", ckpt, "--tasks", "arc_challenge", "--limit", "4", "--mc-num", "2",
                 "--out-dir", str(tmp_path / "eval"), nproc=2, fault={"FAULT": fault, "FAULT_RANK": "1"}, timeout=200)
    assert r.returncode != 0
    if fault == "user-error":
        assert error_lines(r) == ["error: planted on rank 1: an answer that does not fit"], r.stderr[-3000:]
    else:
        assert r.stderr.count("rank 1 failed:") == 1 and "ZeroDivisionError" in r.stderr, r.stderr[-3000:]
    assert not os.path.exists(tmp_path / "eval" / "results")           # nothing scored, nothing half-written
    assert not os.path.exists(tmp_path / "eval" / "tasks")


def test_a_limit_below_the_world_size_is_one_line(tmp_path):
    """Issue 25.2: with --limit 1 on 2 ranks, lm-eval gives rank 1 no item and rank 1 alone failed."""
    ckpt = export(tmp_path / "export")
    r = evaluate(tmp_path, "--checkpoint", ckpt, "--tasks", "arc_challenge", "--limit", "1",
                 "--out-dir", str(tmp_path / "eval"), nproc=2, timeout=200)
    assert r.returncode != 0 and error_lines(r) == ["error: --limit 1 is below the 2 ranks: every rank needs an item "
                                                    "of each task"], r.stderr[-3000:]


def test_a_scored_task_survives_a_later_failure_and_resume_skips_it(tmp_path):
    """Issue 25.3: each task's result is written when it is scored; the second task fails; --resume
    keeps the first (same checkpoint and settings: not scored again) and scores the second."""
    ckpt = export(tmp_path / "export")
    args = ["--checkpoint", ckpt, "--tasks", "arc_challenge,hellaswag", "--limit", "3", "--mc-num", "2",
            "--out-dir", str(tmp_path / "eval")]
    fault = {"FAULT": "fail-call", "FAULT_RANK": "0", "FAULT_CALL": "2", "FAULT_MARKER": str(tmp_path / "once")}
    r = evaluate(tmp_path, *args, fault=fault)
    assert r.returncode == 1 and error_lines(r) == ["error: planted: this task failed"], r.stderr[-3000:]
    first = json.load(open(tmp_path / "eval" / "results" / "arc_challenge.json"))
    assert first["result"]["items"] == 3 and not (tmp_path / "eval" / "summary.json").exists()
    r = evaluate(tmp_path, *args, "--resume", fault=fault)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "arc_challenge: acc_norm,none" in r.stdout and "(scored earlier)" in r.stdout
    s = json.load(open(tmp_path / "eval" / "summary.json"))
    assert s["results"]["arc_challenge"] == first["result"] and s["results"]["hellaswag"]["items"] == 3
    # the checkpoint is identified by its content: the same weights written again are the same checkpoint,
    # other weights under the same path are never mixed with these scores
    export(tmp_path / "export", nan=False)
    same = {**first["settings"], "checkpoint": files.fingerprint(ckpt)}
    assert eval_8b.earlier_result(str(tmp_path / "eval"), "arc_challenge", same)["result"] == first["result"]
    export(tmp_path / "export", nan=False, seed=1)                   # other weights: a new fingerprint
    settings = {**first["settings"], "checkpoint": files.fingerprint(ckpt)}
    with pytest.raises(eval_8b.cli.UserError, match=r"scored with other settings or weights \(checkpoint\)"):
        eval_8b.earlier_result(str(tmp_path / "eval"), "arc_challenge", settings)


def test_a_gated_dataset_is_one_line_before_any_work():
    """Issue 25.3: GPQA is gated on the Hub; without its terms accepted and a token, lm-eval fails when
    it loads the data: that is one line naming huggingface-cli login, before anything is scored."""
    class Manager:
        task_index = {}

        def load(self, names):
            raise ConnectionError("Dataset 'Idavidrein/gpqa' is a gated dataset on the Hub. You must be authenticated")
    with pytest.raises(eval_8b.cli.UserError, match="gpqa: its dataset Idavidrein/gpqa is gated.*huggingface-cli login"):
        eval_8b.load_task_data(Manager(), ["gpqa"], {"gpqa": "gpqa_main_n_shot"}, 1, None)


def test_nan_weights_are_refused_naming_the_checkpoint(tmp_path):
    """Issue 25.5: a model with NaN weights gave every answer log-likelihood nan and acc_norm 0.000."""
    ckpt = export(tmp_path / "export", nan=True)
    r = evaluate(tmp_path, "--checkpoint", ckpt, "--tasks", "arc_challenge", "--limit", "2",
                 "--out-dir", str(tmp_path / "eval"))
    assert r.returncode == 1 and error_lines(r) == [f"error: --checkpoint {ckpt}: transformer.blocks.0.q_proj.weight "
                                                    f"holds NaN or inf; nothing is scored from it"], r.stderr[-2000:]
    assert not os.path.exists(tmp_path / "eval")                       # the refused run left no folder


def test_an_infinite_likelihood_is_an_error_not_a_score():
    m = model_lib.Transformer(model_lib.get_config("tiny", vocab_size=262, mask_id=257, block_size=32))
    lm = eval_8b.MaskedDiffusionLM(m.eval(), llada.byte_tokenizer(), llada.token_ids(llada.byte_tokenizer(), m.cfg), "cpu",
                                   checkpoint="CKPT")
    with torch.no_grad():
        m.transformer.ff_out.weight.fill_(float("inf"))
    with pytest.raises(eval_8b.cli.UserError, match="CKPT gives a non-finite log-likelihood"):
        lm.log_likelihood([10, 20], [30])


def test_one_token_answers_take_one_forward_per_question():
    """Issue 25.7: MMLU's four one-token answers share their one masked position: one forward scores
    all four (LLaDA's estimator with one draw, exactly), not four identical forwards."""
    from lm_eval.api.instance import Instance
    torch.manual_seed(0)
    m = model_lib.Transformer(model_lib.get_config("tiny", vocab_size=262, mask_id=257, block_size=32, init_std=0.5))
    calls = []
    forward = m.forward
    m.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
    lm = eval_8b.MaskedDiffusionLM(m.eval(), llada.byte_tokenizer(), llada.token_ids(llada.byte_tokenizer(), m.cfg), "cpu",
                                   mc_num=1)
    requests = [Instance("loglikelihood", {}, (f"Q{q}: pick:", c), i) for q in range(3) for i, c in enumerate("ABCD")]
    scores = [s for s, _ in lm.loglikelihood(requests)]
    assert len(calls) == 3
    ctx, ans = lm.encode_pair("Q1: pick:", "C")
    x0 = torch.tensor(ctx + ans)[None]
    xt = x0.clone()
    xt[0, -1] = 257
    want = -torch.nn.functional.cross_entropy(forward(xt, output_mask=xt == 257).double(), x0[0, -1:]).item()
    assert scores[6] == pytest.approx(want, abs=1e-9)


def test_mmlu_stem_comes_from_mmlus_own_run(tmp_path):
    """Issue 25.7: Table 2 scores MMLU and MMLU-STEM; the STEM subjects are MMLU's own, so MMLU-STEM is
    MMLU's STEM group (same items, settings and weights), not a second pass over them."""
    ckpt = export(tmp_path / "export")
    r = evaluate(tmp_path, "--checkpoint", ckpt, "--tasks", "mmlu,mmlu_stem", "--limit", "1",
                 "--out-dir", str(tmp_path / "eval"), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "mmlu_stem: acc,none" in r.stdout and "(derived from mmlu)" in r.stdout
    s = json.load(open(tmp_path / "eval" / "summary.json"))["results"]
    raw = json.load(open(tmp_path / "eval" / "results" / "mmlu.json"))["raw"]
    assert s["mmlu_stem"]["value"] == raw["results"]["mmlu_stem_local"]["acc,none"]
    assert s["mmlu"]["items"] == 57 and 0 < s["mmlu_stem"]["items"] < 57


def test_the_instruct_protocol_needs_the_end_of_turn_token(tmp_path):
    """Issue 25.8: --protocol instruct with a tokenizer without <|eot_id|> crashed inside generate."""
    from tokenizers import AddedToken, Tokenizer, decoders, models
    tok = Tokenizer(models.BPE(vocab={f"<0x{b:02X}>": b for b in range(256)}, merges=[], byte_fallback=True))
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<|endoftext|>", "<|mdm_mask|>", "<|startoftext|>")])
    ckpt = export(tmp_path / "export", tokenizer=tok)
    r = evaluate(tmp_path, "--checkpoint", ckpt, "--tasks", "gsm8k", "--limit", "1", "--protocol", "instruct",
                 "--gen-length", "16", "--steps", "16", "--block-length", "16", "--out-dir", str(tmp_path / "eval"))
    assert r.returncode == 1 and len(error_lines(r)) == 1 and "no <|start_header_id|>, <|end_header_id|>, <|eot_id|> " \
        "token" in error_lines(r)[0] and "--protocol instruct" in error_lines(r)[0], r.stderr[-2000:]


def test_an_evaluation_never_writes_into_another_scripts_folder(tmp_path):
    """Issue 25.4: eval_8b.py overwrote a pre-training run's summary.json."""
    ckpt = export(tmp_path / "export")
    run_dir = tmp_path / "pretrain_run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps({"script": "pretrain_8b.py"}))
    (run_dir / "summary.json").write_text(json.dumps({"script": "pretrain_8b.py", "steps": 9}))
    r = evaluate(tmp_path, "--checkpoint", ckpt, "--tasks", "arc_challenge", "--limit", "2", "--out-dir", str(run_dir))
    assert r.returncode == 1 and "holds a run of pretrain_8b.py, not of eval_8b.py" in error_lines(r)[0]
    assert json.load(open(run_dir / "summary.json")) == {"script": "pretrain_8b.py", "steps": 9}
    assert sorted(os.listdir(run_dir)) == ["run.json", "summary.json"]


def test_a_mask_id_that_is_a_real_token_is_refused_naming_the_config(tmp_path):
    """Issue 25.6: config.json's mask_token_id on a real token ('A' = 65 of the byte tokenizer)."""
    ckpt = export(tmp_path / "export")
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    (tmp_path / "export" / "config.json").write_text(json.dumps({**config, "mask_token_id": 65}))
    r = evaluate(tmp_path, "--checkpoint", ckpt, "--tasks", "arc_challenge", "--limit", "2",
                 "--out-dir", str(tmp_path / "eval"))
    assert r.returncode == 1 and len(error_lines(r)) == 1, r.stderr[-2000:]
    assert f"{tmp_path / 'export' / 'config.json'}: mask_token_id: mask id 65 is a real token" in error_lines(r)[0]
