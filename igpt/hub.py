"""Hugging Face model folders: ``config.json`` <-> :class:`~igpt.config.ModelConfig`, and where the weights are.

A model folder as ``save_pretrained`` writes it (and the Hub serves it) holds ``config.json`` and its weights in
``model.safetensors``, or in shards listed by ``model.safetensors.index.json`` (``{"weight_map": {name: file}}``).
igpt reads the architectures its decoder computes exactly:

- ``LlamaForCausalLM`` (Llama 2/3.x): plain or Llama 3.1 ``rope_scaling`` (``rope_type`` ``llama3``; also ``linear``),
  an explicit ``head_dim``, tied or untied embeddings;
- ``Qwen2ForCausalLM`` (Qwen2/2.5): biases on the q/k/v projections;
- ``MistralForCausalLM``: no sliding window, or one at least as long as the sequences igpt will run (the model's
  ``max_seq_len`` is then capped at the window, where sliding-window attention equals full causal attention);
- the ``...ForSequenceClassification`` classes of the three with ``num_labels: 1`` (a reward model, igpt's scalar
  head; igpt's own export writes ``LlamaForSequenceClassification``).

Parameter names below ``model.`` are igpt's (``igpt/model/transformer.py`` follows HF Llama's layout), so a name only
loses its ``model.`` prefix. Every ``config.json`` value igpt does not implement (another ``hidden_act``, a RoPE
type such as ``yarn``, Llama's ``attention_bias`` or ``mlp_bias``, quantized weights) is an error naming the key and
its value: the import never builds a silently different model. Both spellings of the RoPE settings are read:
transformers 5's ``rope_parameters`` (``rope_theta`` inside) and 4.x's top-level ``rope_theta`` + ``rope_scaling``.

``hf_config`` goes the other way for ``igpt.export``: the config of a model's original class (kept from an import in
the checkpoint's ``meta.json``), or ``LlamaForCausalLM`` for a model igpt trained from scratch.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from igpt.config import ModelConfig
from igpt.data.jsonfile import read_json_object
from igpt.model.transformer import ROPE_TYPES

log = logging.getLogger("igpt")

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"

# architecture class -> (model_type, head, defaults of the transformers config class for keys a config.json may omit)
_LLAMA = {"rms_norm_eps": 1e-6, "max_position_embeddings": 2048, "rope_theta": 10000.0}
_QWEN2 = {"rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "rope_theta": 10000.0}
_MISTRAL = {"rms_norm_eps": 1e-6, "max_position_embeddings": 131072, "rope_theta": 10000.0, "sliding_window": 4096}
ARCHITECTURES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "LlamaForCausalLM": ("llama", "lm", _LLAMA),
    "Qwen2ForCausalLM": ("qwen2", "lm", _QWEN2),
    "MistralForCausalLM": ("mistral", "lm", _MISTRAL),
    "LlamaForSequenceClassification": ("llama", "scalar", _LLAMA),
    "Qwen2ForSequenceClassification": ("qwen2", "scalar", _QWEN2),
    "MistralForSequenceClassification": ("mistral", "scalar", _MISTRAL),
}
CAUSAL_LM = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
SEQ_CLS = {"llama": "LlamaForSequenceClassification", "qwen2": "Qwen2ForSequenceClassification",
           "mistral": "MistralForSequenceClassification"}


def is_model_folder(path: str) -> bool:
    """True for a Hugging Face model folder: ``config.json`` and safetensors weights, and no igpt ``meta.json``."""
    return (
        os.path.isfile(os.path.join(path, CONFIG))
        and not os.path.exists(os.path.join(path, "meta.json"))
        and (os.path.exists(os.path.join(path, SINGLE)) or os.path.exists(os.path.join(path, INDEX)))
    )


def read_config(folder: str) -> dict[str, Any]:
    return read_json_object(os.path.join(folder, CONFIG))


def architecture(config: dict[str, Any], where: str) -> str:
    """The supported architecture class a config describes; ValueError naming ``architectures`` otherwise."""
    archs = config.get("architectures") or []
    if not archs:  # a config written from a config class alone: its model_type names the causal LM
        arch = CAUSAL_LM.get(config.get("model_type"))
        if arch is None:
            raise ValueError(
                f"{where}: model_type={config.get('model_type')!r} without 'architectures' is not supported "
                f"(igpt imports model_type {', '.join(CAUSAL_LM)})"
            )
        return arch
    if len(archs) != 1 or archs[0] not in ARCHITECTURES:
        raise ValueError(f"{where}: architectures={archs!r} is not supported (igpt imports {', '.join(ARCHITECTURES)})")
    return archs[0]


def _unsupported(where: str, key: str, value: Any, why: str) -> ValueError:
    return ValueError(f"{where}: {key}={value!r} is not supported: {why}")


def rope_settings(config: dict[str, Any], where: str, default_theta: float) -> tuple[float, dict[str, Any] | None]:
    """``(rope_theta, rope_scaling)`` from either spelling (transformers 5's ``rope_parameters``, 4.x's keys)."""
    params = config.get("rope_parameters")
    key = "rope_parameters"
    if params is None:
        params, key = config.get("rope_scaling"), "rope_scaling"
    params = dict(params or {})
    theta = float(params.pop("rope_theta", config.get("rope_theta", default_theta)))
    kind = params.pop("rope_type", params.pop("type", "default"))
    if kind not in ROPE_TYPES:
        raise _unsupported(where, f"{key}.rope_type", kind, f"igpt implements RoPE types {', '.join(ROPE_TYPES)}")
    if kind == "default":
        return theta, None
    need = ("factor",) if kind == "linear" else (
        "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in need if k not in params]
    if missing:
        raise ValueError(f"{where}: {key} of rope_type {kind!r} lacks {', '.join(missing)}")
    return theta, {"rope_type": kind, **{k: params[k] for k in need}}


def model_config(config: dict[str, Any], where: str, name: str = "hf") -> tuple[ModelConfig, str]:
    """``(ModelConfig, head)`` of a Hugging Face ``config.json`` (see the module docstring for what is supported)."""
    arch = architecture(config, where)
    model_type, head, defaults = ARCHITECTURES[arch]
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if not isinstance(config.get(key), int):
            raise ValueError(f"{where}: {key} must be an integer, got {config.get(key)!r}")
    act = config.get("hidden_act", config.get("hidden_activation", "silu"))
    if act != "silu":
        raise _unsupported(where, "hidden_act", act, "igpt's MLP is SwiGLU (silu)")
    if model_type == "llama":
        for key, what in (("attention_bias", "q/k/v/o projection biases"), ("mlp_bias", "MLP biases")):
            if config.get(key):
                raise _unsupported(where, key, config[key], f"igpt's Llama has no {what}")
    if config.get("quantization_config"):
        raise _unsupported(where, "quantization_config", config["quantization_config"].get("quant_method", "?"),
                           "igpt loads unquantized weights only")
    if config.get("partial_rotary_factor", 1.0) != 1.0:
        raise _unsupported(where, "partial_rotary_factor", config["partial_rotary_factor"], "RoPE covers whole heads")
    if head == "scalar" and config.get("num_labels", len(config.get("id2label") or {}) or 2) != 1:
        raise _unsupported(where, "num_labels", config.get("num_labels", 2), "igpt's scalar head has one output")
    theta, scaling = rope_settings(config, where, defaults["rope_theta"])
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim")
    if head_dim is not None and head_dim * heads == config["hidden_size"]:
        head_dim = None  # the usual size: keep the config minimal
    max_len = int(config.get("max_position_embeddings", defaults["max_position_embeddings"]))
    window = sliding_window(config, model_type, defaults)
    if window is not None and window < max_len:
        log.info("%s: sliding_window=%d < max_position_embeddings=%d: model.max_seq_len is %d (igpt computes full "
                 "attention, which equals the window's for sequences that fit in it)", where, window, max_len, window)
        max_len = window
    cfg = ModelConfig(
        name=name,
        vocab_size=config["vocab_size"],
        dim=config["hidden_size"],
        n_layers=config["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=config.get("num_key_value_heads") or heads,
        ffn_dim=config["intermediate_size"],
        max_seq_len=max_len,
        rope_theta=theta,
        norm_eps=float(config.get("rms_norm_eps", defaults["rms_norm_eps"])),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        init_std=float(config.get("initializer_range", 0.02)),
        head_dim=head_dim,
        attention_bias=model_type == "qwen2",
        rope_scaling=scaling,
        sliding_window=window,
    )
    return cfg, head


def sliding_window(config: dict[str, Any], model_type: str, defaults: dict[str, Any]) -> int | None:
    """The attention window of a config, or None when every layer attends to the whole sequence."""
    if model_type == "llama":
        return None
    window = config.get("sliding_window", defaults.get("sliding_window"))
    if model_type == "qwen2":  # windowed only when switched on (and then for the layers layer_types names)
        layer_types = config.get("layer_types") or []
        if not config.get("use_sliding_window") and "sliding_attention" not in layer_types:
            return None
    return int(window) if window is not None else None


def weight_files(folder: str) -> dict[str, list[str]]:
    """``{file: [tensor names]}`` of a model folder: its index's shards, or ``model.safetensors`` (names unknown,
    ``[]``). FileNotFoundError naming a shard the index lists but the folder lacks."""
    index = os.path.join(folder, INDEX)
    if not os.path.exists(index):
        single = os.path.join(folder, SINGLE)
        if not os.path.exists(single):
            raise FileNotFoundError(f"{folder}: no {SINGLE} or {INDEX}")
        return {single: []}
    try:
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{index}: not a safetensors index with a 'weight_map' ({e!r})") from None
    files: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        files.setdefault(os.path.join(folder, shard), []).append(name)
    for path in files:
        if not os.path.exists(path):
            raise FileNotFoundError(f"{folder}: shard {os.path.basename(path)} listed in {INDEX} is missing ({path})")
    return files


def igpt_name(name: str) -> str | None:
    """An HF parameter name as igpt's (None: a buffer old checkpoints stored, such as rotary ``inv_freq``)."""
    if name.endswith("rotary_emb.inv_freq"):
        return None
    return name[len("model.") :] if name.startswith("model.") else name


def hf_name(name: str) -> str:
    return name if name in ("lm_head.weight", "score.weight") else f"model.{name}"


def hf_config(cfg: ModelConfig, head: str, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``config.json`` of ``cfg`` in its original class (``base``: the imported config.json, if any)."""
    model_type = ARCHITECTURES[architecture(base, "meta.json hf_config")][0] if base else "llama"
    out = {k: v for k, v in (base or {}).items() if k not in ("rope_scaling", "rope_parameters", "torch_dtype")}
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling:
        rope = {**cfg.rope_scaling, "rope_theta": cfg.rope_theta}
    out.update(
        architectures=[(SEQ_CLS if head == "scalar" else CAUSAL_LM)[model_type]],
        model_type=model_type,
        hidden_size=cfg.dim,
        intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_size,
        hidden_act="silu",
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,  # transformers 4.x reads these two; 5.x reads rope_parameters
        rope_scaling=None if not cfg.rope_scaling else dict(cfg.rope_scaling),
        rope_parameters=rope,
        vocab_size=cfg.vocab_size,
        tie_word_embeddings=cfg.tie_embeddings,
        initializer_range=cfg.init_std,
        attention_dropout=0.0,
        use_cache=True,
    )
    if base is None or "max_position_embeddings" not in out or cfg.sliding_window is None:
        out["max_position_embeddings"] = cfg.max_seq_len  # an imported window keeps the original length
    if model_type == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    elif model_type == "mistral":
        out["sliding_window"] = cfg.sliding_window
    return out
