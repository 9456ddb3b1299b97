"""DeepSpeed ZeRO stages 1-3 (``strategy=zero1|zero2|zero3``) through ``deepspeed.initialize``.

ZeRO (Rajbhandari et al. 2020) partitions the optimizer state (stage 1), also the gradients (stage 2) and also the
parameters (stage 3) over the data-parallel ranks. The DeepSpeed config is generated here from ``StrategyConfig`` and
``precision`` (``deepspeed_config``), never kept as a second hand-written JSON that could drift.

How the trainer's contract maps onto the engine:

- optimizer: igpt's own torch ``AdamW`` (``base.build_adamw``: decay on matrices only) is handed to DeepSpeed as the
  client optimizer, so the update is the same math as every other strategy's; ZeRO wraps it.
- accumulation: DeepSpeed's ``gradient_accumulation_steps`` is 1 (so ``engine.backward`` never rescales the loss,
  which the trainer has already normalised by the global token count) and the accumulation boundary is set per
  micro-batch from ``no_sync(last_micro)`` with ``engine.set_gradient_accumulation_boundary``: ZeRO-1 all-reduces
  only on the last micro-batch, ZeRO-2/3 reduce-scatter into their gradient partitions every micro-batch.
- clipping: DeepSpeed clips with the trainer's ``grad_clip`` (set on the engine before each step, the same
  ``max_norm / (norm + 1e-6)`` factor as ``torch.nn.utils.clip_grad_norm_``) and reports the pre-clip norm.
- non-finite gradients: ZeRO's step detects them (inf/NaN norm) and skips the update, which is what the trainer asks
  for with ``skip=True`` (it does so only when the loss, hence every gradient, is non-finite).
- bf16: DeepSpeed's bf16 mode (bf16 weights for compute, fp32 master weights and optimizer state), so ``autocast()``
  is a no-op here.
- ZeRO-3 gathers a parameter when its owning module runs; the model's fused loss reads ``lm_head.weight`` directly,
  so that weight is registered as an external parameter of the root module.

Checkpoints are independent of the stage and the world size: ``model.safetensors`` holds the consolidated fp32
(master) weights, so ``igpt.checkpoint.read_model_state`` loads any ZeRO checkpoint in one process (generate, export,
``init_from``), and ``optimizer.safetensors`` AdamW's ``exp_avg`` and ``exp_avg_sq`` of every parameter whole, with
the step in its metadata. Both are written one parameter at a time (``deepspeed.utils.safe_get_full_fp32_param`` /
``safe_get_full_optimizer_state`` gather it, rank 0 streams it to disk) and read back the same way with
``safe_set_full_*``, each rank keeping its partition, so a ZeRO-1/2/3 run resumes exactly on any number of ranks, as
DeepSpeed's universal checkpoints do. Older checkpoints with only DeepSpeed's own per-rank ``deepspeed/`` folder are not
resumed (DeepSpeed unpickles them with ``weights_only=False``, which can run code); their weights start a new run.

Meta-device initialisation: a model built on the meta device is filled whole under ZeRO-1/2 (they keep full
parameters); under ZeRO-3 its parameters are partitioned first (``deepspeed.zero.Init(module=...)`` on uninitialised
memory) and only this rank's partition is filled, before ``deepspeed.initialize`` builds the fp32 master partitions
from it.

Several models share the process group as in DeepSpeed-Chat: each trainable model is its own engine with its own
optimizer; a frozen model under ZeRO-3 is an engine built without an optimizer (its parameters partitioned, gathered
per module as it runs), under ZeRO-1/2 a plain replica in the engines' compute dtype. For many forward passes in a row
(generation) ``Wrapped.gathered`` gathers a ZeRO-3 model once into a plain, unhooked copy and decodes with that (its
module hooks would otherwise gather every parameter on every forward: measured 330-390 ms against 91 ms, copy
included, for 20 decode-like forwards of a 4-block model on 2 gloo ranks); the copy costs one full set of weights per
rank while it lives.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from igpt.config import OptimConfig, StrategyConfig
from igpt.errors import CheckpointError, MissingPathError
from igpt.parallel.base import Strategy, Wrapped, build_adamw
from igpt.parallel.fsdp import init_single_process_group
from igpt.parallel.init import ModelInit, on_meta, to_empty
from igpt.precision import compute_dtype
from igpt.shards import Shard, plain_name

log = logging.getLogger("igpt")

DS_DIR = "deepspeed"  # DeepSpeed's own checkpoint inside an igpt checkpoint directory
DS_TAG = "state"
OPTIM_FILE = "optimizer.safetensors"  # AdamW's state per parameter (world-size independent)
ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def deepspeed_config(cfg: StrategyConfig, precision: str, world_size: int, device: torch.device) -> dict[str, Any]:
    """The DeepSpeed JSON config for ``strategy=zero<stage>`` (the only place it is made).

    Batch sizes are bookkeeping only: the trainer owns micro-batching, accumulation and loss normalisation.
    """
    stage = int(cfg.name.removeprefix("zero"))
    if cfg.offload_params and stage != 3:
        raise ValueError(f"strategy.offload_params=true needs strategy=zero3 (ZeRO-{stage} keeps full parameters)")
    zero: dict[str, Any] = {"stage": stage}
    pin = device.type == "cuda"
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if cfg.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": world_size,
        "gradient_clipping": 0.0,  # set from trainer.grad_clip before every step (clip_and_step)
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16", "check_grad_overflow": True},
        "zero_allow_untested_optimizer": True,  # igpt's torch AdamW as the client optimizer
        "zero_force_ds_cpu_optimizer": False,  # ... also with optimizer offload (same math as the other strategies)
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


class ZeroWrapped(Wrapped):
    """A DeepSpeed engine (trainable, or frozen under ZeRO-3) or a plain frozen replica (ZeRO-1/2)."""

    strategy: ZeroStrategy

    @property
    def engine(self):
        import deepspeed

        return self.model if isinstance(self.model, deepspeed.DeepSpeedEngine) else None

    # ---- step --------------------------------------------------------------------------------------------------
    def no_sync(self, last_micro: bool) -> contextlib.AbstractContextManager:
        self.engine.set_gradient_accumulation_boundary(last_micro)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # gradient_accumulation_steps=1: the loss is used as given

    def clip_and_step(self, max_norm: float, skip: bool = False) -> float:
        engine = self.engine
        assert engine is not None and self.optimizer is not None, f"model {self.name!r} is frozen"
        engine._config.gradient_clipping = max_norm
        engine.optimizer.clip_grad = max_norm  # the ZeRO optimizers read their copy of gradient_clipping
        engine.set_gradient_accumulation_boundary(True)
        engine.step()
        norm = engine.get_global_grad_norm()
        applied = engine.was_step_applied()
        if skip and applied:
            log.error("%s: the update was asked to be skipped but DeepSpeed applied it (finite gradients)", self.name)
        return float("nan") if norm is None else float(norm)

    # ---- whole weights ---------------------------------------------------------------------------------------
    def _zero3(self) -> bool:
        return self.strategy.stage == 3 and self.engine is not None

    @contextlib.contextmanager
    def gathered(self) -> Iterator[nn.Module]:
        if not self._zero3():
            with torch.no_grad():
                yield self.module
            return
        import deepspeed

        module = self.module
        params = list(module.parameters())
        with torch.no_grad(), deepspeed.zero.GatheredParameters(params):
            copy_ = _plain_copy(module)
        try:
            with torch.no_grad():
                yield copy_
        finally:
            del copy_

    @contextlib.contextmanager
    def full_param(self, name: str) -> Iterator[torch.Tensor]:
        p = self.module.get_parameter(name)
        if not self._zero3():
            yield p.detach()
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters([p]):
            yield p.detach()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full fp32 (master) weights on CPU on rank 0 (empty elsewhere); a frozen model's weights as it computes with
        them. Collective: every rank must call it."""
        from deepspeed.utils import safe_get_full_fp32_param

        out: dict[str, torch.Tensor] = {}
        seen: dict[int, str] = {}
        for name, p in self.module.named_parameters(remove_duplicate=False):
            key = plain_name(name)
            if id(p) in seen:  # tied weights: one gather, every key of the plain model's state dict
                if self.strategy.rank == 0:
                    out[key] = out[seen[id(p)]]
                continue
            seen[id(p)] = key
            if self.optimizer is not None:
                full = safe_get_full_fp32_param(p)  # gathers the ZeRO partitions (collective for ZeRO-3)
                if full is None:
                    raise RuntimeError(f"{self.strategy.name}: parameter {name} has no DeepSpeed fp32 master copy")
            else:  # a frozen model: its (compute-dtype) weights, gathered under ZeRO-3
                with self.full_param(name) as value:
                    full = value.clone()
            if self.strategy.rank == 0:
                out[key] = full.detach().to("cpu", torch.float32).clone()
        return out

    # ---- checkpoint ------------------------------------------------------------------------------------------
    def _named_params(self) -> list[tuple[str, nn.Parameter]]:
        """The trainable parameters under the plain model's names; a tied matrix once (as ``embed_tokens.weight``)."""
        return [(plain_name(n), p) for n, p in self.module.named_parameters()]

    def _ensure_optimizer_state(self) -> None:
        """AdamW's state (zeros, step 0) for every fp32 partition that has none yet, linked to DeepSpeed's
        per-parameter fragments, so that :meth:`load` can set it before the first step (AdamW creates its state at
        the first step; ZeRO-1/2 link their fragments to it then)."""
        inner = self.optimizer.optimizer  # igpt's torch AdamW over DeepSpeed's flat fp32 partitions
        flats = getattr(self.optimizer, "fp32_partitioned_groups_flat", None)  # ZeRO-3: its groups are empty between
        if flats is None:  # steps; ZeRO-1/2: the groups hold the partitions
            flats = [flat for group in inner.param_groups for flat in group["params"]]
        for flat in flats:
            state = inner.state[flat]
            if not state:
                state.update(step=torch.tensor(0.0, dtype=torch.float32), exp_avg=torch.zeros_like(flat),
                             exp_avg_sq=torch.zeros_like(flat))
        link = getattr(self.optimizer, "_lazy_init_hp_params_optimizer_state", None)
        if link is not None:  # ZeRO-1/2 (and DeepSpeed's bf16 optimizer) link the fragments once, after the first
            # group's first step, so the second group (igpt's no-decay parameters) was linked to an empty state: link
            # again now that every group has its state
            self.optimizer._hp_optimizer_states_linked = False
            link()

    def _adam_step(self) -> int:
        inner = self.optimizer.optimizer
        steps = {int(float(st["step"])) for st in inner.state.values() if "step" in st}
        if len(steps) > 1:
            raise RuntimeError(f"{self.strategy.name}: AdamW's partitions are at different steps {sorted(steps)}")
        return steps.pop() if steps else 0

    def save(self, ckpt_dir: str) -> list[str]:
        """``model.safetensors`` (fp32 master weights) and ``optimizer.safetensors`` (AdamW's ``exp_avg`` and
        ``exp_avg_sq`` per parameter, the step in its metadata): whole tensors under the plain model's names, which do
        not depend on the world size or the ZeRO stage. Each parameter is gathered in turn (collective) and rank 0
        streams it to disk, so no rank holds more than one full tensor beyond its partitions."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        from igpt.checkpoint import SafetensorsWriter

        assert self.engine is not None and self.optimizer is not None, f"model {self.name!r} is frozen"
        self._ensure_optimizer_state()
        params = [(n, p, tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape))
                  for n, p in self._named_params()]
        main = self.strategy.rank == 0
        if main:
            weights = SafetensorsWriter(os.path.join(ckpt_dir, "model.safetensors"),
                                        [(n, torch.float32, shape) for n, _, shape in params])
            optim = SafetensorsWriter(os.path.join(ckpt_dir, OPTIM_FILE),
                                      [(f"{key}.{n}", torch.float32, shape)
                                       for n, _, shape in params for key in ADAM_KEYS],
                                      {"step": str(self._adam_step()), "stage": str(self.strategy.stage),
                                       "world_size": str(self.strategy.world_size)})
        for name, p, shape in params:
            full = safe_get_full_fp32_param(p)  # gathers the ZeRO partitions (collective)
            if full is None:
                raise RuntimeError(f"{self.strategy.name}: parameter {name} has no DeepSpeed fp32 master copy")
            if main:
                weights.write(name, full.float().reshape(shape))
            del full
            for key in ADAM_KEYS:
                state = safe_get_full_optimizer_state(p, key)  # collective too
                if main:
                    optim.write(f"{key}.{name}", state.float().reshape(shape))
        if main:
            weights.close()
            optim.close()
        return ["model.safetensors", OPTIM_FILE]

    def load(self, ckpt_dir: str, meta: dict[str, Any]) -> None:
        """Resume from a ZeRO checkpoint written at any world size and stage: every parameter's fp32 master weights
        and AdamW state are read whole, one parameter at a time, and each rank keeps its partition
        (``safe_set_full_fp32_param`` / ``safe_set_full_optimizer_state``); the compute weights follow the master
        weights. Older checkpoints with only DeepSpeed's own per-rank files (``deepspeed/``) are refused: DeepSpeed
        unpickles them without ``weights_only``."""
        strategy = self.strategy
        assert self.engine is not None, f"model {self.name!r} is frozen: nothing to resume"
        zero = str(meta.get("strategy") or "").startswith("zero")
        if zero and os.path.exists(os.path.join(ckpt_dir, OPTIM_FILE)):
            self._load_universal(ckpt_dir)
            return
        ds_dir = os.path.join(ckpt_dir, DS_DIR)
        if zero and os.path.isdir(ds_dir):
            # DeepSpeed reads its per-rank files with torch.load(weights_only=False): a crafted file runs code
            raise CheckpointError(
                f"{ckpt_dir}: an older ZeRO checkpoint with only DeepSpeed's own per-rank files ({ds_dir}), which "
                f"DeepSpeed unpickles with torch.load(weights_only=False) (a crafted file can run code), so igpt no "
                f"longer resumes from it; start a new run from its weights with init_from={ckpt_dir}"
            )
        raise MissingPathError(
            f"{ckpt_dir}: written by strategy={meta.get('strategy')}, so it has no ZeRO optimizer state "
            f"({OPTIM_FILE}) to resume strategy={strategy.name} from. Resume under "
            f"strategy={meta.get('strategy')}, or start a new run from its weights with init_from={ckpt_dir}"
        )

    @torch.no_grad()
    def _load_universal(self, ckpt_dir: str) -> None:
        import deepspeed
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
        from safetensors import safe_open

        from igpt.checkpoint import _safetensors_error

        self._ensure_optimizer_state()
        paths = [os.path.join(ckpt_dir, "model.safetensors"), os.path.join(ckpt_dir, OPTIM_FILE)]
        handles = []
        for path in paths:
            try:
                handles.append(safe_open(path, framework="pt"))
            except Exception as e:
                raise _safetensors_error(path, e) from None
        fw, fo = handles
        with fw, fo:
            step = int(fo.metadata()["step"])
            names = set(fw.keys())
            params = self._named_params()
            missing = [n for n, _ in params if n not in names]
            if missing:
                raise ValueError(f"{paths[0]}: no weights for {missing[:5]} (the checkpoint holds another model)")
            device = self.strategy.device
            for name, p in params:
                full = fw.get_tensor(name).to(device)
                safe_set_full_fp32_param(p, full.view(-1) if self._zero3() else full.view(p.shape))
                for key in ADAM_KEYS:
                    value = fo.get_tensor(f"{key}.{name}").to(device)
                    safe_set_full_optimizer_state(p, value.view(-1) if self._zero3() else value.view(p.shape), key)
                if self._zero3():  # the compute weights: this rank's partition, from rank 0's gathered copy
                    with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                        if self.strategy.rank == 0:
                            p.data.copy_(full.view(p.shape))
                else:
                    p.data.copy_(full.view(p.shape))
                del full
        for state in self.optimizer.optimizer.state.values():
            state["step"].fill_(float(step))
        log.info("%s: resumed %r from %s (fp32 weights and AdamW state of %d parameters, step %d)",
                 self.strategy.name, self.name, ckpt_dir, len(params), step)


def _forget_stale_world_group() -> None:
    """DeepSpeed keeps a clone of the world group in a module global; after a process group is destroyed and another
    made in the same process (several runs in one Python process, as in the tests) the clone belongs to the dead one
    and every collective on it fails. Let DeepSpeed clone the current world group instead."""
    from deepspeed.utils import groups
    from torch.distributed import distributed_c10d as c10d

    if groups._WORLD_GROUP is not None and groups._WORLD_GROUP not in c10d._world.pg_group_ranks:
        groups._WORLD_GROUP = None


def _plain_copy(module: nn.Module) -> nn.Module:
    """An unhooked copy of a (gathered) ZeRO-3 ``Transformer``: fresh modules, the gathered values copied in."""
    from igpt.model import Transformer

    with torch.device("meta"):
        plain = Transformer(module.cfg, module.attention_backend, module.loss_backend, module.head)
    plain.to_empty(device=next(module.parameters()).device)
    state = {plain_name(k): v for k, v in module.state_dict().items()}
    plain.load_state_dict(state)
    plain.retie()
    return plain.to(next(module.parameters()).dtype).eval()


class ZeroStrategy(Strategy):
    name = "zero"
    wrapped_class = ZeroWrapped

    def __init__(self, cfg: StrategyConfig, precision: str, device: torch.device) -> None:
        super().__init__(cfg, precision, device)
        self.name = cfg.name
        self.stage = int(cfg.name.removeprefix("zero"))
        self.sharded = self.stage == 3
        init_single_process_group(device)
        _forget_stale_world_group()

    # ---- setup -----------------------------------------------------------------------------------------------
    def wrap_model(
        self, model: nn.Module, optim_cfg: OptimConfig | None = None, name: str = "policy",
        init: ModelInit | None = None,
    ) -> Wrapped:
        """Place ``model`` in a DeepSpeed engine. A model built on the meta device is filled by ``init``: whole under
        ZeRO-1/2 (they keep full parameters), under ZeRO-3 only this rank's partitions (``_partition``)."""
        import deepspeed
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)
        trainable = optim_cfg is not None
        config = deepspeed_config(self.cfg, self.precision, self.world_size, self.device)
        os.environ.setdefault("LOCAL_RANK", str(self.local_rank))  # DeepSpeed asserts it; unset without torchrun
        if self.stage == 3 and on_meta(model):
            if init is None:
                raise ValueError(f"model {name!r} is on the meta device: wrap_model needs its ModelInit to fill it")
            model = self.prepare_model(model, trainable=trainable)
            self._partition(model, init, name, config)
        else:
            model = self.prepare_model(self.materialize(model, init, name), trainable=trainable)
        if not trainable and self.stage < 3:
            # ZeRO-1/2 never partition parameters: a replica in the engines' compute dtype computes what they do
            model.requires_grad_(False)
            if self.precision == "bf16":
                model.to(torch.bfloat16)
            return ZeroWrapped(self, name, model, None)
        if self.stage == 3 and getattr(model, "lm_head", None) is not None:
            # the fused loss reads lm_head.weight outside lm_head.forward: gather it for the root's forward/backward
            deepspeed.zero.register_external_parameter(model, model.lm_head.weight)
        if trainable:
            engine, optimizer, _, _ = deepspeed.initialize(
                model=model, optimizer=build_adamw(model, optim_cfg), config=config, dist_init_required=False
            )
        else:
            model.requires_grad_(False).eval()
            engine, optimizer = deepspeed.initialize(model=model, config=config, dist_init_required=False)[0], None
        log.info("%s: DeepSpeed ZeRO-%d %s model %r over %d ranks, config %s", self.name, self.stage,
                 "trainable" if trainable else "frozen", name, self.world_size, config)
        return ZeroWrapped(self, name, engine, optimizer)

    def _partition(self, model: nn.Module, init: ModelInit, name: str, config: dict[str, Any]) -> None:
        """ZeRO-3 partitioning of a meta model before the engine exists: every parameter gets uninitialised memory
        (``to_empty``: address space, not resident until written), ``deepspeed.zero.Init(module=...)`` converts the
        parameters one by one into this rank's partition (``ds_tensor``; it broadcasts each one whole from rank 0
        first, so one full parameter is resident at a time) and frees each full tensor, then ``init`` fills the
        partitions. The engine then finds the parameters already partitioned, as under ``zero.Init``."""
        import deepspeed

        dtype = compute_dtype(self.precision)  # the engine's dtype for ZeRO-Init
        model.to(dtype)  # on meta: nothing allocated
        to_empty(model, self.device)
        deepspeed.comm.init_distributed(dist_init_required=False)  # what deepspeed.initialize would do first
        deepspeed.zero.Init(module=model, config_dict_or_path=config, dtype=dtype)
        shards: dict[str, Shard] = {}
        for pname, p in model.named_parameters():
            part = p.ds_tensor.ds_numel
            lo = min(p.ds_numel, self.rank * part)
            hi = min(p.ds_numel, lo + part)
            shards[plain_name(pname)] = Shard(tuple(p.ds_shape), lo, hi, p.ds_tensor.data.view(-1)[: hi - lo])
        init.apply(shards, self.progress_desc(name))

    def autocast(self) -> contextlib.AbstractContextManager:
        """A no-op: DeepSpeed's bf16 mode already computes in bf16 with fp32 master weights."""
        return contextlib.nullcontext()
