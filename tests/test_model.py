"""Tests for igpt/model: the Transformer, attention backends and document masking, the loss, FLOPs and parameters."""

from __future__ import annotations

import importlib
import logging
import math
import os
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F
import yaml

from igpt.config import ModelConfig
from igpt.model import Transformer, attention, flops_per_token, num_params, resolve_attention_backend
from igpt.model.attention import attention_info
from igpt.model.flops import matmul_params
from igpt.model.loss import lm_loss, resolve_loss_backend

attention_mod = importlib.import_module("igpt.model.attention")  # the package exports a function of that name
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=97, dim=48, n_layers=2, n_heads=6, n_kv_heads=2, ffn_dim=80, max_seq_len=64)
    return ModelConfig(**{**base, **kw})


def make_model(seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(tiny_cfg(**kw)).eval()


def reference_attention(q, k, v, doc=None):
    """Naive float64 attention: q (B, S, Hq, D), k/v (B, S, Hkv, D); doc (B, S) document ids or None."""
    b, s, hq, d = q.shape
    rep = hq // k.shape[2]
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))  # (B, H, S, D)
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)  # (B, Hq, S, D)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)  # (B, Hq, S, S)
    allowed = torch.ones(s, s, dtype=torch.bool).tril()[None]  # (1, S, S)
    if doc is not None:
        allowed = allowed & (doc[:, :, None] == doc[:, None, :])  # (B, S, S)
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)  # (B, S, Hq, D)


# ------------------------------------------------------------------------------------------------ attention


@pytest.mark.parametrize("hq,hkv,s", [(4, 4, 17), (6, 2, 13), (8, 1, 5)])
def test_sdpa_attention_matches_reference(hq, hkv, s):
    torch.manual_seed(1)
    q = torch.randn(2, s, hq, 16)
    k, v = torch.randn(2, s, hkv, 16), torch.randn(2, s, hkv, 16)
    pos = torch.cat([torch.arange(5), torch.arange(s - 5)]).expand(2, s).clone()  # two documents per row
    pos[1] = torch.arange(s)  # second row: one document
    doc = torch.cumsum(pos == 0, dim=-1)
    out = attention(q, k, v, pos, "sdpa")
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, doc), atol=1e-5, rtol=1e-5)
    causal = attention(q, k, v, None, "sdpa")
    torch.testing.assert_close(causal.double(), reference_attention(q, k, v), atol=1e-5, rtol=1e-5)


def test_attention_info_cu_seqlens_and_fast_path():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    info = attention_info(pos, "flash")
    assert info.cu_seqlens.dtype == torch.int32
    assert info.cu_seqlens.tolist() == [0, 3, 5, 6, 12]  # row 2 starts a new sequence at flat index 6
    assert info.max_seqlen == 6
    assert attention_info(torch.arange(6).expand(3, 6), "sdpa").causal_only  # one document per row: is_causal path
    # a row that does not start at position 0 (continuation) still counts as a sequence start for varlen
    info = attention_info(torch.tensor([[3, 4, 0, 1], [0, 1, 2, 0]]), "triton")
    assert info.cu_seqlens.tolist() == [0, 2, 4, 7, 8]


def _fake_varlen_kernels():
    """flash-attn-shaped functions built on the float64 reference, to test the varlen plumbing without CUDA."""

    def flash_attn_func(q, k, v, causal=False, softmax_scale=None):
        assert causal
        return reference_attention(q, k, v).to(q.dtype)

    def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, causal=False, softmax_scale=None):
        assert causal and cu_q.dtype == torch.int32 and torch.equal(cu_q, cu_k) and q.dim() == 3
        outs = []
        for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
            assert b - a <= max_q
            outs.append(reference_attention(q[None, a:b], k[None, a:b], v[None, a:b])[0])
        return torch.cat(outs).to(q.dtype)  # (total, Hq, D)

    return types.SimpleNamespace(flash_attn_func=flash_attn_func, flash_attn_varlen_func=flash_attn_varlen_func)


def test_varlen_backend_plumbing(monkeypatch):
    monkeypatch.setattr(attention_mod, "_kernels", lambda backend: _fake_varlen_kernels())
    torch.manual_seed(2)
    model = make_model()
    ids = torch.randint(0, 97, (2, 11))
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3], list(range(11))])
    want = model(ids, position_ids=pos)
    model.attention_backend = "flash"
    torch.testing.assert_close(model(ids, position_ids=pos), want, atol=1e-5, rtol=1e-5)
    model.attention_backend = "triton"
    torch.testing.assert_close(model(ids), make_model()(ids), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ model


def test_document_masking_equals_separate_documents():
    model = make_model(tie_embeddings=True)
    torch.manual_seed(3)
    a, b = torch.randint(0, 97, (1, 7)), torch.randint(0, 97, (1, 10))
    packed = torch.cat([a, b], dim=1)  # (1, 17)
    pos = torch.cat([torch.arange(7), torch.arange(10)])[None]
    out = model(packed, position_ids=pos)
    torch.testing.assert_close(out[:, :7], model(a), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, 7:], model(b), atol=1e-5, rtol=1e-5)
    # without document masking the second document would see the first
    assert not torch.allclose(model(packed)[:, 7:], model(b), atol=1e-3)
    # position_ids 0..S-1 are the same as no position_ids
    torch.testing.assert_close(model(b, position_ids=torch.arange(10)[None]), model(b))


def test_labels_path_matches_cross_entropy_over_logits():
    model = make_model()
    torch.manual_seed(4)
    ids = torch.randint(0, 97, (3, 9))
    labels = torch.randint(0, 97, (3, 9))
    labels[0, :4] = -100
    labels[2, -1] = -100
    logits = model(ids)
    assert logits.shape == (3, 9, 97)
    want = F.cross_entropy(logits.reshape(-1, 97).double(), labels.reshape(-1), ignore_index=-100, reduction="none")
    loss = model(ids, labels=labels)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), want.sum(), atol=1e-4, rtol=1e-5)
    per_tok = model(ids, labels=labels, reduction="none")
    assert per_tok.shape == (3, 9) and per_tok.dtype == torch.float32
    torch.testing.assert_close(per_tok.double(), want.reshape(3, 9), atol=1e-5, rtol=1e-5)
    assert torch.all(per_tok[labels == -100] == 0)
    # an ignored token's input and label value change nothing in the loss of the tokens before it
    labels2 = labels.clone()
    labels2[2, -1] = -100
    ids2 = ids.clone()
    ids2[2, -1] = (ids[2, -1] + 1) % 97
    torch.testing.assert_close(model(ids2, labels=labels2), loss)
    with pytest.raises(ValueError, match="reduction"):
        model(ids, labels=labels, reduction="mean")


def test_gradients_flow_and_tied_weights_share_storage():
    model = make_model(tie_embeddings=True).train()
    assert model.lm_head.weight is model.embed_tokens.weight
    ids = torch.randint(0, 97, (2, 8))
    model(ids, labels=ids).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_init_scales_output_projections():
    torch.manual_seed(0)
    cfg = tiny_cfg(dim=256, n_heads=8, n_kv_heads=4, ffn_dim=512, n_layers=8, init_std=0.02)
    model = Transformer(cfg)
    out_std = 0.02 / math.sqrt(2 * 8)
    for block in model.layers:
        assert abs(block.self_attn.o_proj.weight.std().item() - out_std) < 0.1 * out_std
        assert abs(block.mlp.down_proj.weight.std().item() - out_std) < 0.1 * out_std
        assert abs(block.self_attn.q_proj.weight.std().item() - 0.02) < 0.002
        assert torch.all(block.input_layernorm.weight == 1)
    assert abs(model.embed_tokens.weight.std().item() - 0.02) < 0.002
    assert isinstance(model.layers, torch.nn.ModuleList) and len(model.layers) == 8


def test_logits_to_keep_and_bad_shapes():
    model = make_model()
    ids = torch.randint(0, 97, (2, 6))
    torch.testing.assert_close(model(ids, logits_to_keep=1), model(ids)[:, -1:])
    with pytest.raises(ValueError, match="n_kv_heads"):
        Transformer(tiny_cfg(n_heads=6, n_kv_heads=4))
    with pytest.raises(ValueError, match="labels"):
        model(ids, labels=ids[:, :3])


# ------------------------------------------------------------------------------------------------ loss


def test_lm_loss_torch_reference():
    torch.manual_seed(5)
    hidden, weight = torch.randn(13, 24), torch.randn(50, 24)
    labels = torch.randint(0, 50, (13,))
    labels[3] = -100
    want = F.cross_entropy((hidden @ weight.t()).double(), labels, ignore_index=-100, reduction="none")
    torch.testing.assert_close(lm_loss(hidden, weight, labels, "torch", "none").double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lm_loss(hidden, weight, labels).double(), want.sum(), atol=1e-4, rtol=1e-5)
    bf = lm_loss(hidden.bfloat16(), weight.bfloat16(), labels, "torch", "sum")
    assert bf.dtype == torch.float32 and abs(bf.item() - want.sum().item()) < 0.05 * abs(want.sum().item())


# ------------------------------------------------------------------------------------------------ backends


def test_flash_requested_on_cpu_falls_back_with_reason(caplog):
    with caplog.at_level(logging.INFO, logger="igpt"):
        assert resolve_attention_backend("flash", "cpu") == "sdpa"
    assert "flash" in caplog.text and "CUDA" in caplog.text and "'sdpa' backend instead" in caplog.text
    with pytest.raises(RuntimeError, match="flash.*kernels.strict"):
        resolve_attention_backend("flash", "cpu", strict=True)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="igpt"):
        assert resolve_attention_backend("sdpa", "cpu") == "sdpa"
    assert "attention backend: sdpa" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="igpt"):
        assert resolve_attention_backend("flash", "cuda", dtype=torch.float32) == "sdpa"
    assert "fp16 or bf16" in caplog.text
    with pytest.raises(ValueError, match="kernels.attention"):
        resolve_attention_backend("xformers", "cpu")


def test_triton_on_cpu_without_interpreter_falls_back(monkeypatch, caplog):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with caplog.at_level(logging.WARNING, logger="igpt"):
        assert resolve_attention_backend("triton", "cpu") == "sdpa"
        assert resolve_loss_backend("triton", "cpu") == "torch"
    assert "TRITON_INTERPRET" in caplog.text and "'torch' backend instead" in caplog.text
    with pytest.raises(RuntimeError, match="loss backend 'triton'"):
        resolve_loss_backend("triton", "cpu", strict=True)
    assert resolve_loss_backend("torch", "cpu") == "torch"


def _kernels_ready() -> tuple[bool, str]:
    try:
        from igpt import kernels
    except Exception as e:
        return False, f"igpt.kernels does not import: {e}"
    need = ("flash_attn_func", "flash_attn_varlen_func", "fused_linear_cross_entropy", "triton_available")
    missing = [n for n in need if not hasattr(kernels, n)]
    return (not missing, f"igpt.kernels does not provide {missing} yet")


TRITON_SCRIPT = r"""
import torch
from igpt.config import ModelConfig
from igpt.model import Transformer, resolve_attention_backend, resolve_loss_backend
assert resolve_attention_backend("triton", "cpu", strict=True) == "triton"
assert resolve_loss_backend("triton", "cpu", strict=True) == "triton"
torch.manual_seed(0)
cfg = ModelConfig(vocab_size=61, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=48, max_seq_len=32)
ref = Transformer(cfg)
tri = Transformer(cfg, attention="triton", loss="triton")
tri.load_state_dict(ref.state_dict())
ids = torch.randint(0, 61, (2, 9))
pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4], list(range(9))])
labels = ids.clone(); labels[0, :2] = -100
for m in (ref, tri):
    loss = m(ids, position_ids=pos, labels=labels)
    loss.backward()
    m.loss_value = loss.item()
# fp32 under the interpreter: the kernels are exact up to summation order, so everything agrees within 1e-5
assert abs(ref.loss_value - tri.loss_value) < 1e-5 * abs(ref.loss_value), (ref.loss_value, tri.loss_value)
for (n, a), b in zip(ref.named_parameters(), tri.parameters()):
    torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-5, msg=n)
torch.testing.assert_close(tri(ids, position_ids=pos), ref(ids, position_ids=pos), atol=1e-5, rtol=1e-5)
torch.testing.assert_close(tri(ids), ref(ids), atol=1e-5, rtol=1e-5)  # no boundaries: flash_attn_func(causal=True)
with torch.no_grad():
    per_tok = tri(ids, position_ids=pos, labels=labels, reduction="none")
    want = ref(ids, position_ids=pos, labels=labels, reduction="none")
    torch.testing.assert_close(per_tok, want, atol=1e-5, rtol=1e-5)
print("ok")
"""


def test_triton_backends_match_torch_under_interpreter():
    ok, why = _kernels_ready()
    if not ok:
        pytest.skip(why)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, "-c", TRITON_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


# ------------------------------------------------------------------------------------------------ flops, configs


def test_flops_and_params_count():
    cfg = tiny_cfg()
    model = Transformer(cfg)
    norms = cfg.dim * (2 * cfg.n_layers + 1)
    # untied: the non-embedding parameters are the matmul parameters (incl. lm_head) plus the norm weights
    assert num_params(model, exclude_embedding=True) == matmul_params(cfg) + norms
    assert num_params(model) == matmul_params(cfg) + norms + cfg.vocab_size * cfg.dim
    seq = 40
    assert flops_per_token(cfg, seq) == 6 * matmul_params(cfg) + 12 * cfg.n_layers * cfg.dim * seq
    tied = Transformer(tiny_cfg(tie_embeddings=True))
    assert num_params(tied) == num_params(model) - cfg.vocab_size * cfg.dim


@pytest.mark.parametrize(
    "name,params",
    [
        ("tiny", None),
        ("gpt2_124m", 123_587_328),
        ("llama_1b", 1_235_814_400),
        ("llama_8b", 8_030_261_248),
        ("llama_70b", 70_553_706_496),
    ],
)
def test_model_configs_build_with_published_sizes(name, params):
    with open(os.path.join(ROOT, "conf", "model", f"{name}.yaml"), encoding="utf-8") as f:
        cfg = ModelConfig(**yaml.safe_load(f))  # every key is a ModelConfig field
    assert cfg.name == name
    with torch.device("meta"):
        model = Transformer(cfg)
    if params is not None:  # Llama-3.2-1B, Llama-3-8B and -70B counts as published by Meta / HF
        assert num_params(model) == params
