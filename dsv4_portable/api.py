"""Public Python API: load a checkpoint directory onto a backend, run forward / decode / generate.

    from dsv4_portable import load_model
    m = load_model("path/to/DeepSeek-V4-Flash", device="cuda")     # or "cpu", "ascend"; "tiny" = built-in model
    out = m.generate(["Hello"], max_new_tokens=32)                    # text if the checkpoint has tokenizer.json
    logits = m.forward(ids, all_logits=True)                          # float32 [B, S, vocab]
"""
from __future__ import annotations

import pathlib
import sys

import torch

from .config import ModelConfig, load_config
from .model.cache import KVCache, python_arg
from .model.checkpoint import WEIGHT_MODES, CheckpointError, load_params
from .model.generate import Generation, generate
from .model.transformer import ModelInputError, Transformer
from .registry import use_backend

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32,
          "fp16": torch.float16, "float16": torch.float16}


def parse_dtype(dtype, arg=python_arg) -> torch.dtype:
    """An activation dtype: a name in DTYPES, or a torch.dtype as given; ValueError naming the choices. The CLI
    runs this on --dtype before loading anything (arg: how the argument is spelled, see cache.python_arg)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"{arg('dtype')} {dtype!r} is unknown (choose {', '.join(DTYPES)})")
    return DTYPES[dtype]


class Model:
    """A loaded model on one backend, with its tokenizer when the checkpoint ships tokenizer.json."""

    def __init__(self, net: Transformer, backend: str, path: pathlib.Path | None, tokenizer=None):
        self.net, self.backend, self.path, self.tokenizer = net, backend, path, tokenizer

    @property
    def config(self) -> ModelConfig:
        return self.net.cfg

    def new_cache(self, batch: int, max_len: int, layout: str = "auto") -> KVCache:
        return self.net.new_cache(batch, max_len, layout)

    def forward(self, input_ids, cache: KVCache | None = None, all_logits: bool = False):
        """Logits (float32) for new tokens; with a cache this continues from cache.pos (decode / chunked prefill)."""
        with use_backend(self.backend, require_available=False):   # checked at load
            return self.net.forward(_as_ids(input_ids), cache, all_logits)

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ModelInputError("this checkpoint has no tokenizer.json: pass token ids instead of text")
        return self.tokenizer.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else " ".join(map(str, ids))

    def generate(self, prompts, max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, stop_tokens=None, cache_layout: str = "auto",
                 progress: bool = False) -> Generation:
        """prompts: a list of strings (needs a tokenizer) or of token-id lists."""
        if isinstance(prompts, (str, torch.Tensor)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        ids = [self.encode(p) if isinstance(p, str) else [int(t) for t in p] for p in prompts]
        with use_backend(self.backend, require_available=False):   # checked at load
            out = generate(self.net, ids, max_new_tokens, temperature, top_p, seed, stop_tokens, cache_layout,
                           progress)
        if self.tokenizer is not None:
            out.texts = [self.tokenizer.decode(t) for t in out.tokens]
        return out


def _as_ids(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x if x.dim() == 2 else x.view(1, -1)
    return torch.tensor(x if x and isinstance(x[0], (list, tuple)) else [x], dtype=torch.int64)


def load_model(path: str | pathlib.Path = "tiny", device: str = "cpu", dtype="bf16", weights: str = "auto",
               quant_sim: bool = True, quiet: bool = False, keep_expert=None) -> Model:
    """Load a checkpoint directory (or "tiny", the built-in model) onto `device` (cpu, cuda or ascend).

    dtype: activation dtype (bf16 default; fp32 for exact comparisons). weights: auto (the default: the backend
    decides, see `Backend.weight_mode`: native on cpu; on cuda fp8 below compute capability 10, where GPUs have
    no FP4 matrix units, else native; on ascend bf16 on A2/A3, native on the 950), native (keep FP8/FP4), bf16
    (dequantise at load), fp8 (FP4 experts -> FP8, lossless) or int8 (W8A8 dense linears, bf16 experts).
    The choice and its reason are printed and kept in `model.weight_note`. quant_sim: DeepSeek's QAT simulation
    (on by default). keep_expert(layer, expert) -> bool: load only these routed experts (expert parallelism;
    see model.checkpoint.load_params for the contract)."""
    dtype = parse_dtype(dtype)
    # The model's backend is active while it loads and while its own methods run; the caller's stays as it was.
    with use_backend(device) as backend:      # fails here, with the reason, if the device cannot run
        if weights != "auto" and weights not in WEIGHT_MODES:
            raise CheckpointError(f"unknown weight mode {weights!r} (choose auto, {', '.join(WEIGHT_MODES)})")
        weights, weight_note = backend.weight_mode(weights)
        if not quiet:
            print(f"weights: {weight_note}", file=sys.stderr)
        if str(path) == "tiny":
            from .model.tiny import tiny_checkpoint
            path = tiny_checkpoint(quiet=quiet)
        path = pathlib.Path(path)
        if not path.is_dir():
            raise CheckpointError(f"checkpoint directory {path} does not exist")
        cfg = load_config(path)
        tdev = backend.torch_device()
        params = load_params(path, cfg, dtype, tdev, weights, quiet, keep_expert)
        if backend.name == "ascend":           # the vendor ops' layouts, made once at load
            from .backends.ascend.weights import prepare_weights
            params = prepare_weights(params)
        tokenizer = None
        if (path / "tokenizer.json").exists():
            from tokenizers import Tokenizer
            tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        model = Model(Transformer(cfg, params, dtype, tdev, quant_sim), device, path, tokenizer)
        model.weights, model.weight_note = weights, weight_note
        return model
