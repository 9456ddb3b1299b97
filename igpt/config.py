"""Dataclass schemas for every config group, registered in Hydra's ConfigStore.

The YAML files under ``conf/`` fill these schemas. Because the top-level ``Config`` is a structured config, an unknown
key or a wrong type fails at composition time with the key's name. Keys added with ``+key=`` or ``++key=`` can slip
past that check, so ``validate`` re-checks the composed config against the schema before anything runs.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf

from igpt.data.kinds import KINDS
from igpt.registry import ATTENTION_BACKENDS, LOSS_BACKENDS, STRATEGIES
from igpt.stages import STAGES


@dataclass
class ModelConfig:
    """A Llama-style decoder (RMSNorm, RoPE, SwiGLU, grouped-query attention).

    The fields after ``init_std`` describe imported Hugging Face checkpoints (``igpt/hub.py``); their defaults are
    igpt's own architecture, so configs and checkpoints written before they existed mean what they meant.
    """

    name: str = "tiny"  # the defaults are conf/model/tiny.yaml's model
    vocab_size: int = 4096
    dim: int = 128  # hidden size (HF: hidden_size)
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2  # grouped-query attention: n_heads % n_kv_heads == 0
    ffn_dim: int = 384  # SwiGLU inner size (HF: intermediate_size)
    max_seq_len: int = 256  # longest sequence rotary tables and generation allow
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    head_dim: int | None = None  # per-head size; None: dim // n_heads (HF: head_dim)
    attention_bias: bool = False  # biases on the q/k/v projections (Qwen2)
    # RoPE frequency scaling, Hugging Face's dict: {"rope_type": "llama3", "factor", "low_freq_factor",
    # "high_freq_factor", "original_max_position_embeddings"} or {"rope_type": "linear", "factor"}; None: plain RoPE
    rope_scaling: dict[str, Any] | None = None
    sliding_window: int | None = None  # the checkpoint's attention window; igpt needs it >= max_seq_len

    @property
    def head_size(self) -> int:
        """The per-head size: ``head_dim``, or ``dim // n_heads`` when it is not set."""
        return self.head_dim or self.dim // self.n_heads


@dataclass
class StageConfig:
    """Which training stage runs (``+stage=<name>``): igpt/stages/<name>.py."""

    name: str = "pretrain"
    kind: str | None = None  # the prepared data kind it reads: follows from the stage (igpt.stages.STAGES)
    pack: bool = True  # pack several documents/conversations into one row (with document masking)


@dataclass
class RMConfig:
    """The reward model (``+stage=rm``)."""

    # After training, the reward is shifted so that the preferred responses of the train split score 0 on average
    # (stored in the checkpoint and applied when the model is loaded); this many train batches estimate it (0: all).
    norm_batches: int = 0


@dataclass
class DPOConfig:
    """Direct preference optimisation (``+stage=dpo``)."""

    beta: float = 0.1
    # sigmoid (DPO) | ipo | hinge (SLiC) | simpo | orpo (both reference-free) | kto (unpaired kind=kto data)
    loss: str = "sigmoid"
    label_smoothing: float = 0.0  # conservative DPO: the share of labels assumed flipped (sigmoid and simpo losses)
    nll_weight: float = 0.0  # weight of an SFT term (mean token NLL of each record's best response)
    simpo_gamma: float = 0.5  # SimPO's target reward margin gamma (TRL's simpo_gamma)
    kto_desirable_weight: float = 1.0  # KTO's lambda_D
    kto_undesirable_weight: float = 1.0  # KTO's lambda_U
    precompute_reference: bool = False  # reference log-probs in one pass before training; no reference in memory


@dataclass
class RewardConfig:
    """Where PPO's rewards come from: a reward model and/or Python reward functions, summed with weights."""

    model: str | None = None  # a reward-model run or checkpoint dir (+stage=rm)
    functions: list[str] = field(default_factory=list)  # "module:function" reward functions (TRL's batched form)
    weights: list[float] = field(default_factory=list)  # one per source: [reward model, functions...]; default 1.0
    clip: float = 10.0  # the reward model's score is clipped to [-clip, clip] (0: no clipping)
    missing_eos_penalty: float = 0.0  # subtracted from responses that end without an end-of-turn token


@dataclass
class RolloutConfig:
    n: int = 4  # responses sampled per prompt
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0


@dataclass
class KLConfig:
    coef: float = 0.05  # the per-token KL penalty coefficient (the initial one when adaptive)
    target: float | None = None  # adaptive controller (Ziegler et al. 2019) toward this KL per sequence when set
    horizon: int = 10000
    estimator: str = "k1"  # k1 | k2 | k3 (Schulman's estimators of KL(policy || reference))


@dataclass
class PPOConfig:
    advantage: str = "gae"  # gae (with a critic) | grpo | rloo (critic-free, over rollout.n samples per prompt)
    epochs: int = 1  # passes over each rollout batch
    minibatches: int = 1  # optimizer steps per epoch (the rollout batch split into this many minibatches)
    clip: float = 0.2  # policy ratio clip epsilon
    clip_high: float | None = None  # asymmetric upper clip (DAPO's clip-higher); None: = clip
    dual_clip: float | None = None  # dual-clip constant c > 1 for negative advantages (Ye et al. 2020); None: off
    value_clip: float = 0.2  # clip of the value prediction around its rollout value
    vf_coef: float = 0.5  # weight of the critic's loss (it has its own optimizer; this scales its gradients)
    gamma: float = 1.0
    lam: float = 0.95
    # normalise advantages over the global batch. None (default): on for gae (over response tokens), off for grpo and
    # rloo (their group baseline already centres them; GRPO's group std scales them). true with grpo / rloo whitens
    # the sequence advantages over the batch's sequences, each counted once whatever its length.
    whiten_advantages: bool | None = None
    critic_lr: float | None = None  # the critic's learning rate (default: optim.lr)


@dataclass
class PTXConfig:
    """PPO-ptx: the pretraining loss mixed into the policy's update (InstructGPT's formulation)."""

    data_dir: str | None = None  # a prepared kind=text dir
    coef: float = 0.0


@dataclass
class StrategyConfig:
    """How the model is spread over processes. See igpt/parallel/."""

    name: str = "single"  # one of igpt.registry.STRATEGIES (conf/strategy/<name>.yaml sets it)
    # FSDP2
    reshard_after_forward: bool = True  # free gathered block weights after forward (ZeRO-3 memory); false: keep them
    param_dtype: str | None = None  # compute dtype of gathered weights: None follows `precision` (bf16 -> bf16)
    reduce_dtype: str = "fp32"  # dtype of the gradient reduce-scatter
    cpu_offload: bool = False  # sharded params, grads and optimizer state on the CPU (CPUOffloadPolicy)
    # DeepSpeed ZeRO
    offload_optimizer: bool = False  # optimizer state and fp32 master weights on the CPU
    offload_params: bool = False  # ZeRO-3 only: parameters on the CPU
    # all
    activation_checkpointing: bool = False
    compile: bool = False
    timeout_s: int = 600  # collective timeout: a dead rank ends the job instead of hanging it


@dataclass
class DataConfig:
    dir: str = MISSING  # a directory written by `python -m igpt.data.prepare`
    # canonical partitions: the data order never depends on world size or workers. None: the largest divisor of
    # trainer.global_batch_size up to 8 that the train split can fill (igpt.data.loader.auto_partitions)
    num_partitions: int | None = None
    num_workers: int = 0  # DataLoader workers per rank
    shuffle: bool = True
    skip_corrupt: bool = False  # skip (count, warn) truncated or corrupt shards instead of failing
    verify: bool = True  # check each shard's xxh3_64 checksum (index.json) once per process when first opened


@dataclass
class TrainerConfig:
    max_steps: int = 100
    global_batch_size: int = 32  # sequences per optimizer step, over all ranks
    micro_batch_size: int = 8  # sequences per forward/backward on one rank
    seq_len: int = 256
    seed: int = 1337
    eval_every: int = 50
    eval_at_start: bool = False  # also evaluate before the first step (logged as step 0): the starting point
    eval_tasks: list[str] = field(default_factory=list)  # igpt.eval task files scored at every eval (eval/<task>/*)
    eval_tasks_batch_size: int = 8
    eval_batches: int = 0  # 0: the whole validation split
    ckpt_every: int = 100
    ckpt_at_end: bool = True  # also checkpoint at max_steps (false: throughput runs that keep nothing)
    keep_last: int = 3  # checkpoints kept on disk (0: all)
    log_every: int = 1
    grad_clip: float = 1.0
    max_bad_steps: int = 5  # consecutive non-finite losses before the run stops
    sample_every_eval: bool = True  # log a table of sample generations at each eval
    sample_prompts: list[str] = field(default_factory=lambda: ["ROMEO:", "To be, or not to be"])
    sample_max_new_tokens: int = 48
    progress: bool = True


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    schedule: str = "cosine"  # cosine | wsd | constant
    warmup_steps: int = 10
    decay_fraction: float = 0.2  # wsd: the share of steps spent decaying


@dataclass
class KernelsConfig:
    attention: str = "sdpa"  # sdpa | triton | flash
    loss: str = "torch"  # torch | triton
    strict: bool = False  # fail instead of falling back when the requested backend cannot run


@dataclass
class WandbConfig:
    mode: str = "offline"  # offline | online | disabled
    project: str = "igpt"
    entity: str | None = None
    name: str | None = None  # None: the run dir's name (in a multirun: <sweep dir name>-<job number>)
    # Runs of one pipeline share a group. None: the init_from run's group, else the sweep's name in a multirun, else
    # this run's name (igpt.metrics.wandb_group); the resolved value is saved in config.yaml and checkpoints.
    group: str | None = None
    job_type: str | None = None  # None: the stage name (pretrain, sft, rm, dpo, ppo)
    tags: list[str] = field(default_factory=list)
    log_model: bool = False  # upload the final checkpoint as a W&B "model" artifact


@dataclass
class LoggerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    peak_flops: float = 0.0  # per-device peak FLOP/s for MFU; 0 = look up by device (CPU: measured matmul peak)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    kl: KLConfig = field(default_factory=KLConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    ptx: PTXConfig = field(default_factory=PTXConfig)
    run_dir: str = "runs/default"
    init_from: str | None = None  # a checkpoint dir (or run dir) whose weights start this run
    reference_from: str | None = None  # DPO / PPO's frozen reference (default: init_from)
    resume: str = "auto"  # auto | never
    # error | allow: init_from (reference_from, reward.model) whose tokenizer differs from the data's
    tokenizer_mismatch: str = "error"
    precision: str = "fp32"  # fp32 | bf16
    device: str = "auto"  # auto | cpu | cuda


POSITIVE = (  # config keys that must be >= 1 (validate)
    "model.vocab_size", "model.dim", "model.n_layers", "model.n_heads", "model.n_kv_heads", "model.ffn_dim",
    "model.max_seq_len", "model.head_dim", "trainer.global_batch_size", "trainer.micro_batch_size", "trainer.seq_len",
)

RANGES = {  # config keys with a range: (low, high, low included, high included); None: unbounded (validate)
    "optim.lr": (0.0, None, False, True),
    "optim.eps": (0.0, None, False, True),
    "optim.weight_decay": (0.0, None, True, True),
    "optim.beta1": (0.0, 1.0, True, False),
    "optim.beta2": (0.0, 1.0, True, False),
    "optim.min_lr_ratio": (0.0, 1.0, True, True),
    "optim.decay_fraction": (0.0, 1.0, True, True),
    "optim.warmup_steps": (0, None, True, True),
    "trainer.grad_clip": (0.0, None, True, True),
    "trainer.max_bad_steps": (1, None, True, True),
}

CHOICES = {
    "resume": ("auto", "never"),
    "tokenizer_mismatch": ("error", "allow"),
    "precision": ("fp32", "bf16"),
    "device": ("auto", "cpu", "cuda"),
    "stage.name": tuple(STAGES),
    "dpo.loss": ("sigmoid", "ipo", "hinge", "simpo", "orpo", "kto"),
    "kl.estimator": ("k1", "k2", "k3"),
    "ppo.advantage": ("gae", "grpo", "rloo"),
    "strategy.name": tuple(STRATEGIES),
    "kernels.attention": ATTENTION_BACKENDS,
    "kernels.loss": LOSS_BACKENDS,
    "optim.schedule": ("cosine", "wsd", "constant"),
    "logger.wandb.mode": ("offline", "online", "disabled"),
}


_CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")


def import_callable(spec: str, key: str, expected: str = "of the form module:function") -> Callable:
    """``package.module:function`` -> the callable; ConfigError naming the config ``key``, ``spec`` and what failed.

    This IMPORTS AND RUNS USER CODE: importing ``module`` executes it (from the working directory or ``sys.path``),
    and the caller then calls ``function``. Name only modules you trust; a config file or a command line from someone
    else can run anything through a key that takes a callable (``reward.functions``, ...)."""
    from igpt.errors import ConfigError

    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ConfigError(f"{key}: {spec!r} is not {expected} (igpt imports that module and runs the function)")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(
            f"{key}: cannot import {spec!r} ({type(e).__name__}: {e}); {key} imports and runs user code: the "
            f"module must be importable from the working directory or sys.path"
        ) from None
    if not callable(fn):
        raise ConfigError(f"{key}: {spec!r} is not callable")
    return fn


def model_overrides(model: ModelConfig) -> dict[str, Any]:
    """The ``model.*`` values set on top of the model group ``model.name`` names (``conf/model/<name>.yaml``): what a
    user stated explicitly. Empty for a name without a YAML file (nothing to tell apart)."""
    from dataclasses import asdict

    path = os.path.join(_CONF_DIR, "model", f"{model.name}.yaml")
    if not os.path.exists(path):
        return {}
    group = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(path)))
    ours, theirs = asdict(model), asdict(group)
    return {k: v for k, v in ours.items() if v != theirs[k]}


def register() -> None:
    """Register the schemas so conf/*.yaml can name them in their defaults lists."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="igpt_schema", node=Config)
    cs.store(group="model", name="igpt_model_schema", node=ModelConfig)
    cs.store(group="stage", name="igpt_stage_schema", node=StageConfig)
    cs.store(group="strategy", name="igpt_strategy_schema", node=StrategyConfig)
    cs.store(group="data", name="igpt_data_schema", node=DataConfig)


def validate(cfg: DictConfig | dict[str, Any]) -> Config:
    """Re-check a composed config against the schema and return it as a typed ``Config``.

    Raises :class:`igpt.errors.ConfigError` (a ValueError) naming the first unknown key, wrong type or disallowed
    value.
    """
    from omegaconf.errors import ConfigKeyError, ValidationError

    from igpt.errors import ConfigError

    schema = OmegaConf.structured(Config)
    raw = cfg if isinstance(cfg, dict) else OmegaConf.to_container(cfg, resolve=True)
    try:
        merged = OmegaConf.merge(schema, raw)
    except ConfigKeyError as e:
        raise ConfigError(f"unknown config key {e.full_key!r}: it is not in igpt's schema (igpt/config.py)") from None
    except ValidationError as e:
        raise ConfigError(f"config key {e.full_key!r}: {e.msg}") from None
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(merged, key)
        if value not in allowed:
            raise ConfigError(f"config key {key!r} is {value!r}; expected one of {', '.join(allowed)}")
    kind = STAGES[merged.stage.name].kind
    if merged.stage.name == "dpo" and merged.dpo.loss == "kto":
        kind = "kto"  # KTO learns from unpaired examples
    if merged.stage.kind not in (None, kind):
        raise ConfigError(
            f"config key 'stage.kind' is {merged.stage.kind!r}, but stage {merged.stage.name} reads kind={kind} data "
            f"(one of {', '.join(KINDS)}; leave stage.kind unset)"
        )
    merged.stage.kind = kind
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        raise ConfigError(f"config key {missing[0]!r} must be set (e.g. {missing[0]}=<value> on the command line)")
    for key in POSITIVE:  # a 0 here was a ZeroDivisionError deep in the model or the loader
        value = OmegaConf.select(merged, key)
        if value is not None and value < 1:
            raise ConfigError(f"config key {key!r} is {value}; expected a positive integer")
    for key, (low, high, low_in, high_in) in RANGES.items():
        value = OmegaConf.select(merged, key)
        below = value < low if low_in else value <= low
        above = high is not None and (value > high if high_in else value >= high)
        if below or above:
            lo, hi = ("[" if low_in else "("), ("]" if high_in else ")")
            raise ConfigError(f"config key {key!r} is {value}; expected a value in {lo}{low}, "
                              f"{'inf' if high is None else high}{hi}")
    if merged.trainer.max_steps < 0:
        raise ConfigError(f"config key 'trainer.max_steps' is {merged.trainer.max_steps}; expected >= 0")
    m = merged.model
    if m.n_heads % m.n_kv_heads or (m.head_dim is None and m.dim % m.n_heads):
        raise ConfigError(
            f"model: n_heads ({m.n_heads}) must be a multiple of n_kv_heads ({m.n_kv_heads}) and divide dim ({m.dim}) "
            f"unless model.head_dim is set"
        )
    out = OmegaConf.to_object(merged)
    assert isinstance(out, Config)
    return out
