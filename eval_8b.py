"""
Any LLaDA-format checkpoint on the paper's benchmarks through lm-eval: Table 1 (pre-training,
§5.2.1) and Tables 2-3 (SFT, §5.2.2), with LLaDA's published settings (App. F.6).

    python eval_8b.py --table 1 --checkpoint out/pretrain/export                  # HellaSwag, ARC-Easy
    torchrun --nproc_per_node=8 eval_8b.py --table 2 --checkpoint out/sft/export  # MMLU, MMLU-STEM, ARC-C, GPQA
    torchrun --nproc_per_node=8 eval_8b.py --table 3 --checkpoint out/sft/export  # GSM8K, MATH (512 / 512)
    python eval_8b.py --checkpoint EXPORT --tasks arc_challenge --data-dir ../shared/data/evals --limit 20 --device cpu
    python eval_8b.py --benchmark --preset tiny --device cpu                       # tokens/s of generate

The model is an lm-eval `LM` ("masked_diffusion"): `loglikelihood` is masking's full-range
bound on the answer with the context unmasked (the answer's masked counts stratified,
--mc-num draws, optional classifier-free guidance), `generate_until` is model.generate
(low-confidence remasking, temperature 0). Under torchrun each rank holds the whole
model and scores its shard of the requests (lm-eval's data parallelism). lm-eval is an
optional dependency: pip install -r requirements-eval.txt.
"""
import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

import masking
import model as model_lib
from machinery import cli, distributed, files, llada
from machinery.cli import UserError
from machinery.run import Partial, Run, done_line, prepare_out_dir

try:                 # lm-eval is optional (requirements-eval.txt): without it only --benchmark runs
    from lm_eval.api.model import LM
except ImportError:
    LM = None

SCRIPT = "eval_8b.py"
GATED = {"gpqa": "Idavidrein/gpqa"}        # Hub datasets behind terms of use: accept them, then log in
LM_EVAL_SEED = 1234      # lm-eval's own default seeds (few-shot sampling, its RNGs): LLaDA's runs use them
RANK_WAIT = timedelta(days=2)     # how long a rank waits for the others between request types (MATH: ~5.6 h a rank)
# LLaDA's published lm-eval settings (its eval_llada.sh): few-shot count (None: the task's own),
# Monte Carlo draws, classifier-free guidance; generation as §F.6 fixes it (512 tokens in 512 steps).
# `metric` is what the tables report. The EOS options of generation are the protocol's (below).
# LLaDA's script has no line for arc_easy or mmlu_stem: theirs are extrapolated from arc_challenge's
# and mmlu's (the same task family), not LLaDA's published settings.
TASKS = {
    "hellaswag": dict(lm_eval="hellaswag", fewshot=0, mc_num=128, cfg=0.5, metric="acc_norm,none"),
    "arc_easy": dict(lm_eval="arc_easy", fewshot=0, mc_num=128, cfg=0.5, metric="acc_norm,none"),
    "arc_challenge": dict(lm_eval="arc_challenge", fewshot=0, mc_num=128, cfg=0.5, metric="acc_norm,none"),
    "mmlu": dict(lm_eval="mmlu", fewshot=5, mc_num=1, cfg=0.0, metric="acc,none"),
    "mmlu_stem": dict(lm_eval="mmlu_stem", fewshot=5, mc_num=1, cfg=0.0, metric="acc,none"),
    "gpqa": dict(lm_eval="gpqa_main_n_shot", fewshot=5, mc_num=128, cfg=0.5, metric="acc,none"),
    "gsm8k": dict(lm_eval="gsm8k", fewshot=None, cfg=0.0, metric="exact_match,flexible-extract"),
    "math": dict(lm_eval="minerva_math", fewshot=None, cfg=0.0, metric="exact_match,none"),
}
# LLaDA's two protocols. Base (its lm-eval scripts for LLaDA-8B-Base): lm-eval's prompts and few-shot
# examples as plain text, no EOS option. Instruct (its OpenCompass configs for LLaDA-8B-Instruct):
# the chat template, few-shot examples as earlier turns of the chat, and confidence_eos_eot_inf. No
# LLaDA setting uses logits_eos_inf for GSM8K or MATH. Default base: Tables 2-3 print LLaDA-8B-Base's
# Base-protocol numbers (65.9 MMLU, 70.3 GSM8K, 31.4 MATH) as the row the SFT models are compared with.
PROTOCOLS = {"base": dict(chat=False, logits_eos_inf=False, confidence_eos_eot_inf=False),
             "instruct": dict(chat=True, logits_eos_inf=False, confidence_eos_eot_inf=True)}
TABLES = {1: ["hellaswag", "arc_easy"], 2: ["mmlu", "mmlu_stem", "arc_challenge", "gpqa"], 3: ["gsm8k", "math"]}
PAPER = {   # the paper's numbers, beside ours in results.md (not results of this repository)
    1: {"PT U[0, 1]": dict(hellaswag=0.354, arc_easy=0.342), "PT U[0.45, 0.55]": dict(hellaswag=0.400, arc_easy=0.430)},
    2: {"LLaDA Base (LLaDA's, without CFG)": dict(mmlu=0.659, mmlu_stem=0.629, arc_challenge=0.459, gpqa=0.252),
        "SFT U[0, 1]": dict(mmlu=0.659, mmlu_stem=0.621, arc_challenge=0.468, gpqa=0.344),
        "SFT U[0.45, 0.55]": dict(mmlu=0.669, mmlu_stem=0.635, arc_challenge=0.480, gpqa=0.402)},
    3: {"Base": dict(gsm8k=0.703, math=0.314), "SFT [0.45, 0.55]": dict(gsm8k=0.738, math=0.342),
        "SFT [0, 1]": dict(gsm8k=0.768, math=0.341), "SFT [0.2, 1]": dict(gsm8k=0.762, math=0.358),
        "SFT [0.3, 1]": dict(gsm8k=0.774, math=0.360), "SFT [0.5, 1]": dict(gsm8k=0.785, math=0.375)},
}
# The paper's "LLaDA Base" row of Table 2 is LLaDA's main table, without guidance; we score ARC-C and
# GPQA with cfg 0.5 as LLaDA's script does, so results.md also prints LLaDA's guided row (its Tab. 6,
# the best scale of 0.5-2). MMLU runs without guidance (one draw), so both rows agree there.
LLADA_CFG = {"LLaDA Base with CFG (LLaDA's Tab. 6)": dict(mmlu=0.659, arc_challenge=0.479, gpqa=0.261)}


# ----------------------------------------------------------------------------- the lm-eval model

def require_lm_eval():
    if LM is None:
        raise UserError("eval_8b.py needs lm-eval: pip install -r requirements-eval.txt")


class MaskedDiffusionLM(LM or object):
    """A masked-diffusion model as lm-eval sees it (LLaDA's eval_llada.py, on masking's bound).

    Under torchrun each rank scores its shard of the requests, for hours (MATH ~5.6 h a rank on 8
    GPUs), and lm-eval meets the ranks between request types (barrier, gathers). Those meetings go
    over a gloo group of their own that waits RANK_WAIT, not the launcher's --dist-timeout; and each
    is preceded by the ranks' status, so that a rank that failed anywhere (agreed() below, or
    main's evaluation) is met by every other rank: all stop with its one line, none is left waiting."""

    def __init__(self, model, tok, ids, device, mc_num=128, mc_batch=32, cfg=0.0, gen_length=512, steps=512,
                 block_length=512, batch_size=8, logits_eos_inf=False, confidence_eos_eot_inf=False,
                 chat=False, seed=LM_EVAL_SEED, checkpoint="the model"):
        super().__init__()
        self.model, self.tok, self.ids, self._device = model, tok, ids, device
        self.mc_num, self.mc_batch, self.cfg, self.seed, self.checkpoint = mc_num, mc_batch, cfg, seed, checkpoint
        self.gen = dict(gen_length=gen_length, steps=steps, block_length=block_length,
                        logits_eos_inf=logits_eos_inf, confidence_eos_eot_inf=confidence_eos_eot_inf)
        self.batch_size, self.chat, self.truncated, self.cache = batch_size, chat, 0, {}
        self.eot = tok.token_to_id("<|eot_id|>")
        ready = dist.is_available() and dist.is_initialized()
        self._rank, self._world_size = (dist.get_rank(), dist.get_world_size()) if ready else (0, 1)
        self.group = dist.new_group(backend="gloo", timeout=RANK_WAIT) if self._world_size > 1 else None

    # -- every rank agrees

    def agreed(self, fn, *args):
        """fn(*args) on this rank, then the ranks' status: a failure on any rank stops all of them."""
        if self._world_size == 1:
            return fn(*args)
        out, failure = None, None
        try:
            out = fn(*args)
        except Exception as e:
            failure = distributed.failure_of(e)
        distributed.agree(failure, group=self.group)
        return out

    def fail(self, e):
        """A failure in lm-eval's own code on this rank, met by the others at their next status (one
        agreed already, in agreed(), is every rank's already)."""
        if self._world_size > 1 and not getattr(e, "reported", False):
            distributed.agree(distributed.failure_of(e), group=self.group)

    # -- loglikelihood

    def encode_pair(self, context, continuation):
        """Trailing spaces of the context move to the continuation; the continuation's ids are
        what encoding both adds to the context's (lm-eval's and LLaDA's convention)."""
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        ctx = self.tok.encode(context, add_special_tokens=False).ids if context else []
        whole = self.tok.encode(context + continuation, add_special_tokens=False).ids
        return ctx, whole[len(ctx):]

    def model_fn(self, is_prompt):
        """Logits at the masked positions of xt; with --cfg, guided against the prompt masked too."""
        def fn(xt):
            masked = xt == self.model.cfg.mask_id
            if self.cfg == 0:
                return self.model(xt, output_mask=masked)
            unconditional = xt.masked_fill(is_prompt, self.model.cfg.mask_id)
            cond, uncond = self.model(torch.cat([xt, unconditional]),
                                      output_mask=torch.cat([masked, masked])).chunk(2)
            return uncond + (self.cfg + 1) * (cond - uncond)
        return fn

    @torch.no_grad()
    def log_likelihood(self, context_ids, answer_ids):
        """log p(answer | context) ~ -|answer| x the mean of masking's per-draw bound (each draw masks
        l of the answer's tokens, l stratified over 1..|answer|, and averages their CE): LLaDA's
        Monte Carlo estimator. One draw for a one-token answer, where it is exact."""
        if len(answer_ids) == 1:
            return self.one_token_log_probs(context_ids)[answer_ids[0]].item()
        x0 = torch.tensor(context_ids + answer_ids, device=self.device)[None]
        answer = torch.zeros_like(x0, dtype=torch.bool)
        answer[0, len(context_ids):] = True
        key = hashlib.sha1(json.dumps([context_ids, answer_ids]).encode()).digest()
        g = torch.Generator(self.device).manual_seed(self.seed + int.from_bytes(key[:6], "little"))
        total = 0.0
        for start in range(0, self.mc_num, self.mc_batch):
            n = min(self.mc_batch, self.mc_num - start)
            _, nll = masking.elbo_terms(self.model_fn(~answer.expand(n, -1)), x0, self.model.cfg.mask_id,
                                        n_t=n, maskable=answer, generator=g)
            total += nll.double().sum().item()
        return self.finite(-len(answer_ids) * total / self.mc_num)

    def one_token_log_probs(self, context_ids):
        """log p(token | context) for every token at once: a one-token answer's only mask is the
        position after the context whatever the answer is, so one forward scores every choice
        (MMLU's A/B/C/D: one forward a question instead of four). Cached per context."""
        key = (tuple(context_ids), self.cfg)        # the guidance changes every number: part of the key
        if key not in self.cache:
            xt = torch.tensor(context_ids + [self.model.cfg.mask_id], device=self.device)[None]
            is_prompt = torch.zeros_like(xt, dtype=torch.bool)
            is_prompt[0, :-1] = True
            logits = self.model_fn(is_prompt)(xt)[0].double()
            if not torch.isfinite(logits).all():
                self.finite(math.nan)
            self.cache = {key: torch.log_softmax(logits, -1).cpu()}       # requests come grouped by context
        return self.cache[key]

    def finite(self, value):
        if not math.isfinite(value):
            raise UserError(f"{self.checkpoint} gives a non-finite log-likelihood ({value}): its weights hold "
                                   f"NaN or inf, or overflow in {self.model.transformer.wte.weight.dtype}; nothing "
                                   f"is scored from it")
        return value

    def loglikelihood(self, requests):
        return self.agreed(self._loglikelihood, requests)

    def _loglikelihood(self, requests):
        out, block = [], self.model.cfg.block_size
        for req in requests:
            ctx, ans = self.encode_pair(*req.args)
            if len(ans) >= block:
                raise UserError(f"an answer of {len(ans)} tokens does not fit the model's block of {block}")
            if len(ctx) + len(ans) > block:                     # keep the context's end, and count it
                ctx, self.truncated = ctx[len(ctx) + len(ans) - block:], self.truncated + 1
            out.append((self.log_likelihood(ctx, ans), False))  # greedy check: LLaDA's default skips it
        return out

    def loglikelihood_rolling(self, requests):
        return self.agreed(self._refuse_rolling)

    def _refuse_rolling(self):
        raise UserError("perplexity tasks (loglikelihood_rolling) are not among the paper's; eval_8b.py does "
                               "not score them")

    # -- generation

    def prompt_ids(self, context):
        return self.tok.encode(context, add_special_tokens=False).ids

    def generate_until(self, requests):
        return self.agreed(self._generate_until, requests)

    @torch.no_grad()
    def _generate_until(self, requests):
        """Prompts in batches of batch_size (sorted by length, left-padded, with an attention mask),
        each answer cut at EOS / end-of-turn and then at the task's first stop sequence."""
        prompts = [self.prompt_ids(req.args[0]) for req in requests]
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        out = [None] * len(requests)
        room = self.model.cfg.block_size - self.gen["gen_length"]
        if room <= 0:
            raise UserError(f"--gen-length {self.gen['gen_length']} leaves no room for a prompt in the "
                                   f"model's block of {self.model.cfg.block_size} tokens")
        self.truncated += sum(len(p) > room for p in prompts)
        for b in range(0, len(order), self.batch_size):
            idx = order[b:b + self.batch_size]
            rows = [prompts[i][-room:] for i in idx]
            width = max(len(r) for r in rows)
            x = torch.full((len(rows), width), self.ids["eos"], dtype=torch.long)
            attention = torch.zeros((len(rows), width), dtype=torch.long)
            for j, r in enumerate(rows):
                x[j, width - len(r):] = torch.tensor(r)
                attention[j, width - len(r):] = 1
            y = model_lib.generate(self.model, x.to(self.device), mask_id=self.model.cfg.mask_id,
                                   attention_mask=attention.to(self.device), cfg_scale=self.cfg,
                                   eos_id=self.ids["eos"], eot_id=self.eot, **self.gen)[:, width:]
            for j, i in enumerate(idx):
                out[i] = self.cut(y[j].tolist(), requests[i].args[1].get("until") or [])
        return out

    def cut(self, ids, until):
        """The answer as LLaDA's harness makes it: the whole generation decoded with its special
        tokens, cut at the task's first stop sequence, then the special tokens stripped (EOS
        padding and end-of-turn go; text the model wrote after them stays)."""
        text = self.tok.decode(ids, skip_special_tokens=False)
        for s in [until] if isinstance(until, str) else until:
            if s and s in text:
                text = text.split(s)[0]
        return self.tok.decode(self.tok.encode(text, add_special_tokens=False).ids, skip_special_tokens=True)

    def apply_chat_template(self, chat_history, add_generation_prompt=True):
        """LLaDA's chat template (its tokenizer_config.json), as text."""
        return llada.chat_template(chat_history, add_generation_prompt)

    @property
    def tokenizer_name(self):
        return "llada"

    # -- data parallelism (lm-eval calls these when world_size > 1): status first, then the collective

    def all_gather(self, tensor):
        distributed.agree(None, group=self.group)
        cpu = tensor.detach().cpu()
        parts = [torch.zeros_like(cpu) for _ in range(self.world_size)]
        dist.all_gather(parts, cpu, group=self.group)
        return (torch.stack(parts) if cpu.dim() == 0 else torch.cat(parts)).to(tensor.device)

    def gather_object(self, obj, dst=0):
        distributed.agree(None, group=self.group)
        parts = [None] * self.world_size if self.rank == dst else None
        dist.gather_object(obj, parts, dst=dst, group=self.group)
        return parts

    def barrier(self):
        distributed.agree(None, group=self.group)
        dist.barrier(group=self.group)


def load_model(checkpoint, device, dtype):
    """A LLaDA-format folder (or Hub id) as a plain (unsharded) model on `device`, with its tokenizer:
    its config.json checked field by field, its weights floating point and finite, its MASK id no
    real token; each a one-line error naming the file."""
    with cli.user_input():
        folder = llada.checkpoint_folder(checkpoint, "--checkpoint")
    mc = llada.read_model_config(folder, "--checkpoint")
    with torch.device("meta"):
        m = model_lib.Transformer(mc)
    with cli.user_input():
        llada.load_safetensors(m, folder)
    tok = llada.load_tokenizer(folder)
    ids = llada.token_ids(tok, mc)
    try:
        masking.check_mask_id(mc.mask_id, ids["vocab"], mc.vocab_size, ids["special"])
    except ValueError as e:
        raise UserError(f"{os.path.join(folder, 'config.json')}: mask_token_id: {e}") from None
    m = m.to(device=device, dtype=dtype).eval()
    bad = next((name for name, p in m.named_parameters() if not torch.isfinite(p).all()), None)
    if bad:
        raise UserError(f"--checkpoint {checkpoint}: {bad} holds NaN or inf; nothing is scored from it")
    return m, tok, ids


# ----------------------------------------------------------------------------- tasks over local files

LOCAL_NAMES = dict(arc_easy="arc_easy_local", arc_challenge="arc_challenge_local", hellaswag="hellaswag_local",
                   gsm8k="gsm8k_local", math="minerva_math_local", gpqa="gpqa_main_n_shot_local", mmlu="mmlu_local",
                   mmlu_stem="mmlu_stem_local")


def local_task_names():
    return dict(LOCAL_NAMES)


def local_tasks(data_dir, folder):
    """lm-eval task definitions over the local copies in `data_dir` (the layout of shared/data/evals),
    written as YAML into `folder` (OUT_DIR/tasks) for lm-eval's include_path. Each includes lm-eval's
    own task (its prompt, few-shot sampler and scoring) and overrides only where the data come from.
    Returns {our task name: a function writing its YAML}; LOCAL_NAMES are the tasks' lm-eval names."""
    import yaml
    from lm_eval import tasks as lm_tasks
    builtin = os.path.dirname(lm_tasks.__file__)
    os.makedirs(folder, exist_ok=True)

    def need(*parts):
        path = os.path.join(data_dir, *parts)
        if not os.path.exists(path):
            raise UserError(f"--data-dir {data_dir} lacks {os.path.join(*parts)}")
        check_task_file(path)
        return os.path.abspath(path)

    def write(name, config):          # rewritten only when it changed: a refused command writes nothing
        path, text = os.path.join(folder, name + ".yaml"), yaml.safe_dump(config, sort_keys=False)
        if not (os.path.exists(path) and open(path).read() == text):
            files.write_text(path, text)

    local = lambda path, split="test": dict(dataset_path="json", dataset_name=None,
                                           dataset_kwargs=dict(data_files={split: path}))
    makers = {
        "arc_easy": lambda: write("arc_easy_local", dict(
            include=os.path.join(builtin, "arc", "arc_easy.yaml"), task="arc_easy_local", tag=[],
            training_split=None, validation_split=None, **local(need("arc_easy", "ARC-Easy-test.jsonl")))),
        "arc_challenge": lambda: write("arc_challenge_local", dict(
            include=os.path.join(builtin, "arc", "arc_easy.yaml"), task="arc_challenge_local", tag=[],
            training_split=None, validation_split=None, **local(need("arc_challenge", "ARC-Challenge-test.jsonl")))),
        # the local copy is already preprocessed as lm-eval's process_docs would (query, endings, label)
        "hellaswag": lambda: write("hellaswag_local", dict(
            include=os.path.join(builtin, "hellaswag", "hellaswag.yaml"), task="hellaswag_local", tag=[],
            process_docs=None, training_split=None, doc_to_choice="{{endings}}",
            **local(need("hellaswag", "hellaswag_val_first1000.jsonl"), "validation"))),
        "gsm8k": lambda: write("gsm8k_local", dict(
            include=os.path.join(builtin, "gsm8k", "gsm8k.yaml"), task="gsm8k_local", tag=[], dataset_path="json",
            dataset_name=None, dataset_kwargs=dict(data_files=dict(train=need("gsm8k", "train.jsonl"),
                                                                   test=need("gsm8k", "test.jsonl"))))),
        # all 5,000 problems in one task: the same mean as minerva_math's size-weighted group
        "math": lambda: write("minerva_math_local", dict(
            include=os.path.join(builtin, "minerva_math", "minerva_math_algebra.yaml"), task="minerva_math_local",
            tag=[], training_split=None, **local(need("math", "MATH-test.jsonl")))),
        "gpqa": lambda: write("gpqa_main_n_shot_local", dict(
            include=os.path.join(builtin, "gpqa", "n_shot", "gpqa_main_n_shot.yaml"), task="gpqa_main_n_shot_local",
            tag=[], dataset_path="csv", dataset_name=None,
            dataset_kwargs=dict(data_files=dict(train=need("gpqa", "gpqa_main.csv"))))),
        "mmlu": lambda: mmlu_tasks(builtin, need("mmlu", "test"), need("mmlu", "dev"), write),
    }
    makers["mmlu_stem"] = makers["mmlu"]
    return makers, LOCAL_NAMES


def check_task_file(path):
    """A local task file that is empty or cut short is one line here, not a score from fewer items
    (or a traceback inside lm-eval): every jsonl line parses, every csv row has its header's width,
    every ARC item has choices and an answerKey among their labels."""
    import csv
    import io
    if os.path.isdir(path):
        return
    try:
        with open(path, encoding="utf-8", newline="") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start})") from None
    if path.endswith(".jsonl"):
        lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
        for n, line in lines:
            try:
                item = json.loads(line)
            except ValueError:
                raise UserError(f"{path}: line {n} is not JSON (truncated?)") from None
            if isinstance(item, dict) and "answerKey" in item:
                check_arc_item(item, path, n)
    else:
        rows = list(csv.reader(io.StringIO(text, newline="")))     # quoted fields may hold newlines
        lines = rows[1:]                                # after the header
        bad = next((n for n, r in enumerate(rows, 1) if len(r) != len(rows[0])), None)
        if bad:
            raise UserError(f"{path}: row {bad} has {len(rows[bad - 1])} fields, the first {len(rows[0])} "
                                   f"(truncated?)")
    if not lines:
        raise UserError(f"{path} holds no items")


def check_arc_item(item, path, n):
    """An ARC question (allenai/ai2_arc's schema) that lm-eval could score: choices with text and labels
    of one length, and its answerKey among the labels (else lm-eval's doc_to_target fails, or worse)."""
    choices = item.get("choices")
    texts, labels = (choices.get("text"), choices.get("label")) if isinstance(choices, dict) else (None, None)
    if not (isinstance(texts, list) and isinstance(labels, list) and texts and len(texts) == len(labels)):
        raise UserError(f"{path}: line {n} ({item.get('id', '?')}) has no choices (text and label lists of "
                               f"one length)")
    if item["answerKey"] not in labels:
        raise UserError(f"{path}: line {n} ({item.get('id', '?')}) has answerKey {item['answerKey']!r}, not "
                               f"among its labels {labels}")


def mmlu_tasks(builtin, test_dir, dev_dir, write):
    """MMLU's 57 subjects over test/<subject>_test.csv and dev/<subject>_dev.csv (columns question,
    choice0..3, answer as 0-3), grouped as lm-eval groups them (mmlu_local, mmlu_stem_local, ...)."""
    import yaml
    default = os.path.join(builtin, "mmlu", "default")
    groups = {}
    for name in sorted(os.listdir(default)):
        if not (name.startswith("mmlu_") and name.endswith(".yaml")):
            continue
        with open(os.path.join(default, name)) as f:
            sub = yaml.safe_load(f)
        subject = sub["dataset_name"]
        tag = sub["tag"].replace("_tasks", "_local_tasks")
        groups.setdefault(tag, [])
        test, dev = os.path.join(test_dir, f"{subject}_test.csv"), os.path.join(dev_dir, f"{subject}_dev.csv")
        for path in (test, dev):
            if not os.path.exists(path):
                raise UserError(f"--data-dir lacks mmlu/{os.path.basename(os.path.dirname(path))}/"
                                        f"{os.path.basename(path)}")
            check_task_file(path)
        write(f"mmlu_{subject}_local", dict(
            include=os.path.join(default, name), task=f"mmlu_{subject}_local", tag=tag, dataset_path="csv",
            dataset_name=None, dataset_kwargs=dict(data_files=dict(test=test, dev=dev)),
            doc_to_text="{{question.strip()}}\nA. {{choice0}}\nB. {{choice1}}\nC. {{choice2}}\nD. {{choice3}}\n"
                        "Answer:"))
    for tag in groups:
        category = tag.removesuffix("_local_tasks")                 # mmlu_stem, mmlu_humanities, ...
        write(category + "_local", dict(group=category + "_local", task=[tag],
                                        aggregate_metric_list=[dict(metric="acc", weight_by_size=True)]))
    write("mmlu_local", dict(group="mmlu_local", task=[t.removesuffix("_tasks") for t in sorted(groups)],
                             aggregate_metric_list=[dict(metric="acc", weight_by_size=True)]))


# ----------------------------------------------------------------------------- running and reporting

def check_output_type(manager, name):
    """A task lm-eval scores by `loglikelihood` alone (LAMBADA's acc) needs is_greedy, which this
    model does not compute (LLaDA's default skips it too): refused, rather than scored 0."""
    entry = manager.task_index.get(name)
    if entry is None or entry.kind.name != "TASK":
        return                     # a group: its tasks are ours, multiple-choice
    kind = entry.cfg.get("output_type")        # the task's YAML, its includes resolved
    if kind in ("loglikelihood", "loglikelihood_rolling"):
        raise UserError(f"task {name} is scored from {kind} requests (is_greedy / perplexity), which "
                               f"eval_8b.py does not compute")


def task_names(tasks, a):
    """{our task: lm-eval's name}: the Hub task's, or the local one's over --data-dir."""
    local = local_task_names()
    return {t: local[t] if a.data_dir else TASKS[t]["lm_eval"] for t in tasks}


def task_manager(tasks, a, run):
    """lm-eval's TaskManager: the Hub tasks, or local ones over --data-dir (their YAMLs written into
    OUT_DIR/tasks by rank 0 alone; the other ranks read them after the agreement)."""
    from lm_eval.tasks import TaskManager
    if not a.data_dir:
        return TaskManager()
    folder = run.path("tasks")
    with run.together():
        if run.master:
            makers, _ = local_tasks(a.data_dir, folder)
            for t in tasks:
                makers[t]()
    return TaskManager(include_path=folder)


def load_task_data(manager, tasks, names, world, limit):
    """Every task's data loaded (downloaded, when from the Hub) before anything is scored, so that a
    gated or missing dataset is one line before hours of work, not after them; and every task holds
    an item for every rank (lm-eval gives a rank without items no requests, and then fails)."""
    for t in tasks:
        check_output_type(manager, names[t])
        try:
            loaded = manager.load([names[t]])
        except Exception as e:
            text = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            if "gated" in text.lower() or t in GATED and ("401" in text or "auth" in text.lower()):
                raise UserError(f"{t}: its dataset {GATED.get(t, '')} is gated on the Hub: accept its terms on "
                                       f"huggingface.co, then `huggingface-cli login` (or set HF_TOKEN)") from None
            raise UserError(f"{t}: lm-eval could not load its data ({type(e).__name__}: {text}); offline, "
                                   f"pass --data-dir with local copies") from None
        for name, task in loaded["tasks"].items():
            n = len(task.eval_docs) if limit is None else min(limit, len(task.eval_docs))
            if n < world:
                raise UserError(f"{t}: {name} has {n} items to score on {world} ranks; every rank needs one "
                                       f"(a larger --limit, or fewer processes)")


def task_settings(t, a, names, ckpt):
    """What a task's score depends on: --resume reuses a result only when all of it is the same."""
    s, protocol = TASKS[t], PROTOCOLS[a.protocol]
    return dict(checkpoint=ckpt, lm_eval_task=names[t], protocol=a.protocol,
                num_fewshot=s["fewshot"] if a.num_fewshot is None else a.num_fewshot,
                cfg=s["cfg"] if a.cfg is None else a.cfg, mc_num=s.get("mc_num", 128) if a.mc_num is None else a.mc_num,
                mc_batch=a.mc_batch, limit=a.limit, seed=a.seed, gen_length=a.gen_length, steps=a.steps,
                block_length=a.block_length, data_dir=os.path.abspath(a.data_dir) if a.data_dir else None,
                **{f: protocol[f] if getattr(a, f) is None else getattr(a, f)
                   for f in ("logits_eos_inf", "confidence_eos_eot_inf")})


def score_task(lm, manager, t, name, settings):
    """One task through lm_eval.simple_evaluate with its settings. Returns (result, lm-eval's raw
    output) on rank 0, (None, None) elsewhere."""
    import lm_eval
    lm.cfg, lm.mc_num, lm.chat = settings["cfg"], settings["mc_num"], PROTOCOLS[settings["protocol"]]["chat"]
    for flag in ("logits_eos_inf", "confidence_eos_eot_inf"):
        lm.gen[flag] = settings[flag]
    start, lm.truncated = time.time(), 0
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=[name], num_fewshot=settings["num_fewshot"],
                                      limit=settings["limit"], task_manager=manager, log_samples=False,
                                      apply_chat_template=lm.chat, fewshot_as_multiturn=lm.chat,
                                      random_seed=LM_EVAL_SEED, numpy_random_seed=LM_EVAL_SEED,
                                      torch_random_seed=LM_EVAL_SEED, fewshot_random_seed=LM_EVAL_SEED)
        result = raw = None
        if out is not None:            # rank 0: lm-eval's output, made a result (nothing scored: an error)
            raw = json.loads(json.dumps(dict(results=out["results"], configs=out.get("configs"),
                                             versions=out.get("versions"), n_samples=out.get("n-samples"),
                                             group_subtasks=out.get("group_subtasks")), default=str))
            result = make_result(t, name, raw, settings, round(time.time() - start, 1), lm.truncated)
    except Exception as e:             # on this rank (inside lm-eval, or after it): the others must hear of it
        if isinstance(e, ValueError) and "larger than population" in str(e):       # random.sample's words
            error = UserError(f"{t}: --num-fewshot {settings['num_fewshot']} is more examples than the task has "
                              f"to draw few-shot examples from")
            lm.fail(error)
            raise error from None
        lm.fail(e)
        raise
    distributed.agree(None, group=lm.group)      # ... or this rank of theirs
    return result, raw


def items_scored(raw, name):
    """How many items lm-eval scored for a task or a group (its leaf tasks summed)."""
    subtasks = (raw.get("group_subtasks") or {}).get(name)
    if subtasks:
        return sum(items_scored(raw, s) for s in subtasks)
    return ((raw.get("n_samples") or {}).get(name) or {}).get("effective", 0)


def make_result(t, name, raw, settings, seconds, truncated):
    metric = TASKS[t]["metric"]
    metrics = raw["results"].get(name, {})
    items = items_scored(raw, name)
    if not items or metrics.get(metric) is None:
        raise UserError(f"{t}: lm-eval scored {items} items for {metric}; nothing written")
    return dict(settings, metric=metric, value=metrics[metric], items=items, seconds=seconds,
                contexts_cut_to_fit=truncated, metrics={k: v for k, v in metrics.items() if isinstance(v, (int, float))})


def derived_stem(results, raws, settings, names):
    """MMLU-STEM from the MMLU run's own STEM group (the same items, the same settings): its subjects
    are not scored twice."""
    mmlu = results.get("mmlu")
    same = mmlu is not None and {k: v for k, v in mmlu.items() if k in settings and k != "lm_eval_task"} == \
        {k: v for k, v in settings.items() if k != "lm_eval_task"}
    if not same or names["mmlu_stem"] not in raws["mmlu"]["results"]:
        return None
    return dict(make_result("mmlu_stem", names["mmlu_stem"], raws["mmlu"], settings, 0.0, 0),
                derived_from="mmlu")


def result_path(out_dir, t):
    return os.path.join(out_dir, "results", f"{t}.json")


def earlier_result(out_dir, t, settings):
    """A task scored by an earlier (interrupted) evaluation into this --out-dir: its result when
    scored with these very settings and checkpoint, else None; other settings are refused."""
    path = result_path(out_dir, t)
    if not os.path.exists(path):
        return None
    saved = files.read_json(path, "an earlier result")
    if saved.get("settings") != settings:
        differ = sorted(k for k in settings if saved.get("settings", {}).get(k) != settings[k])
        raise UserError(f"--resume: {path} was scored with other settings or weights ({', '.join(differ)}); "
                               f"choose another --out-dir")
    return saved


def evaluate(lm, tasks, a, run):
    """Each task in turn; a task's result (and lm-eval's raw output) is written as soon as it is
    scored, whole (write, then rename), so hours of scoring survive a later failure; with --resume,
    tasks already scored with the same settings and checkpoint are not scored again. Returns
    ({task: result}, {task: raw}) on rank 0."""
    names = task_names(tasks, a)
    manager = task_manager(tasks, a, run)
    with run.together():
        load_task_data(manager, tasks, names, lm.world_size, a.limit)
    if a.resume:       # a task scored earlier with other settings or weights: refused before anything is scored
        run.rank0(lambda: [earlier_result(run.out_dir, t, task_settings(t, a, names, run.inputs["checkpoint"]))
                           for t in tasks])
    results, raws = {}, {}
    for t in tasks:
        settings = task_settings(t, a, names, run.inputs["checkpoint"])

        def kept():              # rank 0: scored earlier into this folder, or MMLU-STEM from MMLU's own run
            saved = earlier_result(run.out_dir, t, settings) if a.resume else None
            if saved is None and t == "mmlu_stem":
                derived = derived_stem(results, raws, settings, names)
                saved = derived and dict(settings=settings, result=derived, raw=raws["mmlu"])
            return saved
        saved = run.rank0(kept)
        if saved is not None:
            result, raw = saved["result"], saved["raw"]
            print_result(t, result, "derived from mmlu" if result.get("derived_from") else "scored earlier")
        else:
            result, raw = score_task(lm, manager, t, names[t], settings)
            if dist.get_rank() == 0:
                print_result(t, result, None)
        run.write_json(os.path.join("results", f"{t}.json"), dict(settings=settings, result=result, raw=raw))
        results[t], raws[t] = result, raw
    return results, raws


def print_result(t, r, note):
    if dist.get_rank() != 0:
        return
    cut = f"; {r['contexts_cut_to_fit']} contexts cut to fit the model's block" if r["contexts_cut_to_fit"] else ""
    print(f"{t}: {r['metric']} = {r['value']:.4f} over {r['items']} items" + (f" ({note})" if note else "") + cut,
          flush=True)


def markdown(results, table, checkpoint):
    """results.md: our numbers beside the paper's rows of the table (paper numbers are the paper's)."""
    tasks = list(results)
    rows = {f"paper: {label}": values for label, values in PAPER.get(table, {}).items()}
    if table == 2 and any(results[t]["cfg"] > 0 for t in tasks):     # the guided row beside guided scores
        rows.update(LLADA_CFG)
    protocol = results[tasks[0]]["protocol"] if tasks else "base"
    lines = [f"Checkpoint `{checkpoint}`, LLaDA's {protocol} protocol; items scored: "
             + ", ".join(f"{t} {results[t]['items']:,}" for t in tasks) + ".", "",
             "| | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|",
             "| **ours** | " + " | ".join(f"{results[t]['value']:.3f}" if results[t]["value"] is not None else "—"
                                         for t in tasks) + " |"]
    for label, values in rows.items():
        lines.append(f"| {label} | " + " | ".join(f"{values[t]:.3f}" if t in values else "—" for t in tasks)
                     + " |")
    lines += ["", "Metrics: " + ", ".join(f"{t} {results[t]['metric']}" for t in tasks) + "."]
    return "\n".join(lines) + "\n"


def benchmark(a, device):
    """Tokens/s of model.generate at --gen-length / --steps, batch 1 and batch --batch-size, on a
    randomly initialised model of --preset (the 8B architecture on a GPU)."""
    mc = model_lib.get_config(a.preset)
    if not a.preset.startswith("llada"):
        mc = model_lib.get_config(a.preset, vocab_size=256 + len(llada.SPECIALS), mask_id=257,
                                  block_size=a.prompt_length + a.gen_length)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    with torch.device(device):
        m = model_lib.Transformer(mc).to(dtype).eval()
    out = {}
    for batch in sorted({1, a.batch_size}):
        prompt = torch.randint(0, 256, (batch, a.prompt_length), device=device)
        kw = dict(mask_id=mc.mask_id, gen_length=a.gen_length, steps=a.steps, block_length=a.block_length)
        model_lib.generate(m, prompt, **{**kw, "gen_length": a.block_length, "steps": 1})      # warm-up
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.time()
        model_lib.generate(m, prompt, **kw)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.time() - start
        out[batch] = dict(seconds=seconds, tokens_per_sec=batch * a.gen_length / seconds)
        print(f"{a.preset} on {device}: batch {batch}, prompt {a.prompt_length}, {a.gen_length} tokens in {a.steps} "
              f"steps (block {a.block_length}): {seconds:.2f}s, {batch * a.gen_length / seconds:,.1f} tokens/s",
              flush=True)
    return out


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + " See README 'Evaluation'.")
    p.add_argument("--checkpoint", default=llada.LLADA, help="LLaDA-format folder or Hub id (%(default)s)")
    p.add_argument("--table", type=int, choices=sorted(TABLES), default=None,
                   help="the tasks of the paper's Table 1, 2 or 3 (else --tasks)")
    p.add_argument("--tasks", default=None, help=f"comma-separated, from {', '.join(TASKS)}")
    p.add_argument("--data-dir", default=None, help="local task data in the layout of shared/data/evals (no download)")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N items of each task")
    p.add_argument("--num-fewshot", type=int, default=None, help="override LLaDA's few-shot count")
    p.add_argument("--mc-num", type=int, default=None, help="Monte Carlo draws per answer (LLaDA: 128; 1 for MMLU)")
    p.add_argument("--mc-batch", type=int, default=32, help="draws per forward (%(default)s)")
    p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance (LLaDA's per task)")
    p.add_argument("--gen-length", type=int, default=512, help="generated tokens (§F.6: %(default)s)")
    p.add_argument("--steps", type=int, default=512, help="sampling steps (§F.6: %(default)s)")
    p.add_argument("--block-length", type=int, default=512, help="semi-autoregressive block (%(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (%(default)s)")
    p.add_argument("--protocol", choices=sorted(PROTOCOLS), default="base",
                   help="LLaDA's base protocol (lm-eval prompts and few-shot, no chat template, no EOS option) or "
                        "its instruct protocol (chat template, few-shot as chat turns, confidence_eos_eot_inf) "
                        "(%(default)s: the paper's Tables 2-3 compare with LLaDA Base's base-protocol numbers)")
    p.add_argument("--logits-eos-inf", action=argparse.BooleanOptionalAction, default=None,
                   help="generation: EOS never predicted (default: the protocol's, off)")
    p.add_argument("--confidence-eos-eot-inf", action=argparse.BooleanOptionalAction, default=None,
                   help="generation: EOS / end-of-turn logits -inf before the confidence softmax, as LLaDA "
                        "(default: the protocol's)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (%(default)s)")
    p.add_argument("--out-dir", default=None, help="results/<task>.json (each written when scored), results.md, "
                                                   "summary.json (default: out/eval/<checkpoint>_<tasks>_<protocol>)")
    p.add_argument("--resume", action="store_true", help="continue an evaluation into its --out-dir: tasks scored "
                                                         "already, with the same settings and weights, are kept")
    p.add_argument("--seed", type=int, default=LM_EVAL_SEED, help="seed of the likelihood draws and sampling "
                                                                   "(%(default)s)")
    cli.add_dist_flag(p)
    p.add_argument("--benchmark", action="store_true", help="tokens/s of generate on a random model of --preset")
    p.add_argument("--preset", default="tiny", choices=sorted(model_lib.PRESETS), help="--benchmark model (%(default)s)")
    p.add_argument("--prompt-length", type=int, default=64, help="--benchmark prompt tokens (%(default)s)")
    return cli.parse(p, argv)


def check_args(a):
    """Sizes and estimator settings, before anything loads: a score must never come from zero
    samples or zero draws."""
    cli.check_positive(mc_batch=a.mc_batch, batch_size=a.batch_size, gen_length=a.gen_length, steps=a.steps,
                          block_length=a.block_length, prompt_length=a.prompt_length,
                          **{name: getattr(a, name) for name in ("mc_num", "limit") if getattr(a, name) is not None})
    if a.cfg is not None and a.cfg < 0:
        raise UserError(f"--cfg must be >= 0 (0: no guidance), got {a.cfg}")
    if a.num_fewshot is not None and a.num_fewshot < 0:
        raise UserError(f"--num-fewshot must be >= 0, got {a.num_fewshot}")
    cli.check_seed(a.seed)
    if a.gen_length % a.block_length or a.steps % (a.gen_length // a.block_length):
        raise UserError("--gen-length must be a multiple of --block-length, and --steps of the number of "
                               "blocks")


def chosen_tasks(a):
    tasks = TABLES[a.table] if a.table else [t.strip() for t in (a.tasks or "").split(",") if t.strip()]
    if not tasks:
        raise UserError("give --table 1|2|3 or --tasks")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise UserError(f"unknown task {unknown[0]!r}; choose from {', '.join(TASKS)}")
    if len(set(tasks)) < len(tasks):
        raise UserError(f"--tasks names a task twice: {a.tasks}")
    if a.data_dir and not os.path.isdir(a.data_dir):
        raise UserError(f"--data-dir {a.data_dir} is not a folder")
    return tasks


def default_out_dir(a):
    """out/eval/<checkpoint's folder>_<table or tasks>: each checkpoint's scores in a folder of their own."""
    name = os.path.basename(os.path.normpath(a.checkpoint)) or "checkpoint"
    if name == "export":                        # out/pt_u01/export -> pt_u01
        name = os.path.basename(os.path.dirname(os.path.normpath(a.checkpoint))) or name
    what = f"table{a.table}" if a.table else "-".join(chosen_tasks(a))
    return os.path.join("out", "eval", cli.run_name(name.replace("/", "_"), what, a.protocol))


RUN_SETTINGS = ("checkpoint", "table", "tasks", "data_dir", "limit", "num_fewshot", "mc_num", "mc_batch", "cfg",
                "gen_length", "steps", "block_length", "protocol", "logits_eos_inf", "confidence_eos_eot_inf", "seed")


def main(argv=None):
    a = parse_args(sys.argv[1:] if argv is None else argv)
    check_args(a)
    device = cli.pick_device(a.device)
    if a.benchmark:
        out = benchmark(a, device)
        bench_dir = a.out_dir or os.path.join("out", "eval", f"benchmark_{a.preset}")
        prepare_out_dir(bench_dir)
        files.write_json(os.path.join(bench_dir, "benchmark.json"), dict(
            device=torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu", preset=a.preset,
            prompt_length=a.prompt_length, gen_length=a.gen_length, steps=a.steps, block_length=a.block_length,
            batches={str(b): v for b, v in out.items()}))
        return out
    tasks = chosen_tasks(a)
    require_lm_eval()
    out_dir = a.out_dir or default_out_dir(a)
    settings = {k: getattr(a, k) for k in RUN_SETTINGS}
    inputs = {"checkpoint": a.checkpoint, **({"data": a.data_dir} if a.data_dir else {})}
    with Run(SCRIPT, settings, out_dir, resume=a.resume, inputs=inputs, checkpoints=Partial("results"), torchrun=True,
             device=device, timeout_s=a.dist_timeout, backend="gloo") as run:         # gloo: no NCCL, no shards
        if run.done:
            if run.master:
                print(done_line(out_dir))
            return
        if a.limit is not None and a.limit < run.world.size:
            raise UserError(f"--limit {a.limit} is below the {run.world.size} ranks: every rank needs an item of each "
                            f"task")
        score(a, tasks, run)


def score(a, tasks, run):
    """Load, score every task (each written when scored), then results.md and summary.json (last)."""
    fresh = run.master and not os.path.isdir(run.path("results"))
    try:
        dtype = torch.bfloat16 if run.device.startswith("cuda") else torch.float32
        with run.together():
            m, tok, ids = load_model(a.checkpoint, run.device, dtype)
            if a.protocol == "instruct" or a.confidence_eos_eot_inf:    # the chat template; generation stops at EoT
                instruct_tokens(tok)
        lm = MaskedDiffusionLM(m, tok, ids, run.device, mc_batch=a.mc_batch, gen_length=a.gen_length, steps=a.steps,
                               block_length=a.block_length, batch_size=a.batch_size, seed=a.seed,
                               checkpoint=a.checkpoint)
        results, raws = evaluate(lm, tasks, a, run)
    except BaseException:
        if fresh:
            remove_unscored(run.out_dir)
        raise
    if run.master:
        names = [os.path.join("results", f"{t}.json") for t in tasks]
        run.write_text("results.md", markdown(results, a.table, a.checkpoint))
        run.finish(dict(checkpoint=a.checkpoint, table=a.table, limit=a.limit, world_size=run.world.size,
                        results=results, files=names + ["results.md"]))
        print(f"wrote {run.out_dir}/summary.json, results.md, {', '.join(names)}")


def remove_unscored(out_dir):
    """An evaluation that failed before scoring anything leaves no half-made folder (task YAMLs alone)."""
    results = os.path.join(out_dir, "results")
    if os.path.isdir(results) and os.listdir(results):
        return
    for name in ("results", "tasks"):
        shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)


def instruct_tokens(tok):
    """The instruct protocol writes LLaDA's chat template and stops generation at <|eot_id|>."""
    try:
        llada.chat_tokens(tok)
    except UserError as e:
        raise UserError(f"--protocol instruct / --confidence-eos-eot-inf: {e}") from None


if __name__ == "__main__":
    cli.run_cli(main)
