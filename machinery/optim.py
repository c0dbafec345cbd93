"""The learning-rate schedule and the gradient clipping of every training script."""
import math

import torch


def lr_at(step, lr, *, warmup=0, max_steps=1, schedule="constant", min_lr=0.0, decay_frac=0.0):
    """Linear warm-up over `warmup` steps, then: constant; cosine to min_lr at max_steps (nanoGPT);
    or wsd, constant until the last decay_frac of the steps and linear to min_lr over them (LLaDA's
    shape)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        frac = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        return min_lr + 0.5 * (1 + math.cos(math.pi * frac)) * (lr - min_lr)
    decay_start = max_steps - int(decay_frac * max_steps)
    if step < decay_start:
        return lr
    frac = (step - decay_start) / max(1, max_steps - decay_start)
    return lr + frac * (min_lr - lr)


def clip_gradients(parameters, max_norm):
    """The global gradient norm, the gradients clipped to max_norm; max_norm 0 means never (the
    norm is still measured: clip_grad_norm_ itself would multiply every gradient by 0)."""
    return torch.nn.utils.clip_grad_norm_(parameters, max_norm if max_norm > 0 else math.inf)
