"""Token generation: greedy or temperature / top-p sampling with a seed, stop tokens, max tokens, with timings."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import torch

from ..config import ModelConfig
from .cache import python_arg
from .transformer import ModelInputError, Transformer


@dataclass
class Generation:
    """Generated tokens per prompt (prompt excluded) and throughput figures."""
    tokens: list[list[int]]
    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_tokens: int = 0
    decode_s: float = 0.0
    cache_bytes: int = 0
    cache_bytes_per_token: float = 0.0
    cache_layout: str = ""
    texts: list[str] = field(default_factory=list)

    @property
    def prefill_tps(self) -> float:
        return self.prefill_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tps(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s else 0.0


def sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None) -> torch.Tensor:
    """Next token per row from float32 logits [B, V]: argmax when temperature is 0, else nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float().cpu() / temperature, -1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p       # keep the smallest prefix reaching top_p
        sorted_p = sorted_p.masked_fill(drop, 0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1).to(logits.device)


def check_generate_args(cfg: ModelConfig, prompts: list, max_new_tokens: int, temperature: float, top_p: float,
                        arg=python_arg) -> None:
    """Every problem of generate's arguments that their Python values show, before any work (ModelInputError).
    prompts: token-id lists; a text prompt (str, not yet tokenised) is only checked to be non-empty. The CLI runs
    this before loading the model, with its flags' spelling (arg, see cache.python_arg)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ModelInputError(f"{arg('prompts')}: generate needs at least one prompt, and none may be empty")
    if max_new_tokens < 1:
        raise ModelInputError(f"{arg('max_new_tokens')} must be >= 1, got {max_new_tokens}")
    if not temperature >= 0:                 # written so that NaN fails too
        raise ModelInputError(f"{arg('temperature')} must be >= 0 (0: greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ModelInputError(f"{arg('top_p')} must be in (0, 1], got {top_p}")
    ids = [p for p in prompts if not isinstance(p, str)]
    v = cfg.vocab_size
    bad = sorted({t for p in ids for t in p if not 0 <= t < v})
    if bad:
        raise ModelInputError(f"{arg('prompts')}: token ids must be in [0, {v}); got {', '.join(map(str, bad[:8]))}"
                              + (" ..." if len(bad) > 8 else ""))
    longest = max((len(p) for p in ids), default=0)
    if ids and longest + max_new_tokens > cfg.max_position_embeddings:
        raise ModelInputError(f"{arg('prompts')}: the longest prompt ({longest} tokens) + {arg('max_new_tokens')} "
                              f"{max_new_tokens} = {longest + max_new_tokens} exceeds max_position_embeddings "
                              f"{cfg.max_position_embeddings}")


def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int = 32, temperature: float = 0.0,
             top_p: float = 1.0, seed: int | None = None, stop_tokens: tuple[int, ...] | None = None,
             cache_layout: str = "auto", progress: bool = False) -> Generation:
    """Generate for each prompt (lists of token ids). Prompts of equal length are decoded as one batch; a batch
    stops when every row has produced a stop token or max_new_tokens."""
    cfg = model.cfg
    # here, on the lists (ids included): the forwards below skip the device-side range check
    check_generate_args(cfg, prompts, max_new_tokens, temperature, top_p)
    stops = set(stop_tokens if stop_tokens is not None else ([cfg.eos_token_id] if cfg.eos_token_id is not None else []))
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    out = Generation(tokens=[[] for _ in prompts])
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(len(p), []).append(i)
    for length, rows in groups.items():
        ids = torch.tensor([prompts[i] for i in rows], dtype=torch.int64, device=model.device)
        cache = model.new_cache(len(rows), length + max_new_tokens, cache_layout)
        t0 = time.perf_counter()
        logits = model.forward(ids, cache, check_ids=False)
        _sync(model.device)
        out.prefill_s += time.perf_counter() - t0
        out.prefill_tokens += ids.numel()
        done = torch.zeros(len(rows), dtype=torch.bool)
        t0 = time.perf_counter()
        for step in range(max_new_tokens):
            nxt = sample(logits, temperature, top_p, gen)
            toks = nxt.tolist()                 # the one host read per step: tokens are the output
            for j, (r, tok) in enumerate(zip(rows, toks)):
                if not done[j]:
                    out.tokens[r].append(tok)
            done |= torch.tensor([t in stops for t in toks])
            if progress and (sys.stderr.isatty() or (step + 1) % 16 == 0 or step + 1 == max_new_tokens
                             or bool(done.all())):
                # a live counter on a terminal; one line every 16 tokens in a log
                end = "" if sys.stderr.isatty() else "\n"
                print(f"\rdecoding: {step + 1}/{max_new_tokens} tokens", end=end, file=sys.stderr, flush=True)
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            logits = model.forward(nxt.view(-1, 1), cache, check_ids=False)   # sampled: in range by construction
            out.decode_tokens += len(rows)
        _sync(model.device)
        out.decode_s += time.perf_counter() - t0
        if progress and sys.stderr.isatty():
            print(file=sys.stderr)
        out.cache_bytes = max(out.cache_bytes, cache.nbytes())
        out.cache_bytes_per_token = cache.bytes_per_token()
        out.cache_layout = cache.layout
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "npu":
        torch.npu.synchronize()
