"""Load a causal LM and its tokenizer: the embedded SmolLM2 or any Hugging Face id or path."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ..model_source import model_source

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str  # the id clients send in "model"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def n_layers(self) -> int:
        return self.model.config.get_text_config().num_hidden_layers

    @property
    def eos_ids(self) -> set[int]:
        """The tokens that end an answer: the tokenizer's and the generation config's."""
        ids = {self.tokenizer.eos_token_id}
        configured = self.model.generation_config.eos_token_id
        ids.update(configured if isinstance(configured, list) else [configured])
        return {i for i in ids if i is not None}

    @property
    def vocab_size(self) -> int:
        """Rows of the input embedding: the token ids this model can take."""
        return self.model.get_input_embeddings().num_embeddings

    def kv_bytes_per_token(self) -> int:
        config = self.model.config.get_text_config()
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return 2 * config.num_hidden_layers * heads * head_dim * self.model.dtype.itemsize

    @property
    def context_length(self) -> int:
        return int(getattr(self.model.config.get_text_config(), "max_position_embeddings", 2048))


CPU_KV_CACHE_TOKENS = 65536


def kv_cache_budget(loaded: LoadedModel, tokens: int | None, gpu_memory_utilization: float) -> int:
    """KV cache tokens the engine may hold at once: the flag, else a share of free GPU memory
    (measured after the weights are loaded), else a fixed figure on CPU."""
    if tokens is not None:
        return tokens
    if loaded.device.type != "cuda":
        return CPU_KV_CACHE_TOKENS
    free, _ = torch.cuda.mem_get_info(loaded.device)
    # Keep a tenth back for activations and the allocator's slack.
    return max(1, int(free * gpu_memory_utilization * 0.9) // loaded.kv_bytes_per_token())


def resolve_device(device: str) -> torch.device:
    if device == "balanced":  # layers spread over all visible GPUs; inputs go to the first
        return torch.device("cuda:0")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[dtype]


def load_model(model: str, device: str = "auto", dtype: str = "auto", cache_dir: Path | None = None,
               served_name: str | None = None) -> LoadedModel:
    started = time.monotonic()
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    source, name = model_source(model, cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(source)
    if device == "balanced":
        lm = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, device_map="balanced").eval()
    else:
        lm = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype).to(dev).eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    log.info("loaded %s on %s (%s) in %.1f s", name, dev, torch_dtype, time.monotonic() - started)
    return LoadedModel(lm, tokenizer, served_name or name)
