"""
(n, k)-sparse parity: masked diffusion versus label-only supervision (paper §3-4.5, App. F.1-F.2).

    python parity.py --t1 0.246                 # MD with U[0, 0.246] on (20, 6) parity
    python parity.py --objective label          # the standard objective: supervise y only
    python parity.py --compare                  # Fig. 2: label vs MD over intervals and seeds

Task (Def. 3.1-3.2): x uniform on {-1,+1}^n, a secret set S of k positions,
y = prod_{j in S} x_j, training sequence x' = (x, y) of length n+1, N fixed
training examples, a fresh validation set. Tokens: -1 -> 0, +1 -> 1, MASK -> 2.

Objectives: `md` masks every position with probability t ~ U[t0, t1] and is
trained with masking.md_loss (cross-entropy) or masking.md_mse_loss (the
squared loss of Def. 3.6, for the MLP); `label` masks only y and supervises it.
Both are evaluated alike (§3.4): all of x visible, only y masked.

Models: `mlp` is the reduced model of §4.1 / F.1 (uniform attention, i.e.
f(z) = v^T relu(W z) on the summed one-hot (value, position) embedding);
`transformer` is the nanoGPT-style model.py preset "parity".

At every evaluation the MD loss is split into its signal part (masks with exactly
one position of S' = S u {label}; Thm 4.3) and its noise part, beside the
empirical fraction of signal draws and theory.signal_prob, plus the mean squared
output on noise-regime inputs, the quantity the implicit regulariser drives down.

Reading order: the settings, then train() (data, model, the loop with its step, evaluation,
summary), then the helpers it calls in that order, the figures, --compare and --ladder, and
the command line.
"""
import argparse
import csv
import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

import masking
import model as model_lib
import theory
from machinery import cli, sweep
from machinery.cli import UserError
from machinery.files import save_figure
from machinery.optim import clip_gradients, lr_at
from machinery.run import Run

SCRIPT = "parity.py"
MASK = 2                    # token ids: -1 -> 0, +1 -> 1, MASK -> 2
MASK_SEED_OFFSET = 1        # the masks and batches of a run seeded s draw from generator s + 1 (the data: s)
MAX_N = 62                  # inputs are drawn as integers below 2^n (int64)
COMPARE_STEPS = 3000        # --compare's step cap unless --max-steps is given


@dataclass
class ParityConfig:
    n: int = 20
    k: int = 6
    n_train: int = 10000           # N, the finite training set (Def. 3.2)
    n_val: int = 2000                 # validation rows, fresh draws never trained on
    objective: str = "md"          # "md" | "label"
    model: str = "mlp"             # "mlp" (§4.1 reduced model) | "transformer" (§4.5 nanoGPT-style)
    t0: float = 0.0
    t1: float = 0.246
    # mlp
    hidden: int = 2560
    init_std: float = 0.0          # mlp: std of W (0: PyTorch's default); transformer: of every matrix (0: GPT-2's 0.02)
    # transformer
    n_layer: int = 2                  # transformer: blocks
    d_model: int = 128                # transformer: width
    n_head: int = 4                   # transformer: attention heads
    mlp_hidden: int = 512             # transformer: MLP width
    embed: str = "additive"        # "additive" (nanoGPT: wte + wpe) | "joint" (Def. 3.5: one id per (value, position))
    tie_head: bool = True          # nanoGPT ties the output head to the token embedding
    loss: str = "auto"             # "ce" | "mse" | "auto" (mse for the mlp, as F.1; ce for the transformer, as §4.5)
    # optimisation
    batch_size: int = 3000         # 0 = full batch
    micro_batch: int = 1000        # rows per forward/backward (accumulated): cache-sized, 2x faster on a CPU
    lr: float = 1e-3                  # AdamW peak learning rate
    warmup: int = 0                   # linear warm-up steps
    weight_decay: float = 0.0         # AdamW weight decay
    beta2: float = 0.999              # AdamW beta2
    grad_clip: float = 1.0         # clip the global gradient norm to this (0: never)
    max_steps: int = 4000
    eval_every: int = 100             # steps between accuracy checks (and checkpoints)
    stop_acc: float = 0.99         # stop once train and val accuracy both reach this (> 1: never)
    fresh: bool = False            # a new sample every step (N = infinity): finding S without memorisation
    secret_only: bool = False      # diagnostic: MD loss on masked positions of S' only (noise bits unsupervised)
    seed: int = 0
    threads: int = 0               # torch CPU threads (0 = PyTorch's default)


PRESETS = {
    # F.1's reduced model (hidden 2560, lr 1e-3, squared loss) with N = 10000 in batches of
    # 3000: on (20, 6) the smallest N we found where MD reaches 95% validation without
    # memorising first, in about 90 s of a 2-core CPU (README "Parity").
    "mlp": dict(model="mlp"),
    # the same model at N = 3000, full batch: label-only memorises at once (Fig. 2's blue curve)
    "mlp-n3000": dict(model="mlp", n_train=3000, batch_size=0),
    # §4.5: nanoGPT-style transformer, cross-entropy, weight decay 0.1, at the N and lr where
    # label-only groks within 30k steps (Fig. 6). nanoGPT's defaults, explicit: head tied to the
    # 3-token embedding, gradient clipping at 1. MD does not leave chance with them (README).
    "transformer": dict(model="transformer", n_train=2000, d_model=64, mlp_hidden=256, batch_size=256, lr=3e-3,
                        warmup=500, weight_decay=0.1, beta2=0.95, max_steps=30000, eval_every=500,
                        tie_head=True, grad_clip=1.0),
}
# The same transformer as MD needs it: head untied (tied, the MD loss pulls the -1 and +1 embeddings
# together), no clipping, lr 1e-3 without warm-up, fresh data; sized for --ladder (README "Parity on
# the transformer": python parity.py --preset transformer-md --ladder ...)
PRESETS["transformer-md"] = dict(PRESETS["transformer"], tie_head=False, grad_clip=0.0, lr=1e-3, warmup=0, fresh=True,
                                 n_train=256, n_val=512, max_steps=12000, eval_every=250)


# ----------------------------------------------------------------------------- the experiment

def train(cfg, out_dir, *, device="cpu", resume=False, compile_model=False, dry_run=False, quiet=False,
          allow_change=()):
    """One run: `cfg.objective` on (n, k) parity, evaluated every eval_every steps with MD's signal/noise
    split. Writes OUT_DIR/{ckpt.pt, history.json, summary.json}; returns (summary, history), those of the
    finished run already there when OUT_DIR holds this very run."""
    check_config(cfg)
    with Run(SCRIPT, cfg, out_dir, resume=resume, allow_change=allow_change, bookkeeping=("threads",),
             dry_run=dry_run, quiet=quiet) as run:
        if run.done:
            return run.finished()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)

        # data (Def. 3.1-3.2): the secret set S, N training rows, fresh validation rows
        S, train_rows, val_rows = make_data(cfg.n, cfg.k, cfg.n_train, cfg.n_val, cfg.seed)
        train_tok, val_tok = to_tokens(train_rows).to(device), to_tokens(val_rows).to(device)
        S_prime = torch.cat([S, torch.tensor([cfg.n])]).to(device)          # S' = S u {label}
        in_secret = torch.zeros(cfg.n + 1, dtype=torch.bool, device=device).index_fill_(0, S_prime, True)
        P_S = theory.signal_prob(cfg.t0, cfg.t1, cfg.k)                     # Thm 4.3
        B = cfg.batch_size or cfg.n_train

        # model: §4.1's reduced MLP, or §4.5's transformer
        model = build_model(cfg).to(device)
        if cfg.model == "transformer":              # nanoGPT's AdamW: no weight decay on norms and biases
            opt = model.configure_optimizer(cfg.lr, cfg.weight_decay, (0.9, cfg.beta2), device.split(":")[0])
        else:
            opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, cfg.beta2), weight_decay=cfg.weight_decay)
        net = torch.compile(model) if compile_model else model
        gen = torch.Generator(device).manual_seed(cfg.seed + MASK_SEED_OFFSET)      # batches and masks
        saved = run.restore(model=model, opt=opt, gen=gen)
        step, seconds = (saved["step"], saved["train_seconds"]) if saved else (0, 0.0)
        max_steps = 2 if dry_run else cfg.max_steps
        run.log(f"{describe(cfg)}: S = {S.tolist()}, P_S = {P_S:.4f}, {sum(p.numel() for p in model.parameters()):,} "
                f"parameters, batch {B}, {max_steps} steps on {device}")

        norms = []
        while step < max_steps:
            started = time.time()
            # ----------------------------------------------------------------------------- the step
            x0 = draw_batch(train_tok, B, S, cfg, gen, device)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg.lr, warmup=cfg.warmup)
            loss, parts = 0.0, []                           # this step's loss (logged at evaluations), its pieces
            for xb in x0.split(cfg.micro_batch or B):      # gradient accumulation: same step, cache-sized pieces
                if cfg.objective == "md":
                    t = masking.sample_t(len(xb), cfg.t0, cfg.t1, generator=gen, device=device)   # Def. 3.4
                    xt, masked = masking.mask_tokens(xb, t, MASK, generator=gen)
                    out = predict(net, cfg, xt)
                    rows = md_rows(out, cfg, xb, masked & in_secret if cfg.secret_only else masked, t)
                    parts.append((rows.detach(), out.detach(), masked))
                    piece = rows.sum() / B
                else:                                       # label-only: x visible, y masked and supervised
                    piece = label_loss(predict(net, cfg, mask_label(xb)), cfg, xb[:, -1]) * len(xb) / B
                piece.backward()
                loss += piece.item()
            norms.append(clip_gradients(model.parameters(), cfg.grad_clip).item())
            opt.step()
            opt.zero_grad(set_to_none=True)
            # -----------------------------------------------------------------------------
            step += 1
            seconds += time.time() - started

            if step % cfg.eval_every == 0 or step == max_steps:
                rec = dict(step=step, seconds=round(seconds, 2), loss=loss, **clipping(norms),
                           train_acc=accuracy(model, cfg, train_tok), val_acc=accuracy(model, cfg, val_tok))
                if cfg.objective == "md":                   # Thm 4.3 made visible: the step's loss by regime
                    rows, outs, masks = (torch.cat(column) for column in zip(*parts))
                    rec.update(regime_stats(rows, outs, masks, S_prime, cfg), P_S=P_S)
                if cfg.model == "transformer":
                    rec["bits_cos"] = bit_embedding_cos(model, cfg)
                norms = []
                run.log(f"{log_line(rec, P_S, cfg)} | {run.eta(step, max_steps)}", **rec)   # kept in run.history
                run.save(step, model=model, opt=opt, gen=gen, train_seconds=seconds)
                if min(rec["train_acc"], rec["val_acc"]) >= cfg.stop_acc:
                    break
        return run.finish(summarize(cfg, S, P_S, run.history)), run.history


def check_config(cfg):
    """Every user-caused mistake as one line, before any work starts."""
    if not 1 <= cfg.k <= cfg.n:
        raise UserError(f"need 1 <= k <= n, got n={cfg.n}, k={cfg.k}")
    if cfg.n > MAX_N:
        raise UserError(f"--n {cfg.n}: inputs are drawn as integers below 2^n; n must be at most {MAX_N}")
    if cfg.n_train <= 0 or cfg.n_val <= 0:
        raise UserError(f"need N > 0 and n_val > 0, got N={cfg.n_train}, n_val={cfg.n_val}")
    if cfg.n <= 24 and cfg.n_train + cfg.n_val > 2 ** cfg.n:
        raise UserError(f"N + n_val = {cfg.n_train + cfg.n_val} exceeds the 2^{cfg.n} distinct inputs")
    cli.check_interval(cfg.t0, cfg.t1, trains=cfg.objective == "md")
    choices = dict(objective=("md", "label"), model=("mlp", "transformer"), embed=("additive", "joint"),
                   loss=("auto", "ce", "mse"))
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise UserError(f"--{name} must be one of {allowed}, got {getattr(cfg, name)!r}")
    sizes = ("hidden",) if cfg.model == "mlp" else ("n_layer", "d_model", "n_head", "mlp_hidden")
    cli.check_settings(cfg, positive=("max_steps", "eval_every") + sizes, nonnegative=("threads",))
    if cfg.batch_size < 0 or cfg.micro_batch < 0:      # 0 means "all" for both
        raise UserError(f"--batch-size and --micro-batch must be >= 0 (0: all), got {cfg.batch_size}, "
                        f"{cfg.micro_batch}")
    if not cfg.stop_acc > 0.5:
        raise UserError(f"--stop-acc must be above chance (0.5; > 1: never stop early), got {cfg.stop_acc}")
    if cfg.model == "transformer":
        with cli.user_input():
            transformer_config(cfg)


# ----------------------------------------------------------------------------- data

def make_data(n, k, n_train, n_val, seed):
    """Secret set S (k of the n positions), then N training and n_val validation
    rows x' = (x, y) in {-1,+1}^(n+1); no validation input also appears in training."""
    g = torch.Generator().manual_seed(seed)
    S = torch.randperm(n, generator=g)[:k].sort().values
    if n <= 24:
        codes = torch.randperm(2 ** n, generator=g)[: n_train + n_val]
    else:                     # too many inputs to enumerate: draw, drop repeats, shuffle back
        codes = torch.randint(0, 2 ** n, (2 * (n_train + n_val),), generator=g).unique()
        codes = codes[torch.randperm(len(codes), generator=g)][: n_train + n_val]
    bits = (codes[:, None] >> torch.arange(n)) & 1
    x = bits * 2 - 1
    y = x[:, S].prod(1, keepdim=True)
    rows = torch.cat([x, y], 1)
    return S, rows[:n_train], rows[n_train:]


def fresh_tokens(B, n, S, generator, device):
    """B new uniform inputs with their parity label, as tokens (training on the population)."""
    x = torch.randint(0, 2, (B, n), generator=generator, device=device) * 2 - 1
    return to_tokens(torch.cat([x, x[:, S].prod(1, keepdim=True)], 1))


def to_tokens(rows):
    return (rows > 0).long()        # -1 -> 0, +1 -> 1


def draw_batch(train_tok, B, S, cfg, gen, device):
    """This step's rows: fresh draws (N = infinity), the whole training set, or a random batch of it."""
    if cfg.fresh:
        return fresh_tokens(B, cfg.n, S.to(device), gen, device)
    if B == cfg.n_train:
        return train_tok
    return train_tok[torch.randint(0, cfg.n_train, (B,), generator=gen, device=device)]


# ----------------------------------------------------------------------------- models

class ParityMLP(nn.Module):
    """§4.1 reduced model: with uniform attention every position outputs the same
    f(z) = v^T relu(W z), where z = sum_j e_{3j + b_j} is the one-hot embedding of
    (value b_j in {-1, +1, MASK}, position j) summed over the sequence (Def. 3.5).

    Layouts: this model indexes (value, position) position-major, 3j + b; Def. 3.5 writes it
    value-major, e_{n' b + j}, as joint_ids (the transformer's joint embedding) does. The two are
    one permutation of the same one-hot coordinates: the same model up to relabelling W's columns."""

    def __init__(self, n_pos, hidden, init_std=0.0):
        super().__init__()
        self.W = nn.Linear(3 * n_pos, hidden, bias=False)
        self.v = nn.Linear(hidden, 1, bias=False)
        if init_std:
            nn.init.normal_(self.W.weight, std=init_std)
        self.register_buffer("offsets", torch.arange(n_pos) * 3)

    def forward(self, tokens):
        z = torch.zeros(len(tokens), self.W.in_features, device=tokens.device)
        z.scatter_(1, tokens + self.offsets, 1.0)                  # the summed one-hot z of Def. 3.5
        return self.v(F.relu(self.W(z))).squeeze(-1)               # (B,)


def joint_ids(tokens):
    """Def. 3.5 for the transformer: one token id per (value, position), value-major (n' b + j)."""
    return tokens * tokens.shape[1] + torch.arange(tokens.shape[1], device=tokens.device)


def transformer_config(cfg):
    """The §4.5 transformer: model.py's "parity" preset at the run's sizes (ModelConfig checks them)."""
    n_pos = cfg.n + 1
    vocab = 3 * n_pos if cfg.embed == "joint" else 3
    return model_lib.get_config("parity", vocab_size=vocab, mask_id=vocab - 1, block_size=n_pos,
                                n_layer=cfg.n_layer, d_model=cfg.d_model, n_head=cfg.n_head,
                                mlp_hidden=cfg.mlp_hidden, tie_weights=cfg.tie_head, init_std=cfg.init_std or 0.02)


def build_model(cfg):
    if cfg.model == "mlp":
        return ParityMLP(cfg.n + 1, cfg.hidden, cfg.init_std)
    return model_lib.Transformer(transformer_config(cfg))


def predict(model, cfg, tokens):
    """The model's output for every position: (B, L, 2) logits over {-1, +1} for the
    transformer; (B, L) real values (one shared f(z), §4.1) for the MLP."""
    if cfg.model == "mlp":
        return model(tokens)[:, None].expand(tokens.shape)
    ids = joint_ids(tokens) if cfg.embed == "joint" else tokens
    return model(ids)[..., :2]      # the two bit values; MASK is never a target


def margin(out):
    """The model's evidence for +1: the logit difference (transformer) or f itself (MLP)."""
    return out[..., 1] - out[..., 0] if out.dim() == 3 else out


def uses_ce(cfg):
    return cfg.loss == "ce" or (cfg.loss == "auto" and cfg.model == "transformer")


# ----------------------------------------------------------------------------- objectives, evaluation and the signal/noise split

def as_logits(out):
    """(..., 2) logits; with cross-entropy the MLP's f is the logit of +1 (Remark 4.4)."""
    return out if out.dim() == 3 else torch.stack([torch.zeros_like(out), out], -1)


def md_rows(out, cfg, x0, masked, t):
    """The MD loss per row (its mean is the loss: §5's cross-entropy, or Def. 3.6's squared loss,
    Eq. (1)), so the batch can be split by regime."""
    if uses_ce(cfg):
        return masking.md_loss(as_logits(out), x0, masked, t, reduction="none")
    return masking.md_mse_loss(out, x0 * 2 - 1, masked, t, reduction="none")


def label_loss(out, cfg, y):
    """The standard objective: supervise the label position only."""
    if uses_ce(cfg):
        return F.cross_entropy(as_logits(out)[:, -1].float(), y)
    return 0.5 * (out[:, -1] - (y * 2 - 1)).square().mean()


def mask_label(tokens):
    """§3.4's evaluation mask M_eval = {n'}: every input bit visible, y masked."""
    xt = tokens.clone()
    xt[:, -1] = MASK
    return xt


def regime_stats(rows, out, masked, S_prime, cfg):
    """Thm 4.3 made visible: the batch loss split into its signal-regime part
    (|M n S'| = 1) and noise-regime part (they sum to the loss), the empirical
    signal fraction (-> P_S), and the mean squared output on masked positions of
    noise-regime inputs, which the implicit regulariser pushes towards 0.
    rows (B,) per-row losses, out the model's outputs, masked (B, n+1)."""
    signal = masked[:, S_prime].sum(1) == 1                     # (B,): exactly one masked position of S'
    B = len(rows)
    noise_out = margin(out)[masked & ~signal[:, None]].float()  # outputs at masked positions of noise rows
    return dict(loss_signal=(rows[signal].sum() / B).item(), loss_noise=(rows[~signal].sum() / B).item(),
                signal_frac=signal.float().mean().item(),
                noise_out2=noise_out.square().mean().item() if len(noise_out) else float("nan"))


@torch.no_grad()
def accuracy(model, cfg, tokens):
    model.eval()
    correct = 0
    for chunk in tokens.split(4096):
        m = margin(predict(model, cfg, mask_label(chunk)))[:, -1]
        correct += ((m > 0) == (chunk[:, -1] == 1)).sum().item()
    model.train()
    return correct / len(tokens)


@torch.no_grad()
def bit_embedding_cos(model, cfg):
    """Cosine between the input embeddings of -1 and +1 (per position for the joint embedding,
    averaged). With a tied head these rows are also the output head, and the MD loss pulls them
    together (README "Parity"): near 1 the model can no longer tell a -1 from a +1."""
    w = model.transformer.wte.weight
    if cfg.embed == "joint":
        n = cfg.n + 1
        return F.cosine_similarity(w[:n], w[n:2 * n], dim=-1).mean().item()
    return F.cosine_similarity(w[0], w[1], dim=0).item()


def clipping(norms):
    """The pre-clip gradient norms since the last evaluation: how often clipping at 1 bites."""
    return dict(grad_norm=norms[-1], grad_norm_max=max(norms), frac_norm_over_1=sum(n > 1 for n in norms) / len(norms))


def log_line(rec, P_S, cfg):
    extra = (f" | signal {rec['loss_signal']:.3f} noise {rec['loss_noise']:.3f} frac {rec['signal_frac']:.3f} "
             f"(P_S {P_S:.3f}) noise out^2 {rec['noise_out2']:.3f}" if cfg.objective == "md" else "")
    extra += f" | cos(e-, e+) {rec['bits_cos']:.2f}" if "bits_cos" in rec else ""
    return f"step {rec['step']:6d} | loss {rec['loss']:.4f} | train {rec['train_acc']:.3f} val {rec['val_acc']:.3f}{extra}"


# ----------------------------------------------------------------------------- summary and figures

def describe(cfg):
    what = f"md U[{cfg.t0:g}, {cfg.t1:g}]" if cfg.objective == "md" else "label"
    return f"{what} ({cfg.model}, (n,k)=({cfg.n},{cfg.k}), N={cfg.n_train}, seed {cfg.seed})"


def default_out_dir(cfg):
    """out/parity/<objective>[_U<t0>-<t1>]_n<n>k<k>_<model>_s<seed>: the README's commands each write
    a folder of their own, so they run one after another."""
    interval = f"_U{cfg.t0:g}-{cfg.t1:g}" if cfg.objective == "md" else ""
    return os.path.join("out", "parity", f"{cfg.objective}{interval}_n{cfg.n}k{cfg.k}_{cfg.model}_s{cfg.seed}")


def first_step(history, key, level):
    hit = next((h for h in history if h[key] >= level), None)
    return (hit["step"], hit["seconds"]) if hit else (None, None)


def summarize(cfg, S, P_S, history):
    last = history[-1]
    steps_95, secs_95 = first_step(history, "val_acc", 0.95)
    steps_mem, _ = first_step(history, "train_acc", 0.99)
    return dict(secret_set=S.tolist(), P_S=P_S if cfg.objective == "md" else None, steps=last["step"],
                train_seconds=last["seconds"], train_acc=last["train_acc"], val_acc=last["val_acc"],
                best_val_acc=max(h["val_acc"] for h in history), steps_to_95=steps_95, seconds_to_95=secs_95,
                steps_to_train_99=steps_mem)


def verdict(s):
    cfg = ParityConfig(**s["settings"])
    head = describe(cfg)
    if s["steps_to_95"] is None:
        return (f"{head}: did NOT reach 95% validation in {s['steps']} steps "
                f"(final train {s['train_acc']:.3f}, val {s['val_acc']:.3f}, best val {s['best_val_acc']:.3f})")
    plateau = ""
    if s["steps_to_train_99"] is not None and s["steps_to_train_99"] < s["steps_to_95"]:
        plateau = f"; train hit 99% first, at step {s['steps_to_train_99']}"
    return (f"{head}: 95% validation at step {s['steps_to_95']} ({s['seconds_to_95']:.0f}s of training){plateau}; "
            f"final train {s['train_acc']:.3f}, val {s['val_acc']:.3f}")


def plot_run(history, cfg, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps = [h["step"] for h in history]
    md = cfg.objective == "md"
    fig, axes = plt.subplots(1, 3 if md else 1, figsize=(15 if md else 6, 4), squeeze=False)
    ax = axes[0, 0]
    ax.plot(steps, [h["train_acc"] for h in history], "--", label="train")
    ax.plot(steps, [h["val_acc"] for h in history], label="validation")
    ax.set(xlabel="step", ylabel="accuracy (y masked, x visible)", title=describe(cfg), ylim=(0.4, 1.02))
    ax.legend()
    if md:
        ax = axes[0, 1]
        ax.plot(steps, [h["loss_signal"] for h in history], label="signal regime (|M∩S'|=1)")
        ax.plot(steps, [h["loss_noise"] for h in history], label="noise regime")
        ax.set(xlabel="step", ylabel="share of the batch MD loss", title="Thm 4.3: loss split")
        ax.legend()
        ax = axes[0, 2]
        ax.plot(steps, [h["signal_frac"] for h in history], label="signal fraction (batch)")
        ax.axhline(history[0]["P_S"], color="k", ls=":", label=f"P_S = {history[0]['P_S']:.3f}")
        ax.plot(steps, [h["noise_out2"] for h in history], label="mean out² on noise inputs")
        ax.set(xlabel="step", title="signal share and the implicit regulariser")
        ax.legend()
    save_figure(fig, path)


def run_name(objective, t1):
    return "label" if objective == "label" else f"md_0-{t1:g}"


def plot_compare(rows, histories, out_dir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(dict.fromkeys(r["run"] for r in rows))
    colors = {n: plt.cm.tab10(i) for i, n in enumerate(names)}
    seed0 = min(r["seed"] for r in rows)
    # Fig. 2: train (dashed) and validation (solid) accuracy, first seed
    fig, ax = plt.subplots(figsize=(8, 5))
    for n in names:
        h = histories[(n, seed0)]
        steps = [e["step"] for e in h]
        ax.plot(steps, [e["train_acc"] for e in h], "--", color=colors[n], alpha=0.6)
        ax.plot(steps, [e["val_acc"] for e in h], color=colors[n], label=n)
    ax.set(xlabel="step", ylabel="accuracy", title=f"Fig. 2: train (dashed) and validation (solid), seed {seed0}",
           ylim=(0.4, 1.02))
    ax.legend()
    save_figure(fig, os.path.join(out_dir, "fig2_accuracy.png"))
    # Fig. 6: the label runs, every seed
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for (n, seed), h in histories.items():
        if n == "label":
            steps = [e["step"] for e in h]
            axes[0].plot(steps, [e["train_acc"] for e in h], label=f"seed {seed}")
            axes[1].plot(steps, [e["val_acc"] for e in h], label=f"seed {seed}")
    for ax, what in zip(axes, ("training", "validation")):
        ax.set(xlabel="step", ylabel=f"{what} accuracy", title=f"Fig. 6: label-only, {what}", ylim=(0.4, 1.02))
        ax.legend()
    save_figure(fig, os.path.join(out_dir, "fig6_label.png"))
    # steps to 95% validation per run, every seed (not reached: drawn at the top, hollow)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    cap = max(r["steps"] for r in rows)
    seeds = sorted({r["seed"] for r in rows})
    for i, n in enumerate(names):
        for r in rows:
            if r["run"] == n:
                hit = r["steps_to_95"] is not None
                x = i + 0.08 * (seeds.index(r["seed"]) - (len(seeds) - 1) / 2)     # seeds side by side
                ax.scatter(x, r["steps_to_95"] if hit else cap, color=colors[n],
                           facecolors=colors[n] if hit else "none", s=40)
    ax.set_xticks(range(len(names)), names, rotation=20)
    ax.set(ylabel="steps to 95% validation", title="steps to 95% validation (hollow: not reached)")
    save_figure(fig, os.path.join(out_dir, "steps_to_95.png"))


# ----------------------------------------------------------------------------- --compare (Fig. 2, 6) and --ladder

def train_quietly(cfg, run_dir, allow_change, device):
    """One run of a collection (a job of sweep.run_jobs): a finished one is reused, an interrupted one
    continues (one whose --allow-change settings differ is extended)."""
    return train(cfg, run_dir, device=device, resume=True, quiet=True, allow_change=allow_change)


def print_verdict(result):
    print(verdict(result[0]), flush=True)


def read_run(run_dir, name):
    with open(os.path.join(run_dir, name)) as f:
        return json.load(f)


def compare(base, intervals, seeds, out_dir, device, jobs, label_steps, allow_change=()):
    """Fig. 2 / 6: label and md U[0, t1] for each t1, for each seed; finished runs are reused, and the
    table also holds the runs an earlier --compare with other intervals or seeds left in the folder."""
    settings = dict(settings=asdict(base), intervals=intervals, seeds=seeds)
    with sweep.Collection(out_dir, "parity.py --compare", settings) as folder:
        planned = []
        for seed in seeds:
            for objective, t1 in [("label", base.t1)] + [("md", t1) for t1 in intervals]:
                cfg = replace(base, objective=objective, t0=0.0, t1=t1, seed=seed,
                              max_steps=label_steps if objective == "label" and label_steps else base.max_steps)
                planned.append((cfg, folder.path(f"{run_name(objective, t1)}_seed{seed}"), allow_change))
        folder.run(train_quietly, planned, device, jobs, ignore=("threads",), allow_change=allow_change,
                   on_result=print_verdict)
        steps = dict(md=base.max_steps, label=label_steps or base.max_steps)
        earlier = [(ParityConfig(**s["settings"]), d) for d, s in folder.finished(asdict(base), ("objective", "t0", "t1",
                   "seed", "max_steps"), ("threads",)) if s["settings"]["max_steps"] == steps[s["settings"]["objective"]]]
        planned = [(c, d) for c, d, _ in planned]
        rows, histories = [], {}
        for cfg, run_dir in planned + [(c, d) for c, d in earlier if d not in {d for _, d in planned}]:
            s = read_run(run_dir, "summary.json")
            histories[(run_name(cfg.objective, cfg.t1), cfg.seed)] = read_run(run_dir, "history.json")
            rows.append(dict(run=run_name(cfg.objective, cfg.t1), seed=cfg.seed,
                             **{k: s[k] for k in ("P_S", "steps", "train_seconds", "train_acc", "val_acc",
                                                  "best_val_acc", "steps_to_95", "seconds_to_95", "steps_to_train_99")}))
        with open(folder.path("results.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        summary = dict(settings=asdict(base), intervals=intervals, seeds=seeds, runs=rows, table=table(rows))
        folder.finish("summary.json", summary)
    return summary, histories


def table(rows):
    """Median and range of steps/seconds to 95% validation per run over seeds (None: no seed got there)."""
    def spread(values):     # rounded: medians of seconds print as 22.185000000000002 otherwise
        return (round(statistics.median(values), 2), [min(values), max(values)]) if values else (None, None)
    out = []
    for n in dict.fromkeys(r["run"] for r in rows):
        rs = [r for r in rows if r["run"] == n]
        hit = [r for r in rs if r["steps_to_95"] is not None]
        (steps_median, steps_range), (seconds_median, seconds_range) = (
            spread([r["steps_to_95"] for r in hit]), spread([r["seconds_to_95"] for r in hit]))
        out.append(dict(run=n, P_S=rs[0]["P_S"], seeds=len(rs), reached=len(hit),
                        steps_median=steps_median, steps_range=steps_range,
                        seconds_median=seconds_median, seconds_range=seconds_range,
                        train99_median=statistics.median([r["steps_to_train_99"] or r["steps"] for r in rs])))
    return out


def parse_tasks(text):
    """'8,2 12,2 8,3' -> [(8, 2), (12, 2), (8, 3)]"""
    try:
        tasks = [tuple(int(v) for v in item.split(",")) for item in text.split()]
    except ValueError:
        raise UserError(f"--ladder wants N,K pairs such as '8,2 12,2 8,3', got {text!r}") from None
    if not tasks or any(len(t) != 2 or not 1 <= t[1] <= t[0] for t in tasks):
        raise UserError(f"--ladder wants N,K pairs with 1 <= K <= N, got {text!r}")
    if len(set(tasks)) < len(tasks):
        raise UserError(f"--ladder names a task twice: {text!r}")
    return tasks


def ladder_config(base, n, k, objective, seed):
    """One rung: the base settings on (n, k), MD at the P_S-optimal U[0, t1*(k)] (§4.5's best t1, over
    intervals), label-only alike; the step cap grows with k (--max-steps at k = 3)."""
    t1 = round(theory.best_t1(k), 3) if objective == "md" else base.t1
    return replace(base, n=n, k=k, objective=objective, seed=seed, t0=0.0, t1=t1,
                   n_train=min(base.n_train, 2 ** n // 4), n_val=min(base.n_val, 2 ** n // 2),
                   max_steps=base.max_steps * max(1, k - 1) // 2)


def fit_growth(points):
    """Least squares of log(steps) = a + b k log(n) over (n, k, mean steps) points: SGD finds a
    k-sparse parity in n^O(k) steps (Barak et al. 2022), so b is the exponent per unit of k.
    Returns (a, b) or None with fewer than two distinct k log n."""
    xs = [k * math.log(n) for n, k, _ in points]
    if len(set(xs)) < 2:
        return None
    ys = [math.log(s) for _, _, s in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def ladder(base, tasks, seeds, out_dir, device, jobs, allow_change=()):
    """Steps to 95% validation for label-only and MD over a ladder of small (n, k) tasks, several
    seeds each, the same model and optimiser; the growth fitted and extrapolated to (20, 6)."""
    with sweep.Collection(out_dir, "parity.py --ladder", dict(settings=asdict(base), tasks=tasks, seeds=seeds)) \
            as folder:
        planned = [(ladder_config(base, n, k, objective, seed), folder.path(f"lad_{objective}_n{n}k{k}_s{seed}"),
                    allow_change) for n, k in tasks for seed in seeds for objective in ("label", "md")]
        for cfg, _, _ in planned:
            check_config(cfg)
        folder.run(train_quietly, planned, device, jobs, ignore=("threads",), allow_change=allow_change,
                   on_result=print_verdict)
        rows = []
        for cfg, run_dir, _ in planned:
            s = read_run(run_dir, "summary.json")
            rows.append(dict(objective=cfg.objective, n=cfg.n, k=cfg.k, seed=cfg.seed, t1=cfg.t1, cap=cfg.max_steps,
                             steps_to_95=s["steps_to_95"], best_val_acc=s["best_val_acc"]))
        table_rows, fits = [], {}
        for objective in ("label", "md"):
            points = []
            for n, k in tasks:
                rs = [r for r in rows if (r["objective"], r["n"], r["k"]) == (objective, n, k)]
                hit = sorted(r["steps_to_95"] for r in rs if r["steps_to_95"] is not None)
                cap = rs[0]["cap"]
                # The plateau ends at a random step (seeds differ by 10x): modelled as a waiting time with a
                # constant escape rate, its maximum-likelihood mean counts the runs stopped at the cap too:
                # (steps of the escapes + cap x the runs that did not escape) / escapes.
                mean = (sum(hit) + cap * (len(rs) - len(hit))) / len(hit) if hit else None
                table_rows.append(dict(objective=objective, n=n, k=k, reached=len(hit), seeds=len(rs),
                                       steps=[r["steps_to_95"] for r in rs], cap=cap, mean_steps=mean,
                                       median=statistics.median(hit) if len(hit) * 2 > len(rs) else None,
                                       lower_bound=None if hit else cap * len(rs)))
                if mean is not None:
                    points.append((n, k, mean))
            fit = fit_growth(points)
            fits[objective] = None if fit is None else dict(
                log_C=fit[0], exponent_per_k=fit[1], points=len(points),
                steps_20_6=math.exp(fit[0] + fit[1] * 6 * math.log(20)))
        summary = dict(settings=asdict(base), tasks=tasks, seeds=seeds, runs=rows, table=table_rows, fits=fits)
        folder.finish("ladder.json", summary)
    return summary


# ----------------------------------------------------------------------------- command line

def parse_args(argv=None):
    """(flags, settings): the preset's settings, then every flag given."""
    p = cli.parser(__doc__.split("\n\n")[0] + " See README 'Parity'.", presets=PRESETS, preset="mlp", t0=0.0,
                   t1=0.246)
    task = p.add_argument_group("the task (Def. 3.1-3.2)")
    task.add_argument("--n", type=int, help="input bits")
    task.add_argument("--k", type=int, help="size of the secret set S")
    task.add_argument("--n-train", type=int, help="N, the training set size")
    task.add_argument("--n-val", type=int, help="validation rows, fresh draws never trained on")
    task.add_argument("--fresh", action=argparse.BooleanOptionalAction, help="a new sample every step (N = infinity)")
    objective = p.add_argument_group("the objective")
    objective.add_argument("--objective", help="md (every position masked w.p. t ~ U[t0, t1], Def. 3.4) | label "
                                               "(y masked and supervised alone)")
    objective.add_argument("--loss", help="auto | ce | mse (auto: mse for the mlp, as F.1; ce for the transformer, "
                                          "as §4.5)")
    objective.add_argument("--secret-only", action=argparse.BooleanOptionalAction,
                           help="diagnostic: supervise masked positions of S' only, never the noise bits")
    net = p.add_argument_group("the model")
    net.add_argument("--model", help="mlp (§4.1's reduced model) | transformer (§4.5, nanoGPT-style)")
    net.add_argument("--hidden", type=int, help="mlp: hidden width D")
    net.add_argument("--init-std", type=float, help="mlp: std of W (0: PyTorch's default); transformer: of its "
                                                    "matrices (0: GPT-2's 0.02)")
    net.add_argument("--n-layer", type=int, help="transformer: blocks")
    net.add_argument("--d-model", type=int, help="transformer: width")
    net.add_argument("--n-head", type=int, help="transformer: attention heads")
    net.add_argument("--mlp-hidden", type=int, help="transformer: MLP width")
    net.add_argument("--embed", help="transformer embedding: additive (wte + wpe, nanoGPT) | joint (one id per "
                                     "value and position, Def. 3.5)")
    net.add_argument("--tie-head", action=argparse.BooleanOptionalAction,
                     help="transformer: output head tied to the token embedding (nanoGPT)")
    optim = p.add_argument_group("optimisation")
    optim.add_argument("--batch-size", type=int, help="rows per step (0: the full batch)")
    optim.add_argument("--micro-batch", type=int, help="rows per forward/backward, accumulated (0: all): "
                                                       "cache-sized, 2x faster on a CPU")
    optim.add_argument("--lr", type=float, help="AdamW peak learning rate")
    optim.add_argument("--warmup", type=int, help="linear warm-up steps")
    optim.add_argument("--weight-decay", type=float, help="AdamW weight decay")
    optim.add_argument("--beta2", type=float, help="AdamW beta2")
    optim.add_argument("--grad-clip", type=float, help="clip the gradient norm to this (0: never)")
    optim.add_argument("--eval-every", type=int, help="steps between accuracy checks (and checkpoints)")
    optim.add_argument("--stop-acc", type=float, help="stop once train and validation reach this (> 1: never)")
    optim.add_argument("--threads", type=int, help="torch CPU threads (0: PyTorch's default)")
    runs = p.add_argument_group("many runs")
    runs.add_argument("--compare", action="store_true", help="Fig. 2/6: label and md over --intervals and --seeds, "
                                                             f"{COMPARE_STEPS} steps each unless --max-steps")
    runs.add_argument("--intervals", type=float, nargs="+", default=[0.1, 0.246, 0.4, 1.0],
                      help="--compare: upper ends t1 of U[0, t1] (%(default)s; the README table adds 0.2 0.3)")
    runs.add_argument("--seeds", type=int, nargs="+", default=[0, 1],
                      help="--compare, --ladder: seeds (%(default)s; the README table uses 0 1 2)")
    runs.add_argument("--jobs", type=int, default=2, help="--compare, --ladder: runs in parallel, one CPU thread "
                                                          "each (%(default)s)")
    runs.add_argument("--label-steps", type=int, default=None,
                      help="--compare: max steps of the label runs (default: --max-steps)")
    runs.add_argument("--ladder", default=None, metavar="'N,K N,K ...'",
                      help="label-only and MD U[0, t1*(k)] over these tasks and --seeds, steps to 95%% fitted as "
                           "n^(b k) and extrapolated to (20, 6) (README 'Parity on the transformer')")
    return cli.parse(p, argv, ParityConfig, PRESETS)


def check_collection_args(a):
    """--compare and --ladder: seeds and intervals each once, in range."""
    for seed in a.seeds:
        cli.check_seed(seed, "seeds")
    if len(set(a.seeds)) < len(a.seeds):
        raise UserError(f"--seeds names a seed twice: {a.seeds}")
    if len(set(a.intervals)) < len(a.intervals):
        raise UserError(f"--intervals names an interval twice: {a.intervals}")
    for t1 in a.intervals:
        cli.check_interval(0.0, t1)
    cli.check_positive(jobs=a.jobs, **({"label_steps": a.label_steps} if a.label_steps is not None else {}))


def main(argv=None):
    a, cfg = parse_args(argv)
    many = a.compare or bool(a.ladder)
    cli.check_used(a, intervals=(a.compare, "with --compare"), label_steps=(a.compare, "with --compare"),
                   seeds=(many, "with --compare or --ladder"), jobs=(many, "with --compare or --ladder"),
                   allow_change=(a.resume or many, "with --resume (and to --compare / --ladder, to extend their runs)"))
    check_config(cfg)
    device = cli.pick_device(a.device)
    if many:
        check_collection_args(a)
    if a.ladder:
        out_dir = a.out_dir or "out/parity/ladder"
        s = ladder(cfg, parse_tasks(a.ladder), a.seeds, out_dir, device, a.jobs, a.allow_change)
        for r in s["table"]:
            mean = f"{r['mean_steps']:,.0f}" if r["mean_steps"] else f"> {r['lower_bound']:,} (none escaped)"
            print(f"{r['objective']:>5} ({r['n']:2d}, {r['k']}): reached 95% in {r['reached']}/{r['seeds']} seeds "
                  f"(cap {r['cap']}), steps {r['steps']}, mean waiting time {mean}")
        for objective, f in s["fits"].items():
            print(f"{objective}: " + ("too few tasks reached to fit" if f is None else
                  f"steps ~ {math.exp(f['log_C']):.3g} n^({f['exponent_per_k']:.2f} k) over {f['points']} tasks; "
                  f"(20, 6): {f['steps_20_6']:.3g} steps"))
        print(f"wrote {out_dir}/ladder.json")
        return
    if a.compare:
        if a.max_steps is None:      # the defaults then fit in 15 minutes of a 2-core CPU (README "Parity")
            cfg = replace(cfg, max_steps=COMPARE_STEPS)
        out_dir = a.out_dir or "out/parity/compare"
        summary, histories = compare(cfg, a.intervals, a.seeds, out_dir, device, a.jobs, a.label_steps, a.allow_change)
        for r in summary["table"]:
            p_s = "  —  " if r["P_S"] is None else f"{r['P_S']:.3f}"
            secs = "—" if r["seconds_median"] is None else \
                f"{r['seconds_median']:.1f} [{r['seconds_range'][0]:.1f}–{r['seconds_range'][1]:.1f}]"
            steps = "—" if r["steps_median"] is None else \
                f"{r['steps_median']:g} [{r['steps_range'][0]}–{r['steps_range'][1]}]"
            print(f"{r['run']:>10}  P_S {p_s}  reached 95% in {r['reached']}/{r['seeds']} seeds  "
                  f"steps to 95%: median {steps}  seconds: median {secs}")
        if a.plot:
            plot_compare(summary["runs"], histories, out_dir)
        print(f"wrote {out_dir}/summary.json, results.csv" + (", fig2_accuracy.png, fig6_label.png, "
                                                             "steps_to_95.png" if a.plot else ""))
        return
    out_dir = a.out_dir or default_out_dir(cfg)
    summary, history = train(cfg, out_dir, device=device, resume=a.resume, compile_model=a.compile, dry_run=a.dry_run,
                             allow_change=a.allow_change)
    print(verdict(summary))
    if summary.get("done"):
        return
    if a.plot and not a.dry_run:
        plot_run(history, cfg, os.path.join(out_dir, "curves.png"))
    if not a.dry_run:
        print(f"wrote {out_dir}/summary.json" + (", curves.png" if a.plot else ""))


if __name__ == "__main__":
    cli.run_cli(main)
