"""Will it fit? Per-rank memory, the largest micro-batch and the expected throughput of a training configuration.

    python -m igpt.plan model=llama_8b strategy=fsdp world_size=64 precision=bf16 trainer.seq_len=8192 \\
        [gpu_memory_gb=80] [reserve_gb=4] [mfu=0.4] [gpu=H100 | peak_tflops=989] [trainer.micro_batch_size=2] \\
        [strategy.activation_checkpointing=true] [kernels.loss=triton]

Everything except the planner's own keys (``world_size``, ``gpu_memory_gb``, ``reserve_gb``, ``mfu``, ``gpu``,
``peak_tflops``) is a training override, composed by Hydra from ``conf/`` and checked by ``igpt.config.validate``
exactly as ``igpt/train.py`` does (``data.dir`` may be left out). Nothing is allocated, as in torchtitan's memory
estimator (``scripts/estimate/estimation.py``): the model is built on the meta device to read its parameter shapes,
and the activations come from a forward and backward traced on fake tensors (``FakeTensorMode``) under
``torch.distributed._tools.MemTracker``, the tracker torchtitan's estimator uses. Per rank:

- **parameters, gradients, optimizer state** (AdamW ``m`` and ``v`` in fp32, plus fp32 master weights where the
  strategy keeps a separate copy), from the parameter shapes and each strategy's sharding over ``world_size`` ranks
  (``b`` = 2 bytes with ``precision=bf16``, else 4; ``P`` parameters, ``W`` ranks):

  | strategy | parameters | gradients | optimizer state |
  |---|---|---|---|
  | single, ddp | ``4P`` (fp32; bf16 is autocast) | ``4P`` (ddp: ``8P``, its all-reduce buckets are a copy) | ``8P`` |
  | fsdp | ``4P/W`` (each dim-0 shard rounded up) | ``4P/W`` | ``8P/W`` |
  | zero1 | ``bP`` | ``bP`` | ``12P/W`` (fp32 master partition + m, v) |
  | zero2 | ``bP`` | ``bP/W`` | ``12P/W`` |
  | zero3 | ``bP/W`` + ``bN`` (*) | ``bP/W`` | ``8P/W``, + ``4P/W`` with bf16 |

  (*) ``N``: the parameters of at most 1e5 elements, which DeepSpeed never partitions (its default
  ``stage3_param_persistence_threshold``); ZeRO-3 in fp32 updates its partition in place (no master copy).

- **gathered**: memory that exists only during forward and backward. FSDP: the root module's parameters (embedding,
  final norm, output head) and three blocks (the one computing, the prefetched one, the last block, which stays
  gathered for the backward) in the compute dtype, plus one block's unsharded fp32 gradients before their
  reduce-scatter; with ``strategy.reshard_after_forward=false`` every block stays gathered. ZeRO-3: the output head
  (registered with the root, so gathered for the whole forward), one block and DeepSpeed's default prefetch bucket
  (5e7 elements) in the compute dtype. ZeRO-1/2/3: DeepSpeed's gradient bucket (``reduce_bucket_size``, 5e8 elements,
  or the model if smaller).
- **activations** of a micro-batch of ``m`` sequences of ``trainer.seq_len`` tokens, with and without activation
  checkpointing: the peak of a forward+backward traced on fake tensors, above the parameters. Traces of the full
  depth would take minutes for 80 blocks, so the planner traces the model cut to one block (everything else at full
  size) at micro-batches 1, 2, 32 and 64, and cut to two blocks at micro-batch 1, and fits ``m x n_layers x
  per-block + max(line through 1 and 2, line through 32 and 64)``: one line per phase of the step that can hold the
  peak (the loss's forward early on, a block's recomputation in the backward later). The trace runs in the
  strategy's compute regime: fp32; bf16 autocast over fp32 weights (single, ddp); or bf16 weights (fsdp's
  ``param_dtype``, DeepSpeed's bf16 mode). Besides the blocks it holds the embedding output, the final norm and
  **the loss**: with ``kernels.loss=torch`` the ``(N, V)`` logits, their fp32 copy and gradient; with
  ``kernels.loss=triton`` the footprint of ``igpt.kernels.fused_linear_cross_entropy`` (its ``grad_hidden``, one
  chunk of logits, and a ``(V, dim)`` fp32 ``grad_weight`` accumulator whatever the micro-batch), traced through a
  plain-torch stand-in that allocates the same tensors. Rows are traced without document boundaries; packed rows add
  one ``(N, Hq x D)`` copy per block for the regrouped attention output (``igpt/model/attention.py``; about 5% of a
  block's activations). The embedding's backward runs last, when no activation is left; with tied embeddings the
  output head's gradient waits there for the embedding's and the two are summed: ``2 V x dim`` gradient elements
  beyond the parameter gradients, a floor under the activations rather than an addition to them.

The largest micro-batch is the largest ``m`` with ``parameters + gradients + optimizer + gathered + max(activations
at m, tied gradients) <= gpu_memory_gb - reserve_gb`` (``reserve_gb``: CUDA context, NCCL and cuBLAS
workspaces, allocator fragmentation). Throughput: ``mfu x peak / flops_per_token`` tokens/s per GPU, with
``igpt.model.flops``'s count (6N plus attention, the convention of PaLM and of torchtitan's MFU), so recomputation
under activation checkpointing is work the MFU does not count.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import warnings
from dataclasses import dataclass

import torch

from igpt.cli import spec_of, usage, wants_help
from igpt.config import Config, ModelConfig, validate
from igpt.precision import compute_dtype

GiB = 2**30
PLAN_KEYS = {"world_size": int, "gpu_memory_gb": float, "reserve_gb": float, "mfu": float, "gpu": str,
             "peak_tflops": float}  # fmt: skip
# DeepSpeed's defaults, which igpt.parallel.zero.deepspeed_config does not change
DS_PERSISTENCE_THRESHOLD = 100_000  # stage3_param_persistence_threshold: smaller parameters are never partitioned
DS_PREFETCH_BUCKET = 50_000_000  # stage3_prefetch_bucket_size (elements)
DS_REDUCE_BUCKET = 500_000_000  # reduce_bucket_size (elements)
LARGE = 32  # a micro-batch large enough that the phase whose peak grows fastest with it holds the peak


@dataclass
class ParamLayout:
    """The parameter shapes of a model, read on the meta device."""

    shapes: list[tuple[str, tuple[int, ...]]]  # every distinct parameter (a tied matrix once)
    block_numel: int  # parameters of one transformer block
    root_numel: int  # parameters outside the blocks (embedding, final norm, output head)
    head_numel: int  # the output head's matrix

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for _, s in self.shapes)


@dataclass
class StateMemory:
    """Bytes one rank holds for the model's state, and what is gathered only during forward and backward."""

    params: float
    grads: float
    optimizer: float
    gathered: float


@dataclass
class Activations:
    """Peak activation bytes of a micro-batch of ``m`` sequences, a convex piecewise-linear fit of traced peaks:
    ``m x n_layers x per_layer + max over lines (m x rest + fixed)``.

    Each line is one phase of the step holding the peak: early on (the loss's forward, with the fused loss's
    ``(V, dim)`` fp32 gradient accumulator, a cost per micro-batch whatever its size) or later (a block's backward
    recomputing its activations under checkpointing, a cost per sequence). ``rest`` is per sequence besides the blocks'
    share (embedding output, final norm, the loss, a recomputed block), ``fixed`` per micro-batch.
    """

    per_layer: float  # per sequence and block: every phase holds the saved tensors of all blocks
    lines: list[tuple[float, float]]  # (rest, fixed)
    n_layers: int

    def at(self, micro_batch_size: int) -> float:
        m = micro_batch_size
        return m * self.n_layers * self.per_layer + max(m * rest + fixed for rest, fixed in self.lines)

    @property
    def per_sequence(self) -> float:
        """What each further sequence adds once the micro-batch is large."""
        return self.n_layers * self.per_layer + max(rest for rest, _ in self.lines)


@dataclass
class Plan:
    config: Config
    world_size: int
    gpu_memory_gb: float
    reserve_gb: float
    mfu: float
    peak_flops: float
    gpu: str
    n_params: int
    state: StateMemory
    activations: Activations  # without activation checkpointing
    activations_ac: Activations  # with it
    tied_grads: float  # a tied matrix's two gradients at the end of the backward, when no activation is left
    flops_per_token: float

    @property
    def static(self) -> float:
        s = self.state
        return s.params + s.grads + s.optimizer + s.gathered

    @property
    def usable(self) -> float:
        return (self.gpu_memory_gb - self.reserve_gb) * GiB

    def acts(self, checkpointing: bool | None = None) -> Activations:
        """The activations with or without checkpointing (None: as configured)."""
        if checkpointing is None:
            checkpointing = self.config.strategy.activation_checkpointing
        return self.activations_ac if checkpointing else self.activations

    def total(self, micro_batch_size: int, checkpointing: bool | None = None) -> float:
        """Peak bytes per rank at this micro-batch size."""
        return self.static + max(self.acts(checkpointing).at(micro_batch_size), self.tied_grads)

    def max_micro_batch(self, checkpointing: bool | None = None) -> int:
        act = self.acts(checkpointing)
        room = self.usable - self.static
        if room < max(act.at(1), self.tied_grads):
            return 0
        lo, hi = 1, 2
        while act.at(hi) <= room:
            lo, hi = hi, 2 * hi
        while hi - lo > 1:  # act.at grows with the micro-batch: bisect for the last size that fits
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if act.at(mid) <= room else (lo, mid)
        return lo

    @property
    def tokens_per_s_per_gpu(self) -> float:
        return self.mfu * self.peak_flops / self.flops_per_token


# ------------------------------------------------------------------------------------------------ configuration


def compose(overrides: list[str]) -> tuple[Config, dict]:
    """Split the planner's own keys from the training overrides; compose and validate those as training does."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from igpt.config import register
    from igpt.train import CONF_DIR

    plan_args: dict = {}
    rest = []
    for arg in overrides:
        key, sep, value = arg.partition("=")
        if sep and key in PLAN_KEYS:
            try:
                plan_args[key] = PLAN_KEYS[key](value)
            except ValueError:
                raise ValueError(f"{key}={value!r}: expected a {PLAN_KEYS[key].__name__}") from None
        else:
            rest.append(arg)
    if not any(a.partition("=")[0].lstrip("+") == "data.dir" for a in rest):
        rest.append("data.dir=unused")  # the planner reads no data
    register()
    try:
        with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
            cfg = hydra_compose("config", overrides=rest)
    except (HydraException, OmegaConfBaseException) as e:
        raise ValueError(f"{e} (planner keys: {', '.join(PLAN_KEYS)})") from None
    return validate(cfg), plan_args


def peak_flops_of(gpu: str | None, peak_tflops: float | None) -> tuple[float, str]:
    """Peak bf16 FLOP/s per GPU: ``peak_tflops`` if given, else ``gpu``'s entry in ``igpt.metrics``'s table (H100 when
    neither is given); and how to name it."""
    from igpt.metrics import _GPU_PEAK_BF16

    if peak_tflops is not None:
        if peak_tflops <= 0:
            raise ValueError(f"peak_tflops={peak_tflops}: expected a positive number of TFLOP/s")
        return peak_tflops * 1e12, f"{gpu or 'a GPU'} at {peak_tflops:g} TFLOP/s"
    gpu = gpu or "H100"
    if gpu not in _GPU_PEAK_BF16:
        raise ValueError(f"gpu={gpu!r}: expected one of {', '.join(_GPU_PEAK_BF16)}, or give peak_tflops=<TFLOP/s>")
    return _GPU_PEAK_BF16[gpu], f"{gpu} ({_GPU_PEAK_BF16[gpu] / 1e12:g} TFLOP/s bf16)"


# ------------------------------------------------------------------------------------------------ parameters


def param_layout(cfg: ModelConfig) -> ParamLayout:
    """Parameter shapes of ``Transformer(cfg)`` built on the meta device (nothing is allocated)."""
    from igpt.model import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    shapes = [(name, tuple(p.shape)) for name, p in model.named_parameters()]  # a tied matrix once
    block = sum(p.numel() for p in model.layers[0].parameters())
    root = sum(math.prod(s) for _, s in shapes) - cfg.n_layers * block
    return ParamLayout(shapes, block, root, model.lm_head.weight.numel())


def state_memory(layout: ParamLayout, cfg: Config, world_size: int) -> StateMemory:
    """Per-rank bytes of parameters, gradients, optimizer state and gathered buffers (module docstring's table)."""
    strat, w = cfg.strategy, world_size
    b = 2 if cfg.precision == "bf16" else 4
    p = layout.numel
    name = strat.name
    if name in ("single", "ddp"):
        grads = 4 * p * (2 if name == "ddp" and w > 1 else 1)
        return StateMemory(params=4 * p, grads=grads, optimizer=8 * p, gathered=0)
    if name == "fsdp":
        shard = sum(math.ceil(s[0] / w) * math.prod(s[1:]) for _, s in layout.shapes)  # FSDP2 pads dim 0 to W
        compute = 2 if cfg.precision == "bf16" or strat.param_dtype in ("bf16", "fp16") else 4
        n = cfg.model.n_layers
        blocks = layout.block_numel * (min(3, n) if strat.reshard_after_forward else n)
        gathered = compute * (layout.root_numel + blocks) + 4 * layout.block_numel
        on_gpu = 0 if strat.cpu_offload else 1  # CPUOffloadPolicy keeps the shards on the host
        return StateMemory(params=4 * shard * on_gpu, grads=4 * shard * on_gpu, optimizer=8 * shard * on_gpu,
                           gathered=gathered)  # fmt: skip
    stage = int(name.removeprefix("zero"))
    bucket = b * min(DS_REDUCE_BUCKET, p)
    master = 0 if (stage == 3 and b == 4) else 4  # ZeRO-3 in fp32 updates its partition in place
    optimizer = (8 + master) * p / w * (0 if strat.offload_optimizer else 1)
    if stage < 3:
        return StateMemory(params=b * p, grads=b * p / (w if stage == 2 else 1), optimizer=optimizer, gathered=bucket)
    persistent = sum(math.prod(s) for _, s in layout.shapes if math.prod(s) <= DS_PERSISTENCE_THRESHOLD)
    partition = sum(math.ceil(math.prod(s) / w) for _, s in layout.shapes)
    params = 0 if strat.offload_params else b * (partition + persistent)
    gathered = b * (layout.head_numel + layout.block_numel + DS_PREFETCH_BUCKET) + bucket
    return StateMemory(params=params, grads=b * partition, optimizer=optimizer, gathered=gathered)


# ------------------------------------------------------------------------------------------------ activations


class _FusedLossFootprint(torch.autograd.Function):
    """The tensors ``igpt.kernels.fused_linear_cross_entropy`` (reduction="sum") allocates, in plain torch ops.

    Its forward computes the gradients chunk by chunk: ``grad_hidden`` ``(N, H)``, an fp32 ``grad_weight``
    accumulator ``(V, H)`` (cast to the weight's dtype at the end), one ``(C, V)`` chunk of logits at a time, and the
    per-token loss and log-sum-exp; its backward scales the saved gradients in place.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        from igpt.kernels.fused_linear_cross_entropy import default_chunk_size

        n, h = hidden.shape
        v = weight.shape[0]
        grad_hidden = torch.empty_like(hidden)  # (N, H)
        acc = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)  # (V, H)
        loss = torch.zeros(n, dtype=torch.float32, device=hidden.device)  # (N,)
        lse = torch.zeros(n, dtype=torch.float32, device=hidden.device)  # (N,)
        chunk = hidden[: default_chunk_size(n, h, v)] @ weight.t()  # (C, V)
        del chunk, lse
        grad_weight = acc if weight.dtype == torch.float32 else acc.to(weight.dtype)
        del acc
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss.sum()

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        return ctx.saved_tensors


def _fused_loss_footprint(
    hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, *args, **kwargs
) -> torch.Tensor:
    """Stands in for ``igpt.kernels.fused_linear_cross_entropy`` in the trace (same arguments, same buffers)."""
    if torch.is_autocast_enabled(hidden.device.type):  # as the kernel does: cast to the autocast dtype first
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    with torch.autocast(hidden.device.type, enabled=False):
        return _FusedLossFootprint.apply(hidden, weight)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _cut_graph(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    return out.detach().requires_grad_()  # the layers see the same graph; the embedding gets no backward


def _drop_grad(p: torch.Tensor) -> None:
    p.grad = None  # parameter gradients are counted by state_memory, not as activations


def traced_peak(
    cfg: ModelConfig, seq_len: int, regime: str, checkpointing: bool, loss: str, micro_batch_size: int = 1
) -> float:
    """Peak bytes above the parameters of a micro-batch's forward+backward, traced on fake tensors.

    ``regime``: ``fp32``; ``autocast`` (fp32 weights, bf16 autocast); ``bf16`` (bf16 weights). ``loss``: ``torch`` or
    ``triton`` (the fused loss's footprint).
    """
    from unittest import mock

    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    from igpt.model import Transformer
    from igpt.parallel.base import apply_activation_checkpointing

    patch = contextlib.nullcontext()
    if loss == "triton":
        patch = mock.patch("igpt.kernels.fused_linear_cross_entropy", _fused_loss_footprint)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if regime == "autocast" else contextlib.nullcontext()
    dtype = compute_dtype(regime)
    # The embedding's backward runs last, when no activation is left: its (dense) gradient is a parameter gradient,
    # and a tied matrix's two gradients meeting there are `Plan.tied_grads`. Left in, it would hide the
    # layers' share of the peak in small traces, so the trace unties the head and cuts the graph below the layers.
    cfg = dataclasses.replace(cfg, tie_embeddings=False)
    with FakeTensorMode(), _default_dtype(dtype), patch, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Expected a tensor", module="torch.distributed._tools")
        model = Transformer(cfg, attention="sdpa", loss=loss)
        model.embed_tokens.register_forward_hook(_cut_graph)
        if checkpointing:
            apply_activation_checkpointing(model)
        for p in model.parameters():
            p.register_post_accumulate_grad_hook(_drop_grad)
        ids = torch.zeros(micro_batch_size, seq_len, dtype=torch.long)
        tracker = MemTracker()
        tracker.track_external(model)
        with tracker:
            with autocast:
                out = model(ids, labels=ids)
            out.backward()
        (snap,) = tracker.get_tracker_snapshot("peak").values()
    by_kind = {getattr(k, "value", k): v for k, v in snap.items()}
    return by_kind["Total"] - by_kind["Parameter"] - by_kind["Buffer"]


def activations(cfg: ModelConfig, seq_len: int, regime: str, checkpointing: bool, loss: str) -> Activations:
    """Fit :class:`Activations` to five traces: the model cut to one block at micro-batches 1, 2, ``LARGE`` and
    ``2 x LARGE`` (a line through each pair: the phase that peaks with few sequences and the one that peaks with
    many), and cut to two blocks at micro-batch 1 (the share of a block)."""

    def peak(n_layers: int, micro_batch_size: int) -> float:
        model_cfg = dataclasses.replace(cfg, n_layers=n_layers)
        return traced_peak(model_cfg, seq_len, regime, checkpointing, loss, micro_batch_size)

    one = peak(1, 1)
    per_layer = peak(2, 1) - one
    lines = []
    for m, first in ((1, one), (LARGE, peak(1, LARGE))):
        slope = (peak(1, 2 * m) - first) / m  # one block and the rest, per sequence
        lines.append((slope - per_layer, first - m * slope))
    return Activations(per_layer, lines, cfg.n_layers)


def compute_regime(cfg: Config) -> str:
    """How the strategy computes: ``fp32``, ``autocast`` (bf16 autocast over fp32 weights: single, ddp) or ``bf16``
    (bf16 weights: fsdp's ``param_dtype``, DeepSpeed's bf16 mode)."""
    name = cfg.strategy.name
    if name == "fsdp" and cfg.strategy.param_dtype in ("bf16", "fp16"):
        return "bf16"
    if cfg.precision != "bf16":
        return "fp32"
    return "autocast" if name in ("single", "ddp") else "bf16"


# ------------------------------------------------------------------------------------------------ the plan


def make_plan(
    cfg: Config,
    world_size: int = 1,
    gpu_memory_gb: float = 80.0,
    reserve_gb: float = 4.0,
    mfu: float = 0.4,
    gpu: str | None = None,
    peak_tflops: float | None = None,
) -> Plan:
    """The plan of ``cfg`` on ``world_size`` ranks of ``gpu_memory_gb`` GiB each (the module docstring says how)."""
    from igpt.model.flops import flops_per_token

    if world_size < 1:
        raise ValueError(f"world_size={world_size}: expected a positive number of ranks")
    if cfg.strategy.name == "single" and world_size != 1:
        raise ValueError(f"strategy=single runs on one rank; world_size={world_size} needs another strategy")
    if gpu_memory_gb <= reserve_gb:
        raise ValueError(f"gpu_memory_gb={gpu_memory_gb} must exceed reserve_gb={reserve_gb}")
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu={mfu}: expected a fraction in (0, 1]")
    peak, gpu_name = peak_flops_of(gpu, peak_tflops)
    seq_len = cfg.trainer.seq_len
    if seq_len > cfg.model.max_seq_len:
        raise ValueError(f"trainer.seq_len={seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}")
    layout = param_layout(cfg.model)
    regime = compute_regime(cfg)
    grad_bytes = 2 if regime == "bf16" else 4
    tied_grads = 2 * grad_bytes * layout.head_numel if cfg.model.tie_embeddings else 0
    return Plan(
        config=cfg,
        world_size=world_size,
        gpu_memory_gb=gpu_memory_gb,
        reserve_gb=reserve_gb,
        mfu=mfu,
        peak_flops=peak,
        gpu=gpu_name,
        n_params=layout.numel,
        state=state_memory(layout, cfg, world_size),
        activations=activations(cfg.model, seq_len, regime, False, cfg.kernels.loss),
        activations_ac=activations(cfg.model, seq_len, regime, True, cfg.kernels.loss),
        tied_grads=tied_grads,
        flops_per_token=flops_per_token(cfg.model, seq_len),
    )


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def report(plan: Plan) -> str:
    """The planner's printout."""
    cfg = plan.config
    t, s = cfg.trainer, plan.state
    ac = cfg.strategy.activation_checkpointing
    mbs = t.micro_batch_size

    unit, scale = ("GiB", GiB) if plan.total(1) >= GiB else ("MiB", 2**20)

    def row(label: str, value: float, note: str = "") -> str:
        return f"  {label:<44}{value / scale:9.2f}  {note}".rstrip()

    lines = [
        f"igpt plan: model={cfg.model.name} ({_count(plan.n_params)} parameters) strategy={cfg.strategy.name} "
        f"world_size={plan.world_size} precision={cfg.precision} seq_len={t.seq_len} kernels.loss={cfg.kernels.loss} "
        f"activation_checkpointing={str(ac).lower()}",
        "",
        f"  {'per rank':<44}{unit:>9}",
        row("parameters", s.params),
        row("gradients", s.grads),
        row("optimizer state", s.optimizer),
        row("gathered during forward and backward", s.gathered),
    ]
    for name, act, on in (("without", plan.activations, False), ("with", plan.activations_ac, True)):
        blocks = act.n_layers * act.per_layer
        note = f"{act.n_layers} blocks x {act.per_layer / scale:.3f}, + {(act.at(1) - blocks) / scale:.2f} the rest"
        lines.append(row(f"activations {name} AC, micro-batch 1", act.at(1), note + ("  <-" if on == ac else "")))
        lines.append(row("  each further sequence", act.per_sequence))
    loss = "(N, V) logits, their fp32 copy and gradient" if cfg.kernels.loss == "torch" else "fused: no logits"
    lines.append(f"  (kernels.loss={cfg.kernels.loss}: {loss})")
    if plan.tied_grads:
        lines.append(row("tied embedding's gradients, end of backward", plan.tied_grads, "a floor, not added"))
    usable = f"{plan.gpu_memory_gb:g} GiB - {plan.reserve_gb:g} GiB reserve = {plan.usable / GiB:.1f} GiB"
    lines += ["", f"  usable: {usable}"]
    for on in (False, True):
        m = plan.max_micro_batch(on)
        fit = f"{m} ({plan.total(m, on) / GiB:.1f} GiB)" if m else f"none (1 needs {plan.total(1, on) / GiB:.1f} GiB)"
        lines.append(f"  largest micro-batch, AC {'on ' if on else 'off'}: {fit}")
    verdict = "fits" if plan.total(mbs) <= plan.usable else "does NOT fit"
    lines.append(f"  trainer.micro_batch_size={mbs}: {plan.total(mbs) / GiB:.1f} GiB per rank, {verdict}")
    accum, left = divmod(t.global_batch_size, mbs * plan.world_size)
    if left or not accum:
        lines.append(
            f"  note: trainer.global_batch_size={t.global_batch_size} is not a multiple of micro_batch_size x "
            f"world_size = {mbs * plan.world_size}; training would stop at start"
        )
    tps = plan.tokens_per_s_per_gpu
    step = t.global_batch_size * t.seq_len / (tps * plan.world_size)
    lines += [
        "",
        f"throughput at MFU {plan.mfu:g} on {plan.gpu}: {tps:,.0f} tokens/s per GPU, "
        f"{tps * plan.world_size:,.0f} tokens/s in all ({plan.flops_per_token / 1e9:.3g} GFLOP per token); "
        f"a step of {t.global_batch_size} x {t.seq_len} tokens: {step:.2f} s",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if wants_help(argv):  # the planner's keys, then any training override (python igpt/train.py --help lists those)
        spec = {k: v for k, v in spec_of(make_plan, skip=("cfg",)).items() if k in PLAN_KEYS}
        print(usage("igpt.plan", spec, __doc__).replace(" [", " [<training overrides>] [", 1))
        return
    try:
        cfg, plan_args = compose(argv)
        print(report(make_plan(cfg, **plan_args)))
    except ValueError as e:
        print(f"igpt.plan: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
