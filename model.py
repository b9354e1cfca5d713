"""A small Llama: RMSNorm, rotary embeddings, SwiGLU and grouped-query attention.

The parameter names and the rotary convention follow llama2.c's checkpoints (consecutive pairs
(x[2i], x[2i+1]) are rotated), so published llama2.c-family `.bin` files load into this module
unchanged, and export.py writes what run.c reads.

    python model.py                      # list the presets with their parameter counts
    python model.py --preset=stories15M  # one preset's full arguments

Use from Python:

    from model import Transformer, model_args_from_preset
    model = Transformer(model_args_from_preset("stories15M"))
    logits, loss = model(tokens, targets)           # tokens, targets: (B, T) int64
    out = model.generate(prompt_ids, 200, temperature=0.8, top_p=0.9, eos_id=2)
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import sys
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from options import OptionError, UserError, apply_options, cli, opt, render_help


@dataclass
class ModelArgs:
    dim: int = 288
    n_layers: int = 6
    n_heads: int = 6
    n_kv_heads: Optional[int] = None  # None: same as n_heads (plain multi-head attention)
    vocab_size: int = 5000
    hidden_dim: Optional[int] = None  # FFN width; None: Llama's rule from dim and multiple_of
    multiple_of: int = 32  # hidden_dim is rounded up to a multiple of this
    norm_eps: float = 1e-5
    max_seq_len: int = 256
    dropout: float = 0.0
    rope_theta: float = 10000.0
    tie_embeddings: bool = True  # the classifier shares the token embedding matrix

    def resolved(self) -> "ModelArgs":
        """A copy with n_kv_heads and hidden_dim filled in, after checking the shapes fit."""
        n_kv_heads = self.n_heads if self.n_kv_heads is None else self.n_kv_heads
        hidden_dim = self.hidden_dim
        if hidden_dim is None:
            # Llama's FFN: 2/3 of 4*dim (SwiGLU has three matrices instead of two), rounded up.
            hidden_dim = int(2 * (4 * self.dim) / 3)
            hidden_dim = self.multiple_of * ((hidden_dim + self.multiple_of - 1) // self.multiple_of)
        args = dataclasses.replace(self, n_kv_heads=n_kv_heads, hidden_dim=hidden_dim)
        args.validate()
        return args

    def validate(self) -> None:
        n_kv = self.n_heads if self.n_kv_heads is None else self.n_kv_heads
        problems = []
        for name in ("dim", "n_layers", "n_heads", "vocab_size", "max_seq_len"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be >= 1")
        if n_kv < 1:
            problems.append(f"n_kv_heads={n_kv} must be >= 1")
        if self.n_heads >= 1 and self.dim % self.n_heads:
            problems.append(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        elif self.n_heads >= 1 and (self.dim // self.n_heads) % 2:
            problems.append(f"head size dim/n_heads={self.dim // self.n_heads} must be even for rotary embeddings")
        if n_kv >= 1 and self.n_heads % n_kv:
            problems.append(f"n_heads={self.n_heads} is not divisible by n_kv_heads={n_kv}")
        if self.hidden_dim is not None and self.hidden_dim < 1:
            problems.append(f"hidden_dim={self.hidden_dim} must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout={self.dropout} must be in [0, 1)")
        if problems:
            raise ValueError("bad model arguments: " + "; ".join(problems))

    @property
    def head_size(self) -> int:
        return self.dim // self.n_heads


# Architecture presets. The stories* shapes are those of the published llama2.c and Chinese
# tinyllamas models (vocab 5000 for our own sentencepiece vocab); "gqa" is the seed blog's
# grouped-query configuration; the small ones learn the built-in corpus on a laptop CPU.
PRESETS: dict[str, dict] = {
    "stories260K": dict(dim=64, n_layers=5, n_heads=8, n_kv_heads=4, vocab_size=512, max_seq_len=512,
                        multiple_of=4),
    "stories15M": dict(dim=288, n_layers=6, n_heads=6, n_kv_heads=6, vocab_size=5000, max_seq_len=256),
    "stories42M": dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=8, vocab_size=5000, max_seq_len=1024),
    "stories110M": dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=12, vocab_size=5000, max_seq_len=1024),
    "gqa": dict(dim=256, hidden_dim=768, n_layers=4, n_heads=16, n_kv_heads=8, vocab_size=5000,
                max_seq_len=512, norm_eps=1e-6),
    # About 1M parameters: the demo trains it on 2 CPU cores in a few minutes.
    "tiny": dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=3000, max_seq_len=256),
    # About 0.1M parameters, for tests and smoke runs.
    "micro": dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, max_seq_len=64),
}


def model_args_from_preset(name: str, **overrides) -> ModelArgs:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from: {', '.join(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(ModelArgs)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown model argument(s) {unknown}; valid: {', '.join(sorted(fields))}")
    return ModelArgs(**{**PRESETS[name], **overrides})


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 even under autocast: the mean of squares loses precision in bf16.
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return out.type_as(x) * self.weight


def rope_tables(head_size: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each (max_seq_len, head_size // 2), for pair i of each head."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_size, 2, dtype=torch.float32) / head_size))
    t = torch.arange(max_seq_len, dtype=torch.float32)
    angles = torch.outer(t, inv_freq)  # (T, hs/2)
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (x[2i], x[2i+1]) of each head. x: (B, T, H, hs); cos, sin: (T, hs/2)."""
    xf = x.float().reshape(*x.shape[:-1], -1, 2)
    x0, x1 = xf[..., 0], xf[..., 1]  # (B, T, H, hs/2)
    c = cos[None, :, None, :]
    s = sin[None, :, None, :]
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1)
    return out.flatten(-2).type_as(x)


class Attention(nn.Module):
    # Set on an instance to a function applied to keys and values as they enter the cache: tests
    # use it to reproduce an inference engine that stores them in lower precision (run.c's fp16
    # KV cache). None in training and normal inference.
    kv_round = None

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_kv_heads
        self.head_size = args.dim // args.n_heads
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_size, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * self.head_size, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * self.head_size, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_size, args.dim, bias=False)
        self.dropout = args.dropout
        self.resid_dropout = nn.Dropout(args.dropout)

    def forward(self, x, cos, sin, cache: Optional[dict] = None, start_pos: int = 0):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_size)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_size)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_size)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        if self.kv_round is not None:
            k, v = self.kv_round(k), self.kv_round(v)
        if cache is not None:
            # Keys and values of earlier positions, (B, start_pos + T, n_kv_heads, hs).
            cache["k"][:B, start_pos:start_pos + T] = k
            cache["v"][:B, start_pos:start_pos + T] = v
            k = cache["k"][:B, :start_pos + T]
            v = cache["v"][:B, :start_pos + T]
        if self.n_kv_heads != self.n_heads:
            # Each kv head serves n_heads / n_kv_heads query heads, in blocks (as run.c indexes them).
            rep = self.n_heads // self.n_kv_heads
            k = k.repeat_interleave(rep, dim=2)
            v = v.repeat_interleave(rep, dim=2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, hs)
        drop = self.dropout if self.training else 0.0
        if start_pos == 0:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=True)
        else:
            # Decoding with a cache: new query t may see cached keys up to start_pos + t.
            S = k.shape[2]
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=start_pos)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
        y = y.transpose(1, 2).reshape(B, T, -1)
        return self.resid_dropout(self.wo(y))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.dropout = nn.Dropout(args.dropout)

    def forward(self, x):
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, cache=None, start_pos=0):
        h = x + self.attention(self.attention_norm(x), cos, sin, cache, start_pos)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        args = args.resolved()
        self.params = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.dropout = nn.Dropout(args.dropout)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rope_tables(args.head_size, args.max_seq_len, args.rope_theta)
        # Not saved in checkpoints: they are a function of the arguments.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

        self.apply(self._init_weights)
        # GPT-2's scaled init for the projections that add into the residual stream.
        for name, p in self.named_parameters():
            if name.endswith("wo.weight") or name.endswith("w2.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * args.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # shared tensors are counted once

    def forward(self, tokens: torch.Tensor, targets: Optional[torch.Tensor] = None, *,
                cache: Optional[list] = None, start_pos: int = 0):
        """tokens: (B, T) ids. Returns (logits (B, T, vocab), loss or None)."""
        B, T = tokens.shape
        if start_pos + T > self.params.max_seq_len:
            raise ValueError(f"sequence of {start_pos + T} tokens exceeds max_seq_len={self.params.max_seq_len}")
        h = self.dropout(self.tok_embeddings(tokens))  # (B, T, dim)
        cos = self.rope_cos[start_pos:start_pos + T]
        sin = self.rope_sin[start_pos:start_pos + T]
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, None if cache is None else cache[i], start_pos)
        logits = self.output(self.norm(h))  # (B, T, vocab)
        loss = None
        if targets is not None:
            # Targets of -1 (instruction tokens, tinystories.TokenBatches) are left out; a batch
            # holding no other target gives loss 0, not the NaN of an empty mean.
            flat = targets.reshape(-1)
            total = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), flat, ignore_index=-1,
                                    reduction="sum")
            loss = total / (flat != -1).sum().clamp(min=1)
        return logits, loss

    def new_cache(self, batch_size: int, device=None, dtype=None) -> list:
        p = self.params
        device = device or self.tok_embeddings.weight.device
        dtype = dtype or self.tok_embeddings.weight.dtype
        shape = (batch_size, p.max_seq_len, p.n_kv_heads, p.head_size)
        return [{"k": torch.zeros(shape, device=device, dtype=dtype),
                 "v": torch.zeros(shape, device=device, dtype=dtype)} for _ in range(p.n_layers)]

    def configure_optimizers(self, weight_decay: float, learning_rate: float, betas, device_type: str):
        # Decay matrices (linear weights, embeddings); leave gains (RMSNorm weights) alone.
        params = {n: p for n, p in self.named_parameters() if p.requires_grad}
        decay = [p for p in params.values() if p.dim() >= 2]
        no_decay = [p for p in params.values() if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
        extra = {"fused": True} if fused else {}
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **extra)

    def estimate_mfu(self, fwdbwd_per_iter: float, dt: float, peak_flops: float = 312e12) -> float:
        """Model FLOPs utilisation as a fraction of peak_flops (default: A100 bf16)."""
        p = self.params
        N = self.num_params()
        L, H, Q, T = p.n_layers, p.n_heads, p.head_size, p.max_seq_len
        # 6N per token for the matmuls forward and backward, plus attention's 12*L*H*Q*T (PaLM, appendix B).
        flops_per_token = 6 * N + 12 * L * H * Q * T
        flops_per_iter = flops_per_token * T * fwdbwd_per_iter
        return flops_per_iter / dt / peak_flops

    @torch.inference_mode()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None,
                 eos_id: Optional[int] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Continue idx (B, T) by up to max_new_tokens tokens, using a KV cache.

        temperature 0 is greedy. Stops early once every row has produced eos_id (rows that finish
        first are padded with eos_id). Never runs past max_seq_len.
        """
        B, T = idx.shape
        if T == 0:
            raise ValueError("generate needs at least one prompt token (e.g. BOS)")
        max_new_tokens = min(max_new_tokens, self.params.max_seq_len - T)
        cache = self.new_cache(B)
        out = idx
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        logits, _ = self(idx, cache=cache, start_pos=0)
        pos = T
        for _ in range(max(max_new_tokens, 0)):
            nxt = sample_next(logits[:, -1, :], temperature=temperature, top_k=top_k, top_p=top_p,
                              generator=generator)  # (B, 1)
            if eos_id is not None:
                nxt = torch.where(done[:, None], torch.full_like(nxt, eos_id), nxt)
                done |= nxt[:, 0] == eos_id
            out = torch.cat((out, nxt), dim=1)
            if eos_id is not None and bool(done.all()):
                break
            if pos >= self.params.max_seq_len:
                break
            logits, _ = self(nxt, cache=cache, start_pos=pos)
            pos += 1
        return out


def non_finite_weight(model: nn.Module) -> Optional[str]:
    """None if every parameter is finite, else which tensor is not, e.g. "layers.0.attention.wq.weight
    holds nan at (3, 17)": what the loaders report, since a NaN weight only shows later as garbage."""
    for name, p in model.named_parameters():
        bad = ~torch.isfinite(p.detach())
        if bool(bad.any()):
            where = tuple(int(i) for i in bad.nonzero()[0])
            value = p.detach()[where].item()
            return f"{name} holds {value} at {where if len(where) > 1 else where[0]}"
    return None


def pick_device(name: str, local_rank: Optional[int] = None) -> str:
    """The torch device for --device=name: auto is cuda when there is a GPU, else cpu.

    local_rank (a torchrun process's GPU) turns cuda into cuda:<local_rank>. UserError naming the
    option when the device does not exist here."""
    device = name
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UserError(f"--device={name}: no CUDA GPU is available (use --device=cpu)")
        index = device.partition(":")[2]
        if index and not (index.isdigit() and int(index) < torch.cuda.device_count()):
            raise UserError(f"--device={name}: no such GPU ({torch.cuda.device_count()} here)")
        if local_rank is not None:
            device = f"cuda:{local_rank}"
    elif device == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise UserError(f"--device={name}: MPS is not available here (use --device=cpu)")
    elif device != "cpu":
        raise OptionError(f"--device={name}: must be auto, cpu, cuda, cuda:N or mps")
    return device


def sample_next(logits: torch.Tensor, *, temperature: float, top_k: Optional[int] = None,
                top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One token per row from logits (B, vocab): greedy at temperature 0, else top-k / nucleus sampling."""
    if temperature == 0.0:
        return torch.argmax(logits, dim=-1, keepdim=True)
    logits = logits.float()
    # Shifted so that the largest is 0 before scaling: a tiny temperature then sends the others
    # to -inf (greedy in the limit) instead of overflowing to inf - inf = nan.
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if top_k is not None and 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        before = torch.cumsum(sorted_p, dim=-1) - sorted_p
        sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator)


@dataclass
class ModelCliConfig:
    preset: str = opt("", "show this preset's full arguments; \"\": list every preset")


def show_presets(cfg: ModelCliConfig) -> int:
    for name in [cfg.preset] if cfg.preset else list(PRESETS):
        try:
            args = model_args_from_preset(name).resolved()
        except ValueError as e:
            raise OptionError(f"--preset={name}: {e}") from None
        with torch.device("meta"):
            n = Transformer(args).num_params()
        print(f"{name:12s} {n / 1e6:8.2f}M params  {dataclasses.asdict(args)}")
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] in (["-h"], ["--help"]):
        print(render_help(ModelCliConfig, "python model.py [--preset=NAME]", __doc__))
        return 0
    return cli("model.py", lambda: show_presets(apply_options(ModelCliConfig(), argv)))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
