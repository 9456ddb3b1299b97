"""Tiny "hub" checkpoints built locally with transformers: LlamaForCausalLM (llama3 RoPE scaling, explicit head_dim),
Qwen2ForCausalLM (q/k/v biases, tied embeddings) and MistralForCausalLM, each saved sharded with a byte-level BPE
tokenizer carrying its family's special tokens, post-processor and chat template (nothing is downloaded)."""

from __future__ import annotations

import json

import torch
from tokenizers import Tokenizer, processors

# The published templates (Llama 3 Instruct, Qwen2 Instruct, Mistral Instruct v0.1), and the same with the assistant's
# reply marked by {% generation %}, which transformers needs for return_assistant_tokens_mask.
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLAMA3_MARKED = (
    "{% for message in messages %}{% if loop.index0 == 0 %}{{ bos_token }}{% endif %}{{ '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n' }}{% if message['role'] == 'assistant' %}{% generation %}"
    "{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}{% else %}"
    "{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + "
    "message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_MARKED = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + "
    "message['role'] + '\n'}}{% if message['role'] == 'assistant' %}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' }}"
    "{% endif %}{{ '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
MISTRAL_MARKED = MISTRAL.replace(
    "{{ message['content'] + eos_token}}", "{% generation %}{{ message['content'] + eos_token}}{% endgeneration %}"
)

FAMILIES = {
    # name: (architecture, special tokens, bos, eos, pad, template, marked template, generation eos ids (by token))
    "llama": ("LlamaForCausalLM", ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                   "<|end_header_id|>", "<|eot_id|>"],
              "<|begin_of_text|>", "<|eot_id|>", None, LLAMA3, LLAMA3_MARKED, ["<|end_of_text|>", "<|eot_id|>"]),
    "qwen2": ("Qwen2ForCausalLM", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
              None, "<|im_end|>", "<|endoftext|>", CHATML, CHATML_MARKED, ["<|im_end|>", "<|endoftext|>"]),
    "mistral": ("MistralForCausalLM", ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"],
                "<s>", "</s>", None, MISTRAL, MISTRAL_MARKED, ["</s>"]),
}
CONVERSATION = [
    {"role": "user", "content": "Who is the king?"},
    {"role": "assistant", "content": "The king is old, and his crown is heavy."},
    {"role": "user", "content": "And the queen? "},
    {"role": "assistant", "content": " She is young.\nAnd fair."},
]


def family_tokenizer(base_tokenizer: str, family: str) -> Tokenizer:
    """igpt's test BPE without igpt's special tokens, plus the family's (and its BOS post-processor)."""
    data = json.load(open(base_tokenizer, encoding="utf-8"))
    data["added_tokens"] = []
    vocab = data["model"]["vocab"]
    for token in [t for t in vocab if t.startswith("<|")]:  # igpt's special tokens become unused vocabulary entries
        i = vocab.pop(token)
        vocab[f"<unused{i}>"] = i
    tok = Tokenizer.from_str(json.dumps(data))
    _, specials, bos, *_ = FAMILIES[family]
    tok.add_special_tokens(specials)
    if bos is not None:
        bid = tok.token_to_id(bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bid)]
        )
    return tok


def hf_tokenizer(base_tokenizer: str, family: str, marked: bool = False):
    """The family's tokenizer as transformers' PreTrainedTokenizerFast (``marked``: the template with generation
    markers)."""
    from transformers import PreTrainedTokenizerFast

    _, _, bos, eos, pad, template, marked_template, _ = FAMILIES[family]
    return PreTrainedTokenizerFast(
        tokenizer_object=family_tokenizer(base_tokenizer, family), bos_token=bos, eos_token=eos, pad_token=pad,
        chat_template=marked_template if marked else template,
    )


def make_hub_model(folder: str, family: str, base_tokenizer: str, seed: int = 0, **config) -> str:
    """Save a random ``family`` model with its tokenizer into ``folder`` in several safetensors shards."""
    import transformers
    from transformers import GenerationConfig

    arch, _, bos, eos, pad, *_, gen_eos = FAMILIES[family]
    tok = hf_tokenizer(base_tokenizer, family)
    common = dict(
        vocab_size=len(tok) + 4, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6,
        bos_token_id=tok.convert_tokens_to_ids(bos) if bos else None, eos_token_id=tok.convert_tokens_to_ids(eos),
    )
    extra = {
        "llama": dict(head_dim=24, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
        "qwen2": dict(tie_word_embeddings=True, rope_theta=1e6),
        "mistral": dict(sliding_window=None),
    }[family]
    config_cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    cfg = config_cls(**{**common, **extra, **config})
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a misplaced one shows; sharper logits for greedy tests
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.5)
        model.lm_head.weight.mul_(8.0)  # the embedding matrix itself when tied
    model.generation_config = GenerationConfig(
        bos_token_id=common["bos_token_id"], eos_token_id=[tok.convert_tokens_to_ids(t) for t in gen_eos],
    )
    model.save_pretrained(folder, max_shard_size="60KB")
    tok.save_pretrained(folder)
    return folder
