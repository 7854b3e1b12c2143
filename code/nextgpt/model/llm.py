"""The LLM (Vicuna, any Llama-family or Qwen2-style causal LM folder) + the 38 NExT-GPT tokens + PEFT (LoRA and/or
the new token rows).

`model.llm` may name any Hugging Face folder whose config.json has a decoder-only architecture with the Llama layout
(`model.embed_tokens`, `lm_head`, attention q/k/v/o_proj): LlamaForCausalLM (Vicuna v0/v1.5, Llama-2/3),
MistralForCausalLM (grouped-query attention), Qwen2ForCausalLM. The projectors take their widths from the LLM's
hidden size, so a new LLM needs stage 1 (and 2) re-run: projectors trained on another LLM do not fit.

Which rows of `embed_tokens` / `lm_head` train is `train.token_rows`:
  new   only the 38 added rows, through PEFT's trainable-token support: TrainableTokensConfig without LoRA,
        LoraConfig(trainable_token_indices=...) with LoRA. PEFT keeps a (38, D) `trainable_tokens_delta` per matrix
        that replaces those rows in every forward, so the optimizer only ever sees 2 x 38 x D values.
  all   the whole resized matrices (what the original trained by accident: its resized embed_tokens and
        lm_head were trainable whole, ≈262 M values).
  none  neither (the rows stay as the resize drew them).

The LLM passed around is either the plain *ForCausalLM or a PeftModel around it; `causal_lm(llm)` gives the
*ForCausalLM (with PEFT's layers injected) that forward and generate call.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger("nextgpt")

TOKEN_MATRICES = ("embed_tokens", "lm_head")
# model_type values of config.json known to have the Llama module layout the rest of the code relies on.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


def check_llm_config(path: str | Path) -> dict:
    """config.json of an LLM folder -> its dict; ValueError for an architecture outside SUPPORTED_MODEL_TYPES or
    with tied input/output embeddings (the 38 token rows are trained separately in embed_tokens and lm_head)."""
    from nextgpt.io import read_json

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a Hugging Face model folder (no config.json)")
    config = read_json(path / "config.json")
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{path / 'config.json'}: model_type {model_type!r} is not supported as model.llm; "
                         f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    if config.get("tie_word_embeddings", False):
        raise ValueError(f"{path / 'config.json'}: tie_word_embeddings is true (embed_tokens and lm_head share one "
                         "matrix); NExT-GPT trains their new rows separately, so use an LLM with untied embeddings")
    return config


def load_llm(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device | None = None,
             quantization: str = "none"):
    """The causal LM of a Hugging Face folder (safetensors or sharded .bin; config.json decides the class, one of
    SUPPORTED_MODEL_TYPES).

    quantization: none | 8bit | 4bit (bitsandbytes; works on CPU with its CPU backend). dtype is the compute
    dtype of a quantized model and the weight dtype otherwise.
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    check_llm_config(path)
    kwargs: dict = {"dtype": dtype or torch.float32}
    if quantization != "none":
        from transformers import BitsAndBytesConfig
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ImportError(f"model.quantization={quantization} needs bitsandbytes (pip install bitsandbytes)") \
                from None
        if quantization == "8bit":
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0)
        else:  # 4bit (model.quantization is a Literal of none | 8bit | 4bit)
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=dtype or torch.float32)
    if device is not None or quantization != "none":
        # straight onto the target device (bitsandbytes quantizes while loading there)
        kwargs["device_map"] = {"": str(device or "cpu")}
    try:
        return AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot load the LLM ({e})") from None


def resize_for_tokens(llm, vocab_size: int) -> None:
    """Grow embed_tokens / lm_head to the tokenizer with the 38 added tokens (no-op if already that size).

    transformers draws the new rows from a normal with the old rows' mean and covariance (seeded by the caller's
    torch RNG); every delta checkpoint stores them, so a reload never depends on that draw.
    """
    if llm.get_input_embeddings().weight.shape[0] != vocab_size:
        llm.resize_token_embeddings(vocab_size)


def wrap_llm(llm, token_ids, token_rows: str, lora=None, quantization: str = "none",
             gradient_checkpointing: bool = False):
    """Apply PEFT as configured. lora: the cfg.model.lora dataclass (used when lora.enabled)."""
    from peft import LoraConfig, TrainableTokensConfig, get_peft_model

    if quantization != "none":
        from peft import prepare_model_for_kbit_training
        llm = prepare_model_for_kbit_training(llm, use_gradient_checkpointing=gradient_checkpointing,
                                              gradient_checkpointing_kwargs={"use_reentrant": False})
    elif gradient_checkpointing:
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    new_ids = list(token_ids.new_token_ids)
    if lora is not None and lora.enabled:
        config = LoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules),
            bias="none", task_type="CAUSAL_LM",
            trainable_token_indices={m: new_ids for m in TOKEN_MATRICES} if token_rows == "new" else None)
        return get_peft_model(llm, config)
    if token_rows == "new":
        return get_peft_model(llm, TrainableTokensConfig(target_modules=list(TOKEN_MATRICES), token_indices=new_ids))
    return llm


def is_peft(llm) -> bool:
    from peft import PeftModel

    return isinstance(llm, PeftModel)


def causal_lm(llm):
    """The *ForCausalLM inside (PEFT layers stay injected and active)."""
    return llm.get_base_model() if is_peft(llm) else llm


def has_lora(llm) -> bool:
    return is_peft(llm) and llm.peft_config["default"].peft_type.value == "LORA"


def _token_module(llm, name: str) -> nn.Module:
    inner = causal_lm(llm)
    return inner.model.embed_tokens if name == "embed_tokens" else inner.lm_head


def token_adapter(llm, name: str):
    """PEFT's TrainableTokensLayer on `name` (embed_tokens | lm_head), or None when the rows are not PEFT-trained."""
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    module = _token_module(llm, name)
    if isinstance(module, TrainableTokensLayer):
        return module
    inner = getattr(module, "token_adapter", None)          # LoRA's TrainableTokensWrapper
    return inner if isinstance(inner, TrainableTokensLayer) else None


def base_token_weight(llm, name: str) -> nn.Parameter:
    """The full (V, D) weight of embed_tokens / lm_head underneath any PEFT wrapper."""
    adapter = token_adapter(llm, name)
    if adapter is not None:
        return adapter.get_base_layer().weight
    return _token_module(llm, name).weight


def token_rows_parameter(llm, name: str) -> nn.Parameter | None:
    """The (38, D) PEFT delta that replaces the new rows of `name`, or None."""
    adapter = token_adapter(llm, name)
    return None if adapter is None else adapter.trainable_tokens_delta["default"]


def effective_token_matrix(llm, name: str) -> torch.Tensor:
    """(V, D): what the model actually uses (base rows with the PEFT rows written in)."""
    adapter = token_adapter(llm, name)
    if adapter is None:
        return base_token_weight(llm, name)
    return adapter.get_merged_weights(["default"])


@torch.no_grad()
def set_token_matrix(llm, name: str, rows: torch.Tensor, token_ids) -> None:
    """Write either the 38 new rows (38, D) or a whole matrix (V, D) into the model."""
    weight = base_token_weight(llm, name)
    delta = token_rows_parameter(llm, name)
    new_ids = torch.tensor(token_ids.new_token_ids, device=weight.device)
    if rows.shape == weight.shape:
        weight.copy_(rows.to(weight))
        if delta is not None:
            delta.copy_(rows.to(delta.device, delta.dtype)[new_ids.to(rows.device)])
        adapter = token_adapter(llm, name)
        if adapter is not None:               # keep PEFT's "original" rows in step with the new base matrix
            adapter.trainable_tokens_original["default"].copy_(weight[new_ids])
    elif rows.shape == (len(new_ids), weight.shape[1]):
        if delta is not None:
            delta.copy_(rows.to(delta))
        else:
            weight[new_ids] = rows.to(weight)
    else:
        raise ValueError(f"token rows for {name}: shape {tuple(rows.shape)}, expected {(len(new_ids), weight.shape[1])} "
                         f"(new rows) or {tuple(weight.shape)} (whole matrix)")


def lora_state_dict(llm) -> dict[str, torch.Tensor]:
    """LoRA tensors under PEFT's saved names (base_model.model....lora_A.weight), token rows excluded."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(llm, save_embedding_layers=False)
    return {k: v for k, v in state.items() if "lora_" in k}


def lora_parameters(llm) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in llm.named_parameters() if "lora_" in n]


@torch.no_grad()
def load_lora_state_dict(llm, state: dict[str, torch.Tensor], adapter: str = "default") -> None:
    """Inverse of lora_state_dict: PEFT's saved names (no adapter name) -> the live LoRA parameters."""
    parameters = dict(llm.named_parameters())
    for key, value in state.items():
        stem, _, leaf = key.rpartition(".")                 # ...q_proj.lora_A . weight
        name = f"{stem}.{adapter}.{leaf}"
        if name not in parameters:
            raise KeyError(f"LoRA key {key!r} has no parameter {name!r} in the model")
        parameters[name].copy_(value.to(parameters[name]))
