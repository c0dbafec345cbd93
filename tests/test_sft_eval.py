"""sft_8b.py (chat format, answer-only masks, EOS padding, two processes) and eval_8b.py (the
likelihood estimator, generation, lm-eval's Instance objects and task files). Tests that need
lm-eval skip without it; CI installs requirements-eval.txt."""
import itertools
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, SHARED_DATA

import masking
import model as model_lib
import sft_8b
from machinery import cli, llada

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
TEMPLATE = os.path.join(SHARED_DATA, "llada-tokenizer", "tokenizer_config.json")
EVALS = os.path.join(SHARED_DATA, "evals")


def conversation(q="What is 2+3?", a="5", system=None):
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def rows_file(path, n=60, extra=()):
    rows = [{"messages": conversation(f"{i % 7}+{i % 5}?", str(i % 7 + i % 5))} for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in list(rows) + list(extra)) + "\n")
    return str(path)


def run(script, args, nproc=1, check=True, timeout=300):
    cmd = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone"]
           if nproc > 1 else [sys.executable])
    r = subprocess.run(cmd + [os.path.join(ROOT, script), *args], capture_output=True, text=True, env=ENV,
                       timeout=timeout, cwd=ROOT)
    if check:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-4000:]
    return r


# ----------------------------------------------------------------------------- the chat format

def test_chat_template_token_layout():
    tok = llada.byte_tokenizer()
    sp = {t: tok.token_to_id(t) for t in llada.SPECIALS}
    b = lambda s: list(s.encode())
    prompt, answer = llada.chat_ids(tok, conversation(system="Be brief."))
    assert prompt == ([sp["<|startoftext|>"], sp["<|start_header_id|>"]] + b("system") + [sp["<|end_header_id|>"]]
                      + b("\n\nBe brief.") + [sp["<|eot_id|>"], sp["<|start_header_id|>"]] + b("user")
                      + [sp["<|end_header_id|>"]] + b("\n\nWhat is 2+3?") + [sp["<|eot_id|>"], sp["<|start_header_id|>"]]
                      + b("assistant") + [sp["<|end_header_id|>"]] + b("\n\n"))
    assert answer == b("5") + [sp["<|eot_id|>"]]
    ids, masks, skipped = sft_8b.encode_rows([{"messages": conversation()}], tok, sp["<|endoftext|>"], 80)
    n = len(llada.chat_ids(tok, conversation())[0])
    assert ids.shape == (1, 80) and not skipped
    assert ids[0, n:n + 2].tolist() == b("5") + [sp["<|eot_id|>"]] and (ids[0, n + 2:] == sp["<|endoftext|>"]).all()
    assert not masks[0, :n].any() and masks[0, n:].all()               # the EOS padding is answer


@pytest.mark.skipif(not os.path.exists(TEMPLATE), reason="needs ../shared/data")
def test_chat_text_is_llada_template_rendered():
    """Our prompt is LLaDA's own Jinja template (tokenizer_config.json) rendered on the turns before the
    answer; the whole conversation renders as prompt + answer + the next assistant header."""
    import jinja2
    config = json.load(open(TEMPLATE))
    template = jinja2.Environment().from_string(config["chat_template"])
    msgs = conversation("  Solve x + 1 = 2.  ", " x = 1 ", system="You are a tutor.")
    render = lambda m: template.render(messages=m, bos_token=config["bos_token"])
    tok = llada.byte_tokenizer()
    prompt, answer = llada.chat_ids(tok, msgs)
    assert prompt == tok.encode(render(msgs[:-1]), add_special_tokens=False).ids
    header = tok.encode("<|start_header_id|>assistant<|end_header_id|>\n\n", add_special_tokens=False).ids
    assert prompt + answer + header == tok.encode(render(msgs), add_special_tokens=False).ids


def test_malformed_rows_are_skipped_and_counted():
    tok = llada.byte_tokenizer()
    rows = [{"messages": conversation()}, {"text": "no messages"}, {"messages": [{"role": "user", "content": "q"}]},
            {"messages": conversation("x" * 200, "y")}, {"messages": "not a list"}, {"messages": conversation()}]
    ids, masks, skipped = sft_8b.encode_rows(rows, tok, 256, 64)
    assert len(ids) == 2
    assert skipped == {"no `messages`": (1, 1), "no assistant turn": (2, 1),
                       "prompt longer than the block of 64": (3, 1),
                       "`messages` is not a list of {role, content}": (4, 1)}


# ----------------------------------------------------------------------------- SFT masks and loss

def test_sft_masks_only_answers_and_counts_the_padding(tmp_path):
    tok = llada.byte_tokenizer()
    data = [json.loads(line) for line in open(rows_file(tmp_path / "rows.jsonl"))]
    ids, answer, _ = sft_8b.encode_rows(data, tok, 256, 64)
    cfg = sft_8b.SFTConfig(**{**sft_8b.PRESETS["tiny"], "t0": 0.5, "t1": 1.0})
    seen = []

    class Recorder(torch.nn.Module):         # uniform logits: CE = log V at every masked position
        cfg = model_lib.ModelConfig(vocab_size=262, mask_id=257, block_size=64)

        def forward(self, xt, output_mask=None):
            seen.append((xt, output_mask))
            return torch.zeros(int(output_mask.sum()), 262, requires_grad=True)
    padding_masked = 0
    for slot in range(cfg.batch_size // cfg.micro_batch):       # every slot of a two-process run
        rows = sft_8b.Rows(ids, answer, slot, cfg, "cpu")
        for step in range(3):
            x0, maskable = rows.batch(step)
            loss, masked = masking.md_step_loss(Recorder(), x0, 257, cfg.t0, cfg.t1, generator=rows.gen, maskable=maskable)
            xt = seen[-1][0]
            assert not (masked & ~maskable).any() and torch.equal(xt[~maskable], x0[~maskable])  # prompt intact
            assert torch.equal(xt == 257, masked) and math.isfinite(loss.item())
            padding_masked += (masked & (x0 == 256)).sum().item()
    assert padding_masked > 0                                   # EOS padding is masked and enters the loss


def test_two_process_sft_from_a_tiny_pretrain_export(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"{i % 7}+{i % 5}={i % 7 + i % 5}, and so on: line {i}" for i in range(300)))
    run("pretrain_8b.py", ["--preset", "tiny", "--device", "cpu", "--data", str(corpus), "--max-steps", "4",
                           "--out-dir", str(tmp_path / "pt"), "--no-plot"])
    bad = [{"text": "no messages"}, {"messages": [{"role": "user", "content": "q"}]}]
    data = rows_file(tmp_path / "rows.jsonl", n=80, extra=bad)
    r = run("sft_8b.py", ["--preset", "tiny", "--device", "cpu", "--init", str(tmp_path / "pt" / "export"),
                          "--data", data, "--max-steps", "30", "--eval-every", "15", "--out-dir", str(tmp_path / "sft"),
                          "--no-plot"], nproc=2)
    assert "skipped 2 malformed rows" in r.stdout
    s = json.load(open(tmp_path / "sft" / "summary.json"))
    (s1, first), (s2, last) = s["test_loss_curve"]
    assert (s1, s2) == (15, 30) and last < first and s["world_size"] == 2
    cfg = json.load(open(tmp_path / "sft" / "export" / "config.json"))
    assert cfg["vocab_size"] == 262 and cfg["mask_token_id"] == 257


@pytest.mark.parametrize("case", ["missing", "all-malformed", "checkpoint"])
def test_sft_bad_input_is_one_line(tmp_path, case):
    args = ["--preset", "tiny", "--device", "cpu", "--max-steps", "2", "--out-dir", str(tmp_path / "out")]
    if case == "missing":
        args += ["--data", str(tmp_path / "none.jsonl")]
    elif case == "all-malformed":
        (tmp_path / "bad.jsonl").write_text('{"text": "x"}\n' * 20)
        args += ["--data", str(tmp_path / "bad.jsonl")]
    else:      # an export of another size: keys fit, shapes do not
        folder = tmp_path / "other"
        m = model_lib.Transformer(model_lib.get_config("tiny", vocab_size=262, mask_id=257, block_size=64))
        llada.save_safetensors(m, str(folder))
        config = llada.config_to_json(m.cfg, eos_token_id=256)
        config["d_model"], config["n_heads"] = 48, 2
        (folder / "config.json").write_text(json.dumps(config))
        llada.byte_tokenizer().save(str(folder / "tokenizer.json"))
        args += ["--data", rows_file(tmp_path / "rows.jsonl"), "--init", str(folder)]
    r = run("sft_8b.py", args, check=False)
    assert r.returncode == 1 and r.stderr.startswith("error:") and r.stderr.strip().count("\n") == 0, r.stderr
    want = {"missing": "does not exist", "all-malformed": "0 usable rows", "checkpoint": "does not fit the model"}
    assert want[case] in r.stderr


# ----------------------------------------------------------------------------- evaluation (lm-eval)

def harness(m, tok=None, **kw):
    eval_8b = pytest.importorskip("eval_8b")
    pytest.importorskip("lm_eval")
    tok = tok or llada.byte_tokenizer()
    return eval_8b.MaskedDiffusionLM(m, tok, llada.token_ids(tok, m.cfg), "cpu", **kw)


def exact_log_likelihood(fn, ctx, ans, mask_id):
    """-|a| E_l E_{S, |S|=l} (1/l) sum_{i in S} CE_i: every mask of the answer enumerated."""
    x0 = torch.tensor(ctx + ans)
    total = 0.0
    for l in range(1, len(ans) + 1):
        subsets = list(itertools.combinations(range(len(ctx), len(ctx) + len(ans)), l))
        for S in subsets:
            xt = x0.clone()
            xt[list(S)] = mask_id
            logits = fn(xt[None])
            ce = F.cross_entropy(logits.double(), x0[list(S)], reduction="sum").item()
            total += ce / l / len(subsets) / len(ans)
    return -len(ans) * total


@pytest.mark.parametrize("cfg", [0.0, 0.5])
def test_likelihood_estimator_equals_the_enumerated_expectation(cfg):
    torch.manual_seed(0)
    m = model_lib.Transformer(model_lib.get_config("tiny", vocab_size=262, mask_id=257, block_size=16,
                                                   init_std=0.5)).eval()
    lm = harness(m, mc_num=3000, mc_batch=300, cfg=cfg)
    ctx, ans = [10, 20], [30, 40, 50]
    is_prompt = torch.tensor([[True, True, False, False, False]])
    exact = exact_log_likelihood(lm.model_fn(is_prompt), ctx, ans, 257)
    estimate = lm.log_likelihood(ctx, ans)
    assert estimate == pytest.approx(exact, rel=0.01), (estimate, exact)
    assert lm.log_likelihood(ctx, [30]) == pytest.approx(exact_log_likelihood(lm.model_fn(is_prompt[:, :3]),
                                                                              ctx, [30], 257), abs=1e-5)


def test_a_trained_tiny_model_prefers_the_right_answer_on_lm_eval_instances():
    Instance = pytest.importorskip("lm_eval.api.instance").Instance
    torch.manual_seed(0)
    facts = [f"{k}={(7 * i + 3) % 10};" for i, k in enumerate("abcdefghijklmnopqrst")]   # a lookup table
    x0 = torch.tensor([list(f.encode()) for f in facts])
    # untied, as LLaDA: the nanoGPT-tied tiny model stays at the mode for 600+ steps (README "Parity")
    m = model_lib.Transformer(model_lib.get_config("tiny", vocab_size=262, mask_id=257, block_size=8,
                                                   tie_weights=False))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(500):
        t = masking.sample_t(len(x0), generator=g)
        xt, masked = masking.mask_tokens(x0, t, 257, generator=g)
        masking.md_loss(m(xt, output_mask=masked), x0, masked, t).backward()
        opt.step()
        opt.zero_grad()
    lm = harness(m.eval(), mc_num=16, mc_batch=16)
    requests = [Instance("loglikelihood", {}, (f[:2], answer), i) for i, f in enumerate(facts)
                for answer in (f[2:], str((int(f[2]) + 1) % 10) + ";")]        # two-token answers: 16 draws
    scores = lm.loglikelihood(requests)
    assert all(isinstance(s, float) and g is False for s, g in scores)
    right = sum(scores[2 * i][0] > scores[2 * i + 1][0] for i in range(len(facts)))
    assert right == len(facts), right


class Oracle(torch.nn.Module):
    """Writes `text` (bytes) from position `start` on, whatever the input."""

    def __init__(self, text, start, block=64):
        super().__init__()
        self.cfg = model_lib.ModelConfig(vocab_size=262, mask_id=257, block_size=block)
        self.ids, self.start = text, start

    def forward(self, x, output_mask=None, attention_mask=None):
        logits = torch.zeros(*x.shape, 262)
        for p in range(self.start, min(x.shape[1], self.start + len(self.ids))):
            logits[:, p, self.ids[p - self.start]] = 10.0
        return logits[output_mask]


def test_generate_until_cuts_as_llada_harness_does():
    Instance = pytest.importorskip("lm_eval.api.instance").Instance
    lm = harness(Oracle(list(b"hello STOP world"), start=3), gen_length=16, steps=16, block_length=16)
    request = lambda until: Instance("generate_until", {}, ("abc", dict(until=until)), 0)
    assert lm.generate_until([request(["STOP"]), request(["world"]), request([])]) == \
        ["hello ", "hello STOP ", "hello STOP world"]
    # LLaDA's harness: cut at the stop sequence on the text with its special tokens, then strip them;
    # what the model wrote after EOS stays (it does not cut at EOS)
    lm = harness(Oracle(list(b"hi") + [256] + list(b"more!"), start=3), gen_length=8, steps=8, block_length=8)
    assert lm.generate_until([request(["zzz"])]) == ["himore!"]
    assert lm.generate_until([request(["<|endoftext|>m"])]) == ["hi"]


def test_chat_template_of_the_harness_is_llada_template():
    if not os.path.exists(TEMPLATE):
        pytest.skip("needs ../shared/data")
    import jinja2
    config = json.load(open(TEMPLATE))
    lm = harness(Oracle([65], start=0))
    msgs = conversation()[:1]
    want = jinja2.Environment().from_string(config["chat_template"]).render(messages=msgs, bos_token="<|startoftext|>")
    assert lm.apply_chat_template(msgs) == want


@pytest.mark.skipif(not os.path.exists(EVALS), reason="needs ../shared/data")
def test_eval_cli_on_local_task_files(tmp_path):
    pytest.importorskip("lm_eval")
    m = model_lib.Transformer(model_lib.get_config("tiny", vocab_size=262, mask_id=257, block_size=256))
    folder = tmp_path / "export"
    llada.save_safetensors(m, str(folder))
    (folder / "config.json").write_text(json.dumps(llada.config_to_json(m.cfg, eos_token_id=256)))
    llada.byte_tokenizer().save(str(folder / "tokenizer.json"))
    run("eval_8b.py", ["--checkpoint", str(folder), "--tasks", "arc_challenge,gsm8k", "--data-dir", EVALS,
                       "--limit", "4", "--device", "cpu", "--mc-num", "4", "--gen-length", "16", "--steps", "16",
                       "--block-length", "16", "--out-dir", str(tmp_path / "eval")])
    s = json.load(open(tmp_path / "eval" / "summary.json"))
    arc, gsm = s["results"]["arc_challenge"], s["results"]["gsm8k"]
    assert arc["lm_eval_task"] == "arc_challenge_local" and 0 <= arc["value"] <= 1 and arc["cfg"] == 0.5
    assert gsm["metric"] == "exact_match,flexible-extract" and gsm["protocol"] == "base"
    assert gsm["logits_eos_inf"] is False and gsm["confidence_eos_eot_inf"] is False   # LLaDA's base protocol
    raw = json.load(open(tmp_path / "eval" / "results" / "arc_challenge.json"))["raw"]
    assert raw["results"]["arc_challenge_local"]["acc_norm,none"] == arc["value"]
    assert arc["items"] == gsm["items"] == 4          # results.md says how many items were scored
    assert "items scored: arc_challenge 4, gsm8k 4" in (tmp_path / "eval" / "results.md").read_text()
    assert "| **ours** |" in (tmp_path / "eval" / "results.md").read_text()


@pytest.mark.parametrize("case", ["task", "data-dir", "checkpoint"])
def test_eval_bad_input_is_one_line(tmp_path, case):
    pytest.importorskip("lm_eval")
    args = ["--device", "cpu", "--out-dir", str(tmp_path / "out"), "--limit", "2"]
    if case == "task":
        args += ["--tasks", "winogrande"]
    elif case == "data-dir":
        (tmp_path / "evals").mkdir()
        folder = tmp_path / "export"
        m = model_lib.Transformer(model_lib.get_config("tiny", vocab_size=262, mask_id=257))
        llada.save_safetensors(m, str(folder))
        (folder / "config.json").write_text(json.dumps(llada.config_to_json(m.cfg, eos_token_id=256)))
        llada.byte_tokenizer().save(str(folder / "tokenizer.json"))
        args += ["--tasks", "arc_easy", "--data-dir", str(tmp_path / "evals"), "--checkpoint", str(folder)]
    else:
        (tmp_path / "empty").mkdir()
        args += ["--tasks", "arc_easy", "--checkpoint", str(tmp_path / "empty")]
    r = run("eval_8b.py", args, check=False)
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("error:"), r.stderr
    assert r.stderr.strip().count("\n") == 0, r.stderr
    want = {"task": "unknown task 'winogrande'", "data-dir": "lacks arc_easy/ARC-Easy-test.jsonl",
            "checkpoint": "no config.json"}[case]
    assert want in r.stderr


def test_generate_benchmark_runs():
    pytest.importorskip("eval_8b")
    r = run("eval_8b.py", ["--benchmark", "--preset", "tiny", "--device", "cpu", "--gen-length", "32", "--steps",
                           "32", "--block-length", "32", "--batch-size", "4"])
    assert "batch 1" in r.stdout and "batch 4" in r.stdout and "tokens/s" in r.stdout


def test_protocols_and_the_rows_printed_beside_ours():
    eval_8b = pytest.importorskip("eval_8b")
    # no LLaDA setting uses logits_eos_inf for GSM8K / MATH; base: no option, instruct: confidence only
    assert eval_8b.PROTOCOLS["base"] == dict(chat=False, logits_eos_inf=False, confidence_eos_eot_inf=False)
    assert eval_8b.PROTOCOLS["instruct"] == dict(chat=True, logits_eos_inf=False, confidence_eos_eot_inf=True)
    assert not any("eos" in k for t in eval_8b.TASKS.values() for k in t)
    row = lambda t, v, cfg: dict(value=v, cfg=cfg, metric="acc,none", protocol="base", items=10)
    guided = {"mmlu": row("mmlu", 0.5, 0.0), "arc_challenge": row("arc_challenge", 0.4, 0.5)}
    text = eval_8b.markdown(guided, 2, "ckpt")
    assert "| LLaDA Base with CFG (LLaDA's Tab. 6) | 0.659 | 0.479 |" in text          # matches cfg 0.5
    assert "| paper: LLaDA Base (LLaDA's, without CFG) | 0.659 | 0.459 |" in text
    unguided = {"mmlu": row("mmlu", 0.5, 0.0), "arc_challenge": row("arc_challenge", 0.4, 0.0)}
    assert "with CFG" not in eval_8b.markdown(unguided, 2, "ckpt")


def test_tasks_scored_by_is_greedy_are_refused(tmp_path):
    pytest.importorskip("lm_eval")
    eval_8b = pytest.importorskip("eval_8b")
    TaskManager = pytest.importorskip("lm_eval.tasks").TaskManager
    manager = TaskManager()
    with pytest.raises(ValueError, match="is_greedy"):
        eval_8b.check_output_type(manager, "lambada_openai")
    eval_8b.check_output_type(manager, "arc_challenge")          # multiple choice: fine
    eval_8b.check_output_type(manager, "mmlu")                   # a group of multiple-choice tasks


# ----------------------------------------------------------------------------- issue 24: SFT on real data

def merging_tokenizer():
    """A tokenizer whose merges cross the prompt/answer boundary ("\\n\\n" + "5" is one token), with
    LLaDA's special tokens: encoding prompt and answer together would shift the answer's mask."""
    from tokenizers import AddedToken, Tokenizer, models
    chars = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789+?=. \n"))
    vocab = {c: i for i, c in enumerate(chars)}
    vocab["\n\n"], vocab["\n\n5"] = len(vocab), len(vocab) + 1
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("\n", "\n"), ("\n\n", "5")]))
    tok.add_special_tokens([AddedToken(t, special=True) for t in llada.SPECIALS])
    return tok


def test_the_prompt_answer_boundary_is_exact_with_a_merging_tokenizer():
    tok = merging_tokenizer()
    msgs = conversation("what is 2+3?", "5")
    whole = tok.encode("".join(llada.chat_text(msgs)), add_special_tokens=False).ids
    prompt, answer = llada.chat_ids(tok, msgs)
    assert whole[:len(prompt)] != prompt                 # encoded together, the boundary token merges ...
    assert prompt == tok.encode(llada.chat_text(msgs)[0], add_special_tokens=False).ids
    assert answer == [tok.token_to_id("5"), tok.token_to_id("<|eot_id|>")]      # ... apart, the answer is exact
    ids, masks, _ = sft_8b.encode_rows([{"messages": msgs}], tok, tok.token_to_id("<|endoftext|>"), 48)
    assert ids[0, len(prompt)].item() == tok.token_to_id("5") and not masks[0, :len(prompt)].any() \
        and masks[0, len(prompt):].all()


def test_held_out_rows_are_never_training_rows():
    """Issue 24.7: a dataset's duplicates of a held-out row are dropped from training (3 of 8 were kept)."""
    tok = llada.byte_tokenizer()
    rows = [{"messages": conversation(f"{i % 3}+1?", str(i % 3 + 1))} for i in range(12)]
    ids, masks, _ = sft_8b.encode_rows(rows, tok, 256, 64)
    eval_ids, _, train_ids, _, dropped = sft_8b.split_held_out(ids, masks, 2)
    held = {tuple(r.tolist()) for r in eval_ids}
    assert dropped == 6 and len(train_ids) == 4 and not any(tuple(r.tolist()) in held for r in train_ids)


def test_content_that_is_not_text_is_skipped_or_joined():
    """Issue 24.5: `content: null` is skipped and counted (never "None"); a list of text parts is joined."""
    tok = llada.byte_tokenizer()
    parts = [{"role": "user", "content": [{"type": "text", "text": "1+"}, {"type": "text", "text": "1?"}]},
             {"role": "assistant", "content": "2"}]
    rows = [{"messages": parts}, {"messages": conversation(a=None)}, {"messages": conversation(a=[1, 2])}]
    ids, masks, skipped = sft_8b.encode_rows(rows, tok, 256, 64)
    assert len(ids) == 1 and bytes(t for t in ids[0].tolist() if t < 256).find(b"1+1?") > 0
    assert skipped == {"a message's content is null, not text": (1, 1), "a message's content is list, not text": (2, 1)}


def llada_base_like_tokenizer(last_id=126345):
    """A tokenizer laid out as LLaDA-8B-Base's (ids up to 126345, its BOS/EOS/MASK, no chat markers)."""
    from tokenizers import AddedToken, Tokenizer, models
    specials = {126080: "<|startoftext|>", 126081: "<|endoftext|>", 126336: "<|mdm_mask|>"}
    vocab = {specials.get(i, f"t{i}"): i for i in range(last_id + 1)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.add_special_tokens([AddedToken(t, special=True) for t in specials.values()])
    return tok


def test_chat_markers_get_llada_instructs_ids_or_are_refused():
    """Issue 24.8: LLaDA-8B-Base's tokenizer lacks the chat markers: added with LLaDA-Instruct's ids
    (<|eot_id|> = 126348, the id its sampler uses); any other tokenizer without them is refused."""
    tok = llada_base_like_tokenizer()
    ids = llada.chat_tokens(tok)
    assert ids == {"<|start_header_id|>": 126346, "<|end_header_id|>": 126347, "<|eot_id|>": 126348}
    assert tok.encode("<|eot_id|>", add_special_tokens=False).ids == [126348]
    with pytest.raises(cli.UserError, match="no <|start_header_id|>, <|end_header_id|>, <|eot_id|> token"):
        llada.chat_tokens(llada_base_like_tokenizer(last_id=126400))


def tiny_export(folder, **config_changes):
    m = model_lib.Transformer(model_lib.get_config("tiny", vocab_size=262, mask_id=257, block_size=64))
    llada.save_safetensors(m, str(folder))
    config = {**llada.config_to_json(m.cfg, eos_token_id=256), **config_changes}
    (folder / "config.json").write_text(json.dumps(config))
    llada.byte_tokenizer().save(str(folder / "tokenizer.json"))
    return m


def test_sft_plans_for_the_model_it_loads(tmp_path):
    """Issue 24.6: --dry-run (and --ac auto) plan for --init's model, not the tiny default preset."""
    tiny_export(tmp_path / "export")
    r = run("sft_8b.py", ["--dry-run", "--no-trace", "--init", str(tmp_path / "export"), "--world-size", "1",
                          "--block-size", "64"])
    n = model_lib.Transformer(model_lib.get_config("tiny", vocab_size=262, mask_id=257, block_size=64)).num_params()
    assert f"the --init model: {n:,} parameters" in r.stdout
    r = run("sft_8b.py", ["--dry-run", "--no-trace", "--world-size", "8"])
    assert "8,015,581,184 parameters" in r.stdout                     # LLaDA-8B-Base, the default --init


@pytest.mark.parametrize("case,want", [("n_heads 0", "n_heads is 0; it must be positive"),
                                        ("d_model string", "d_model is '32', not an integer"),
                                        ("n_layers float", "n_layers is 2.0, not an integer"),
                                        ("a list", "holds a JSON list, not an object"),
                                        ("broken", "is not valid JSON (line 1"),
                                        ("int8", "not float32/bfloat16/float16")])
def test_nonsense_checkpoint_configs_are_one_line_naming_the_file(tmp_path, case, want):
    """Issue 25.6: a config.json that is valid JSON but no model's (or not JSON), or int8 weights, is
    one line naming the file, for eval_8b.py --checkpoint and sft_8b.py --init alike."""
    folder = tmp_path / "export"
    tiny_export(folder)
    path = folder / "config.json"
    config = json.loads(path.read_text())
    if case == "n_heads 0":
        path.write_text(json.dumps({**config, "n_heads": 0, "n_kv_heads": 0}))
    elif case == "d_model string":
        path.write_text(json.dumps({**config, "d_model": "32"}))
    elif case == "n_layers float":
        path.write_text(json.dumps({**config, "n_layers": 2.0}))
    elif case == "a list":
        path.write_text(json.dumps([config]))
    elif case == "broken":
        path.write_text('{"n_heads": ')
    else:
        from safetensors.torch import save_file
        for f in folder.glob("*.safetensors"):
            f.unlink()
        save_file({"model.transformer.wte.weight": torch.zeros(262, 32, dtype=torch.int8)}, str(folder / "model.safetensors"))
        (folder / "model.safetensors.index.json").unlink()
    import importlib.util
    scripts = [("sft_8b.py", ["--preset", "tiny", "--init", str(folder), "--data", rows_file(tmp_path / "r.jsonl")])]
    if importlib.util.find_spec("lm_eval"):                   # eval_8b.py needs lm-eval (requirements-eval.txt)
        scripts.append(("eval_8b.py", ["--checkpoint", str(folder), "--tasks", "arc_easy"]))
    for script, args in scripts:
        r = run(script, [*args, "--device", "cpu", "--out-dir", str(tmp_path / script)], check=False)
        assert r.returncode == 1 and r.stderr.startswith("error:") and r.stderr.strip().count("\n") == 0, r.stderr
        assert want in r.stderr and (str(folder) in r.stderr), (script, r.stderr)


def test_the_one_token_likelihood_cache_is_keyed_by_the_guidance():
    """31.3: one process scoring two tasks with different --cfg and a repeated context gave the second the
    first's numbers (-4.6013 at cfg 0.5 where the exact value is -3.9349): each value is exact for its own cfg."""
    torch.manual_seed(0)
    m = model_lib.Transformer(model_lib.get_config("tiny", vocab_size=262, mask_id=257, block_size=16,
                                                   init_std=0.5)).eval()
    lm = harness(m, mc_num=1, cfg=0.5)
    ctx, is_prompt = [10, 20], torch.tensor([[True, True, False]])
    guided = lm.log_likelihood(ctx, [30])
    assert guided == pytest.approx(exact_log_likelihood(lm.model_fn(is_prompt), ctx, [30], 257), abs=1e-5)
    lm.cfg = 0.0                                   # the next task's setting, the same context
    plain = lm.log_likelihood(ctx, [30])
    assert plain == pytest.approx(exact_log_likelihood(lm.model_fn(is_prompt), ctx, [30], 257), abs=1e-5)
    assert abs(plain - guided) > 1e-3
