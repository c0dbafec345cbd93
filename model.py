"""
One bidirectional transformer, from the parity toy to LLaDA-8B.

Masked diffusion needs no causal mask: every position sees every other one and
the model predicts the original token wherever the input holds MASK. Two
switches set make the same class the paper's nanoGPT models (LayerNorm, GELU
MLP, learned positions, tied head) or, exactly, LLaDA-8B (RMSNorm in fp32,
SwiGLU, RoPE theta 500000, no biases, untied head). Module names follow
LLaDA's Hugging Face checkpoint, so its safetensors load after stripping
"model." (machinery/llada.py reads and writes that format).
"""
import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelConfig:
    vocab_size: int = 50304
    mask_id: int = 50257          # the MASK token; outside the tokenizer's real vocabulary
    block_size: int = 150         # longest sequence the model accepts
    n_layer: int = 8
    n_head: int = 8
    d_model: int = 512
    mlp_hidden: int = 2048
    norm: str = "layernorm"       # "layernorm" (nanoGPT) | "rmsnorm" (LLaDA)
    mlp: str = "gelu"             # "gelu" (nanoGPT) | "swiglu" (LLaDA)
    pos: str = "learned"          # "learned" (nanoGPT) | "rope" (LLaDA)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    bias: bool = True
    tie_weights: bool = True      # share the input embedding with the output head
    dropout: float = 0.0
    init_std: float = 0.02        # GPT-2's init scale

    def __post_init__(self):
        sizes = ("vocab_size", "block_size", "n_layer", "n_head", "d_model", "mlp_hidden")
        for name in sizes:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        choices = {"norm": ("layernorm", "rmsnorm"), "mlp": ("gelu", "swiglu"), "pos": ("learned", "rope")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_head {self.n_head}")
        if not 0 <= self.mask_id < self.vocab_size:
            raise ValueError(f"mask_id {self.mask_id} is outside the vocabulary of {self.vocab_size}")


PRESETS = {
    # a few thousand parameters: unit tests
    "tiny": ModelConfig(vocab_size=16, mask_id=15, block_size=32, n_layer=2, n_head=2, d_model=32, mlp_hidden=64),
    # (n, k) parity, §4.5: tokens {-1: 0, +1: 1, MASK: 2}; parity.py sets block_size = n + 1
    "parity": ModelConfig(vocab_size=3, mask_id=2, block_size=64, n_layer=2, n_head=4, d_model=128, mlp_hidden=512),
    # §5.1: nanoGPT-style ~50M on WikiText; GPT-2 BPE (50257 ids) + MASK = 50257, padded to 50304
    "wikitext-50m": ModelConfig(vocab_size=50304, mask_id=50257, block_size=150, n_layer=8, n_head=8,
                                d_model=512, mlp_hidden=2048),
    # a CPU-sized stand-in with the same vocabulary, for wikitext.py --preset cpu
    "wikitext-cpu": ModelConfig(vocab_size=50304, mask_id=50257, block_size=150, n_layer=2, n_head=4,
                                d_model=128, mlp_hidden=512),
    # wikitext.py --preset bytes: WikiText as raw bytes (256 values + MASK), a laptop-sized model
    "bytes": ModelConfig(vocab_size=257, mask_id=256, block_size=256, n_layer=3, n_head=4, d_model=128,
                         mlp_hidden=512),
    # §5.2: LLaDA-8B (Nie et al. 2025), the architecture of GSAI-ML/LLaDA-8B-Base
    "llada-8b": ModelConfig(vocab_size=126464, mask_id=126336, block_size=4096, n_layer=32, n_head=32,
                            d_model=4096, mlp_hidden=12288, norm="rmsnorm", mlp="swiglu", pos="rope",
                            rope_theta=500000.0, bias=False, tie_weights=False),
    # LLaDA's architecture and tokenizer at 0.47 B parameters (0.26 B of them the 126k-token embedding
    # and head): pretrain_8b.py --preset llada-proxy runs Fig. 4's comparison on one GPU
    "llada-proxy": ModelConfig(vocab_size=126464, mask_id=126336, block_size=2048, n_layer=16, n_head=16,
                               d_model=1024, mlp_hidden=2816, norm="rmsnorm", mlp="swiglu", pos="rope",
                               rope_theta=500000.0, bias=False, tie_weights=False),
}


PARAM_SEED_STRIDE = 100_003     # parameter i of a model seeded s draws from generator s * stride + i


def param_generator(seed, index, device):
    """The generator of parameter `index` of a model initialised with `seed`."""
    return torch.Generator(device).manual_seed(seed * PARAM_SEED_STRIDE + index)


def get_config(preset, **overrides):
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose from {sorted(PRESETS)}")
    return replace(PRESETS[preset], **overrides)


class RMSNorm(nn.Module):
    """LLaDA/OLMo RMSNorm: normalise in fp32 (bf16 squares lose precision), then scale."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def make_norm(cfg):
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


def rope(x, theta, pos=None):
    """Rotary embedding, rotate-half layout (LLaDA/OLMo/LLaMA-HF), angles in fp32. x: (B, H, L, hd);
    pos: (B, L) positions (default 0..L-1)."""
    L, hd = x.shape[-2], x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, hd, 2, device=x.device, dtype=torch.float32) / hd)
    pos = torch.arange(L, device=x.device) if pos is None else pos[:, None]       # (L,) or (B, 1, L)
    angles = pos.float()[..., None] * inv_freq
    cos, sin = torch.cat((angles.cos(),) * 2, -1), torch.cat((angles.sin(),) * 2, -1)
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)


class Block(nn.Module):
    """Pre-norm block: x + Attn(norm(x)), then x + MLP(norm(x)). Attention is bidirectional."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        d, b = cfg.d_model, cfg.bias
        self.attn_norm = make_norm(cfg)
        self.q_proj = nn.Linear(d, d, bias=b)
        self.k_proj = nn.Linear(d, d, bias=b)
        self.v_proj = nn.Linear(d, d, bias=b)
        self.attn_out = nn.Linear(d, d, bias=b)
        self.ff_norm = make_norm(cfg)
        self.ff_proj = nn.Linear(d, cfg.mlp_hidden, bias=b)       # SwiGLU: the gate
        if cfg.mlp == "swiglu":
            self.up_proj = nn.Linear(d, cfg.mlp_hidden, bias=b)
        self.ff_out = nn.Linear(cfg.mlp_hidden, d, bias=b)        # down projection
        self.dropout = nn.Dropout(cfg.dropout)

    def attention(self, x, pos=None, keys=None):
        B, L, d = x.shape
        H = self.cfg.n_head
        # (B, L, d) -> (B, H, L, d/H): one head per slice
        q, k, v = (proj(x).view(B, L, H, d // H).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj))
        if self.cfg.pos == "rope":
            q, k = rope(q, self.cfg.rope_theta, pos), rope(k, self.cfg.rope_theta, pos)
        drop = self.cfg.dropout if self.training else 0.0
        mask = None if keys is None else keys[:, None, None, :]        # (B, 1, 1, L): padding keys never attended to
        # bidirectional: every position attends to every (unpadded) position; (B, H, L, d/H)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop, is_causal=False)
        return self.attn_out(y.transpose(1, 2).reshape(B, L, d))     # heads joined again: (B, L, d)

    def mlp(self, x):
        if self.cfg.mlp == "swiglu":
            return self.ff_out(F.silu(self.ff_proj(x)) * self.up_proj(x))
        return self.ff_out(F.gelu(self.ff_proj(x)))

    def forward(self, x, pos=None, keys=None):
        x = x + self.dropout(self.attention(self.attn_norm(x), pos, keys))
        return x + self.dropout(self.mlp(self.ff_norm(x)))


class Transformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        parts = dict(wte=nn.Embedding(cfg.vocab_size, cfg.d_model),
                     blocks=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
                     ln_f=make_norm(cfg),
                     ff_out=nn.Linear(cfg.d_model, cfg.vocab_size, bias=False))
        if cfg.pos == "learned":
            parts["wpe"] = nn.Embedding(cfg.block_size, cfg.d_model)
        self.transformer = nn.ModuleDict(parts)
        if cfg.tie_weights:
            self.transformer.ff_out.weight = self.transformer.wte.weight
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, seed=None):
        """GPT-2 init (init_param_) of every parameter. seed=None draws from the global RNG; with a
        seed, every parameter has a generator of its own (param_generator), so no draw depends on
        another parameter's and a sharded model can be given exactly these weights
        (fsdp.init_sharded draws each parameter whole and keeps its shard)."""
        for i, (name, p) in enumerate(self.named_parameters()):
            self.init_param_(name, p, None if seed is None else param_generator(seed, i, p.device))

    @torch.no_grad()
    def init_param_(self, name, p, generator=None):
        """The init of one parameter, in place: N(0, init_std) for matrices and embeddings, the
        residual projections (attn_out, ff_out of a block) scaled by 1/sqrt(2 * n_layer) (GPT-2),
        biases 0, norm scales 1."""
        if name.endswith(("attn_out.weight", "ff_out.weight")) and ".blocks." in name:
            nn.init.normal_(p, std=self.cfg.init_std / math.sqrt(2 * self.cfg.n_layer), generator=generator)
        elif p.dim() >= 2:
            nn.init.normal_(p, std=self.cfg.init_std, generator=generator)
        elif name.endswith("bias"):
            nn.init.zeros_(p)
        else:
            nn.init.ones_(p)

    def forward(self, idx, output_mask=None, attention_mask=None):
        """idx (B, L) token ids -> logits (B, L, V).

        output_mask (bool, B x L): run the output head only where it is True and
        return (n_true, V) logits in row-major order. The MD loss needs logits
        only at masked positions, so at small t this skips most of the
        d_model x vocab matmul, the costliest layer of a small model.

        attention_mask (B x L, 1 = token, 0 = padding): padding is never attended to,
        and positions count real tokens only, so a left-padded row gives what the
        row gives alone (learned positions included; RoPE is relative anyway).
        """
        B, L = idx.shape
        if L > self.cfg.block_size:
            raise ValueError(f"sequence length {L} exceeds the model's block_size {self.cfg.block_size}")
        pos = keys = None
        if attention_mask is not None:
            keys = attention_mask.bool()
            pos = (keys.long().cumsum(1) - 1).clamp_min(0)
        x = self.transformer.wte(idx)
        if self.cfg.pos == "learned":
            x = x + self.transformer.wpe(torch.arange(L, device=idx.device) if pos is None else pos)
        for block in self.transformer.blocks:
            x = block(x, pos, keys)
        x = self.transformer.ln_f(x)                 # (B, L, d)
        if output_mask is not None:
            x = x[output_mask]                           # (n_true, d), row-major
        return self.transformer.ff_out(x)                # (B, L, V) or (n_true, V)

    # ---- what a training script needs from a model --------------------------------

    def num_params(self, non_embedding=False):
        """Parameter count (shared tensors once). non_embedding drops the lookup tables."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wte.weight.numel() * (not self.cfg.tie_weights)
            n -= self.transformer.wpe.weight.numel() if "wpe" in self.transformer else 0
        return n

    def flops_per_token(self, seq_len, head_fraction=1.0):
        """Training FLOPs per token (forward + backward), PaLM/nanoGPT accounting:
        6 per matmul weight, plus 12 * n_layer * d_model * seq_len for attention
        scores and values (bidirectional: the full L x L, no causal halving).
        head_fraction: share of positions that run the output head (masked-only head)."""
        cfg = self.cfg
        head = cfg.vocab_size * cfg.d_model
        body = self.num_params(non_embedding=True) - head
        return 6 * (body + head_fraction * head) + 12 * cfg.n_layer * cfg.d_model * seq_len

    def configure_optimizer(self, lr, weight_decay, betas=(0.9, 0.95), device_type="cpu", fused=None):
        """AdamW; weight decay on matrices and embeddings only, never on norms or biases. fused
        (default on CUDA) also lets a step be skipped on the device (`found_inf`, as GradScaler)."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=(device_type == "cuda") if fused is None else fused)


# Dense bf16 peaks from NVIDIA's data sheets, matched in this order against the card's name: the
# PCIe and NVL H100s are slower than the SXM one ("NVIDIA H100 80GB HBM3"), which is matched last.
PEAK_FLOPS = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
              ("GH200", 989e12), ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12)]


def device_peak_flops(device):
    """Peak bf16 FLOP/s of the current CUDA card, or None where we have no honest number (CPU)."""
    if not (str(device).startswith("cuda") and torch.cuda.is_available()):
        return None
    return peak_flops_of(torch.cuda.get_device_name(device))


def peak_flops_of(name):
    return next((v for k, v in PEAK_FLOPS if k in name), None)


def estimate_mfu(flops_per_token, tokens_per_sec, peak_flops):
    """Model FLOPs utilisation: achieved training FLOP/s over the card's peak (None without a peak)."""
    return None if not peak_flops else flops_per_token * tokens_per_sec / peak_flops


# ---- LLaDA's reverse process (sampler) ------------------------------------------------

def transfer_schedule(n_masked, steps):
    """How many tokens to unmask at each of `steps` steps: n_masked split as evenly as
    possible, the remainder going to the earliest steps. n_masked: (B,) -> (B, steps)."""
    base = n_masked[:, None] // steps
    extra = torch.arange(steps, device=n_masked.device)[None, :] < (n_masked % steps)[:, None]
    return base + extra.long()


@torch.no_grad()
def generate(model, prompt, *, mask_id, gen_length=128, steps=128, block_length=128, temperature=0.0,
             cfg_scale=0.0, remasking="low_confidence", attention_mask=None, eos_id=None, eot_id=None,
             logits_eos_inf=False, confidence_eos_eot_inf=False):
    """LLaDA's sampler (Nie et al. 2025, Alg. 4/5): append gen_length MASKs to the
    prompt; fill them block by block (semi-autoregressive, left to right), each
    block in steps / n_blocks steps. At every step the model predicts all masked
    tokens, and the most confident (or random) predictions are kept while the
    rest stay masked ("low-confidence remasking").

    temperature: 0 is greedy; > 0 samples with Gumbel noise in float64 (low-precision
    Gumbel-max lowers perplexity but hurts generation quality: arXiv:2409.02908, the source
    LLaDA's generate.py cites for its float64). cfg_scale > 0 adds
    classifier-free guidance against the prompt-masked input.
    attention_mask (B x P, 1 = token): left-padded prompts of unequal length; each
    row then gives the tokens it gives alone (the model ignores padding keys and
    counts positions from its first token).
    logits_eos_inf: EOS (eos_id) is never predicted. confidence_eos_eot_inf, as LLaDA's
    generate.py defines it: after the pick, the EOS and end-of-turn (eot_id) logits are
    set to -inf before the confidence softmax, so an EOS/EoT pick has confidence 0 and
    every other pick's confidence is renormalised without them. (At temperature > 0
    LLaDA's chained assignment reaches only the EoT logit of the un-noised logits; we
    do the same, so that both temperatures match it.)

    Ties in confidence (several EOS/EoT picks at exactly 0, say) go to the leftmost
    position: a stable sort, so a left-padded row picks what it picks alone. LLaDA's
    torch.topk leaves the order of ties unspecified. Only masked positions of the
    current block run the output head: the others cannot be picked. The confidence
    softmax runs in float64, where LLaDA's current generate.py uses the model's dtype:
    bf16 ties can then break differently. MASK itself is never predicted (LLaDA's
    trained model never does; its sampler does not forbid it).
    """
    if gen_length % block_length or steps % (gen_length // block_length):
        raise ValueError("gen_length must be a multiple of block_length, and steps of the number of blocks")
    B, P = prompt.shape
    x = torch.full((B, P + gen_length), mask_id, dtype=torch.long, device=prompt.device)
    x[:, :P] = prompt
    is_prompt = torch.zeros_like(x, dtype=torch.bool)
    is_prompt[:, :P] = True
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask.to(x.device).long(),
                                    torch.ones(B, gen_length, dtype=torch.long, device=x.device)], 1)
    position = torch.arange(x.shape[1], device=x.device)
    n_blocks = gen_length // block_length
    for blk in range(n_blocks):
        lo, hi = P + blk * block_length, P + (blk + 1) * block_length
        schedule = transfer_schedule((x[:, lo:hi] == mask_id).sum(1), steps // n_blocks)
        for i in range(steps // n_blocks):
            pick = (x == mask_id) & (position < hi)       # later blocks wait their turn
            if cfg_scale > 0:
                unconditional = x.masked_fill(is_prompt, mask_id)
                am = None if attention_mask is None else attention_mask.repeat(2, 1)
                cond, uncond = model(torch.cat([x, unconditional]), output_mask=pick.repeat(2, 1),
                                     attention_mask=am).chunk(2)
                logits = uncond + (cfg_scale + 1) * (cond - uncond)
            else:
                logits = model(x, output_mask=pick, attention_mask=attention_mask)
            logits = logits.double()
            logits[:, mask_id] = -math.inf                       # never "predict" MASK itself
            if logits_eos_inf:
                logits[:, eos_id] = -math.inf
            if temperature > 0:   # Gumbel-max: argmax(logits / T + G) samples softmax(logits / T)
                u = torch.rand_like(logits).clamp_min(1e-300)
                pred = (logits / temperature - torch.log(-torch.log(u))).argmax(-1)
            else:
                pred = logits.argmax(-1)
            if confidence_eos_eot_inf:      # LLaDA: after the pick, before the confidence softmax
                logits[:, [eos_id, eot_id] if temperature == 0 else [eot_id]] = -math.inf
            if remasking == "low_confidence":
                conf = F.softmax(logits, -1).gather(-1, pred[:, None])[:, 0]
            elif remasking == "random":
                conf = torch.rand(pred.shape, device=x.device, dtype=torch.float64)
            else:
                raise ValueError(f"remasking must be 'low_confidence' or 'random', got {remasking!r}")
            confidence = torch.full(x.shape, -math.inf, dtype=torch.float64, device=x.device)
            confidence[pick] = conf
            proposal = x.clone()
            proposal[pick] = pred
            rank = confidence.argsort(dim=1, descending=True, stable=True).argsort(1)   # ties: leftmost first
            keep = (rank < schedule[:, i:i + 1]) & pick           # the k most confident masked tokens
            x = torch.where(keep, proposal, x)
    return x
