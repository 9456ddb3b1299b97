"""Direct preference optimisation (Rafailov et al. 2023), its IPO and hinge variants, the reference-free SimPO and
ORPO, and KTO on unpaired examples.

The policy (``init_from``, the SFT model) learns from the same comparisons as a reward model (``igpt.stages.pref``:
pairs, or the untied pairs of a K-wise ranking, each weighing 1 / (its record's untied pairs)) against a frozen
reference (``reference_from``, default ``init_from``). With ``pi`` and ``ref`` the summed log-probabilities of a
response's tokens (``<|im_end|>`` included) and ``w`` / ``l`` the preferred and the other response,

    h = (log pi(w) - log ref(w)) - (log pi(l) - log ref(l))

- ``dpo.loss=sigmoid`` (DPO): ``-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``; ``eps`` =
  ``dpo.label_smoothing`` is conservative DPO (Mitchell 2023: labels assumed flipped with probability eps).
- ``dpo.loss=ipo`` (Azar et al. 2023): ``(h' - 1 / (2 beta))^2`` where ``h'`` uses *length-normalised* log-ratios
  (each log-ratio divided by its response's token count), as TRL implements IPO; the paper's formulation is per
  sequence, and the normalisation keeps the 1/(2 beta) target on one scale whatever the response lengths.
- ``dpo.loss=hinge`` (SLiC, Zhao et al. 2023): ``max(0, 1 - beta h)``.
- ``dpo.loss=simpo`` (SimPO, Meng et al. 2024; reference-free): ``-(1 - eps) log sigmoid(beta (a_w - a_l) - gamma)
  - eps log sigmoid(-(beta (a_w - a_l) - gamma))`` with ``a`` the *mean* token log-prob of a response under the policy
  and ``gamma`` = ``dpo.simpo_gamma`` the target reward margin (TRL's CPOTrainer ``loss_type="simpo"``, whose
  ``simpo_gamma`` is this gamma). The paper uses beta around 2.
- ``dpo.loss=orpo`` (ORPO, Hong et al. 2024; reference-free): the best response's mean token NLL plus
  ``-beta log sigmoid(log odds(w) - log odds(l))`` with ``log odds = a - log(1 - exp(a))`` (TRL's ORPOTrainer, whose
  beta is the paper's lambda).
- ``dpo.loss=kto`` (KTO, Ethayarajh et al. 2024) on kind=kto data (unpaired completions labelled desirable or not):
  with ``r = log pi(y) - log ref(y)`` and the reference point ``z = max(0, mean r)`` over the micro-batch's examples
  (detached), a desirable example costs ``lambda_D (1 - sigmoid(beta (r - z)))`` and an undesirable one ``lambda_U
  (1 - sigmoid(beta (z - r)))`` (``dpo.kto_desirable_weight``, ``dpo.kto_undesirable_weight``); the loss is their
  mean over examples. The paper (and TRL) estimate ``z`` on mismatched prompt/completion pairs, which costs another
  forward of both models; igpt estimates it on the examples themselves.
- ``dpo.nll_weight`` adds that multiple of the best response's mean token negative log-likelihood (RPO, Pang et al.
  2024), which keeps the chosen log-probabilities from collapsing: once per record, on its best-ranked response
  (averaged over the responses tied for best), not on the better response of every pair.

The reference-free losses (simpo, orpo) never build a reference model. Their implicit rewards (``rewards/*``) are
``beta`` times the mean token log-probs, as in TRL.

Chosen and rejected responses are segments of one packed row, so one forward of the policy (and one of the
reference) covers both. Metrics carry TRL's names: ``rewards/chosen`` and ``rewards/rejected`` (``beta`` times the
log-ratios), ``rewards/margins`` (``beta h``), ``rewards/accuracies`` (the share of pairs whose implicit reward ranks
them right; a tie counts half, so a policy equal to its reference scores 0.5), ``logps/chosen``, ``logps/rejected``;
validation adds ``kl``, the exact KL(pi || ref) over the whole vocabulary averaged over the response tokens of the
val split (computed in token chunks; reported when the reference is in memory).

``dpo.precompute_reference=true`` runs the reference once over the train and val splits before the policy exists,
stores every response's log-probability in ``<run_dir>/reference_logps/<split>.safetensors`` (reused on resume while
its source, data, ``trainer.seq_len`` and precision are unchanged) and then frees the reference, so training holds
one model's weights, not two.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
from dataclasses import asdict
from typing import Any

import torch
import torch.nn.functional as F

from igpt.model.outputs import Hidden, TokenLogProbs, TokenStats
from igpt.stages.base import ModelSpec, Stage, StageOutput
from igpt.stages.context import RunContext
from igpt.stages.pref import Comparisons, comparisons, count_records

log = logging.getLogger("igpt")

METRICS = (
    "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected",
)
# KTO's examples are unpaired: the share of examples whose implicit reward is on their label's side of the reference
# point (a tie counts half), the mean of beta (r - z) signed by the label, and the reference point z itself
KTO_METRICS = ("rewards/accuracies", "rewards/margins", "kl")
REFERENCE_FREE = ("simpo", "orpo")
CACHE_DIR = "reference_logps"


def dpo_loss(
    chosen_logratio: torch.Tensor, rejected_logratio: torch.Tensor, beta: float, loss: str, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Per-pair loss of ``dpo.loss`` from the log-ratios ``log pi - log ref`` of the preferred and the other response
    (for ``ipo``, pass length-normalised log-ratios)."""
    h = chosen_logratio - rejected_logratio
    if loss == "sigmoid":
        return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    if loss == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    if loss == "hinge":
        return torch.relu(1 - beta * h)
    raise ValueError(f"dpo.loss={loss!r}: expected sigmoid, ipo or hinge")


def simpo_loss(chosen_avg: torch.Tensor, rejected_avg: torch.Tensor, beta: float, gamma: float,
               label_smoothing: float = 0.0) -> torch.Tensor:
    """SimPO's per-pair loss from the policy's mean token log-probs of the preferred and the other response."""
    x = beta * (chosen_avg - rejected_avg) - gamma
    return -(1 - label_smoothing) * F.logsigmoid(x) - label_smoothing * F.logsigmoid(-x)


def log_odds(avg_logp: torch.Tensor) -> torch.Tensor:
    """``log(p / (1 - p))`` of ``p = exp(avg_logp)``, the mean token probability ORPO's odds are of."""
    a = avg_logp.clamp(max=-1e-6)  # p < 1: the odds stay finite
    return a - torch.log(-torch.expm1(a))


def orpo_odds_loss(chosen_avg: torch.Tensor, rejected_avg: torch.Tensor, beta: float) -> torch.Tensor:
    """ORPO's odds-ratio term per pair, ``-beta log sigmoid(log odds(w) - log odds(l))`` (without its NLL term)."""
    return -beta * F.logsigmoid(log_odds(chosen_avg) - log_odds(rejected_avg))


def kto_loss(logratio: torch.Tensor, desirable: torch.Tensor, z: torch.Tensor | float, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> torch.Tensor:
    """KTO's per-example loss from ``log pi - log ref`` of each completion, its label and the reference point."""
    return torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (logratio - z))),
                       undesirable_weight * (1 - torch.sigmoid(beta * (z - logratio))))


class DPOStage(Stage):
    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        if cfg.dpo.loss == "kto":
            self.kind = "kto"  # unpaired examples (igpt.data.kinds)
        self.tables: dict[str, torch.Tensor] = {}  # split -> (samples, K) reference log-probs (precompute mode)

    # ---- models ----------------------------------------------------------------------------------------------------
    @property
    def reference_source(self) -> tuple[str | None, str]:
        if self.cfg.reference_from:
            return self.cfg.reference_from, "reference_from"
        return self.cfg.init_from, "init_from"

    def reference_spec(self) -> ModelSpec:
        source, key = self.reference_source
        return ModelSpec("reference", trainable=False, init=source, init_key=key)

    @property
    def reference_free(self) -> bool:
        return self.cfg.dpo.loss in REFERENCE_FREE

    @property
    def metric_names(self) -> tuple[str, ...]:
        return KTO_METRICS if self.cfg.dpo.loss == "kto" else METRICS

    def models(self) -> list[ModelSpec]:
        specs = [ModelSpec("policy", trainable=True, init=self.cfg.init_from)]
        if not self.cfg.dpo.precompute_reference and not self.reference_free:
            specs.append(self.reference_spec())
        return specs

    def prepare(self, ctx: RunContext) -> None:
        from igpt.errors import ConfigError

        super().prepare(ctx)
        if self.reference_free and (self.cfg.dpo.precompute_reference or self.cfg.reference_from):
            key = "dpo.precompute_reference" if self.cfg.dpo.precompute_reference else "reference_from"
            raise ConfigError(f"{key} is set, but dpo.loss={self.cfg.dpo.loss} uses no reference model")
        if self.cfg.dpo.precompute_reference:
            self._load_or_precompute()

    # ---- loss ------------------------------------------------------------------------------------------------------
    def count(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.cfg.dpo.loss == "kto":  # one example per row
            return (batch["seq_rank"] >= 0).any(dim=1).sum()
        return count_records(batch)

    def _reference(self, models: dict[str, Any], batch: dict[str, torch.Tensor], comp: Comparisons,
                   split: str) -> torch.Tensor:
        """Summed reference log-probs of every response ``(n,)``: from the reference model or the precomputed table."""
        if "reference" in models:
            with torch.no_grad():
                lp = models["reference"](batch["input_ids"], position_ids=batch["position_ids"],
                                         output=TokenLogProbs(batch["labels"]))
            return comp.per_segment(lp.float())
        table = self.tables[split]
        sid = batch["sample_id"][comp.row, 0]
        ref = table.to(sid.device)[sid, comp.index].float()
        if torch.isnan(ref).any():
            bad = int(sid[torch.isnan(ref)][0])
            raise RuntimeError(f"no precomputed reference log-prob for {split} sample {bad}: delete "
                               f"{os.path.join(self.cfg.run_dir, CACHE_DIR)} to recompute it")
        return ref

    def loss(self, models: dict[str, Any], batch: dict[str, torch.Tensor], split: str = "train") -> StageOutput:
        dcfg = self.cfg.dpo
        comp = comparisons(batch)
        lp = models["policy"](batch["input_ids"], position_ids=batch["position_ids"],
                              output=TokenLogProbs(batch["labels"]))  # (B, S)
        logp = comp.per_segment(lp)  # (n,) summed over each response
        ntok = comp.per_segment((batch["labels"] != -100).float()).clamp(min=1)  # (n,) response tokens
        if dcfg.loss == "kto":
            return self._kto(logp - self._reference(models, batch, comp, split), comp)
        avg = logp / ntok  # (n,) mean token log-prob
        w, lo = comp.better, comp.worse
        if self.reference_free:
            if dcfg.loss == "simpo":
                per_pair = simpo_loss(avg[w], avg[lo], dcfg.beta, dcfg.simpo_gamma, dcfg.label_smoothing)
            else:
                per_pair = orpo_odds_loss(avg[w], avg[lo], dcfg.beta)
            reward = dcfg.beta * avg.detach()
        else:
            ratio = logp - self._reference(models, batch, comp, split)
            if dcfg.loss == "ipo":
                per_pair = dpo_loss(ratio[w] / ntok[w], ratio[lo] / ntok[lo], dcfg.beta, "ipo")
            else:
                per_pair = dpo_loss(ratio[w], ratio[lo], dcfg.beta, dcfg.loss, dcfg.label_smoothing)
            reward = dcfg.beta * ratio.detach()
        loss_sum = comp.weighted_sum(per_pair)
        nll_weight = dcfg.nll_weight + (1.0 if dcfg.loss == "orpo" else 0.0)
        if nll_weight:  # once per record: the mean token NLL of its best response(s)
            loss_sum = loss_sum + nll_weight * (comp.best_weight * -avg).sum()
        with torch.no_grad():
            chosen, rejected = reward[w], reward[lo]
            right = (chosen > rejected).float() + 0.5 * (chosen == rejected).float()
            metrics = {
                "rewards/chosen": comp.weighted_sum(chosen), "rewards/rejected": comp.weighted_sum(rejected),
                "rewards/accuracies": comp.weighted_sum(right), "rewards/margins": comp.weighted_sum(chosen - rejected),
                "logps/chosen": comp.weighted_sum(logp[w]), "logps/rejected": comp.weighted_sum(logp[lo]),
            }
        return StageOutput(loss_sum, torch.tensor(comp.records), metrics)

    def _kto(self, ratio: torch.Tensor, comp: Comparisons) -> StageOutput:
        """KTO on kind=kto rows (one example each: rank 0 desirable, 1 undesirable)."""
        dcfg = self.cfg.dpo
        desirable = comp.rank == 0
        z = ratio.detach().mean().clamp(min=0) if ratio.numel() else ratio.new_zeros(())
        per = kto_loss(ratio, desirable, z, dcfg.beta, dcfg.kto_desirable_weight, dcfg.kto_undesirable_weight)
        with torch.no_grad():
            signed = torch.where(desirable, ratio - z, z - ratio)
            metrics = {
                "rewards/accuracies": ((signed > 0).float() + 0.5 * (signed == 0).float()).sum(),
                "rewards/margins": (dcfg.beta * signed).sum(), "kl": z * ratio.numel(),
            }
        return StageOutput(per.sum(), torch.tensor(ratio.numel()), metrics)

    # ---- evaluation ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        ctx = self.ctx
        models = ctx.models
        models["policy"].eval()
        live = "reference" in models and self.cfg.dpo.loss != "kto"  # KTO's examples: no val KL (its "kl" is z)
        names = self.metric_names
        sums = torch.zeros(4 + len(names), dtype=torch.float64, device=ctx.device)
        for micro in ctx.eval_micro_batches(self):
            with ctx.autocast():
                out = self.loss(models, micro, split="val")
                kl = self._exact_kl(models, micro) if live else torch.zeros(2, dtype=torch.float64)
            sums[0] += out.loss_sum.double()
            sums[1] += float(out.tokens)
            sums[2:4] += kl.to(sums.device)
            sums[4:] += torch.stack([out.metrics[k].double().to(sums.device) for k in names])
        total = ctx.strategy.all_reduce(sums).tolist()
        n = max(total[1], 1.0)
        result = {"loss": total[0] / n, **{k: v / n for k, v in zip(names, total[4:])}}
        if live:
            result["kl"] = total[2] / max(total[3], 1.0)
        return result

    def _exact_kl(self, models: dict[str, Any], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(sum over response tokens of KL(pi || ref) over the whole vocabulary, number of those tokens)."""
        ids, pos, labels = batch["input_ids"], batch["position_ids"], batch["labels"]
        h_ref = models["reference"](ids, position_ids=pos, output=Hidden())
        with models["reference"].full_param("lm_head.weight") as w_ref:
            stats = models["policy"](ids, position_ids=pos,
                                     output=TokenStats(labels, other_hidden=h_ref, other_weight=w_ref))
        keep = labels != -100
        return torch.stack([stats["kl"][keep].double().sum(), keep.sum().double()])

    def eval_summary(self, result: dict[str, float]) -> str:
        if self.cfg.dpo.loss == "kto":
            return (f"val loss {result['loss']:.4f}, label accuracy {result['rewards/accuracies']:.3f}, "
                    f"margin {result['rewards/margins']:.3f}, reference point {result['kl']:.4f}")
        kl = f", KL to reference {result['kl']:.4f}" if "kl" in result else ""
        return (f"val loss {result['loss']:.4f}, preference accuracy {result['rewards/accuracies']:.3f}, "
                f"margin {result['rewards/margins']:.3f}{kl}")

    # ---- precomputed reference log-probs ---------------------------------------------------------------------------
    def _cache_key(self) -> dict[str, Any]:
        source, _ = self.reference_source
        ref = {"source": None}
        if source:
            opened = self.ctx.weights_source(self.reference_spec())
            ref = {"source": os.path.abspath(opened.path), "step": opened.meta.get("step")}
        with open(os.path.join(self.cfg.data.dir, "index.json"), "rb") as f:
            data = hashlib.sha256(f.read()).hexdigest()
        return {"reference": ref, "seed": self.cfg.trainer.seed if not source else None, "data": data,
                "seq_len": self.cfg.trainer.seq_len, "precision": self.cfg.precision,
                "model": asdict(self.ctx.model_cfg)}

    def _load_or_precompute(self) -> None:
        from safetensors.torch import load_file

        ctx = self.ctx
        folder = os.path.join(self.cfg.run_dir, CACHE_DIR)
        key = json.dumps(self._cache_key(), sort_keys=True)
        splits = [s for s in ("train", "val") if ctx.data.samples(s) > 0]
        paths = {s: os.path.join(folder, f"{s}.safetensors") for s in splits}
        meta_path = os.path.join(folder, "key.json")
        cached = os.path.exists(meta_path) and all(os.path.exists(p) for p in paths.values())
        if cached:
            with open(meta_path, encoding="utf-8") as f:
                cached = f.read() == key
        if cached:
            self.tables = {s: load_file(p)["logps"] for s, p in paths.items()}
            log.info("dpo: reference log-probs from %s", folder)
            return
        reference = ctx.build_model(self.reference_spec())
        reference.eval()
        for split in splits:
            self.tables[split] = self._precompute(reference, split)
        del reference
        gc.collect()
        if ctx.is_main:
            from safetensors.torch import save_file

            from igpt.checkpoint import write_text_atomic

            os.makedirs(folder, exist_ok=True)
            for split, path in paths.items():
                save_file({"logps": self.tables[split]}, path + ".tmp")
                os.replace(path + ".tmp", path)
            write_text_atomic(meta_path, key)  # written last: the cache counts only once it exists
        ctx.strategy.barrier()
        log.info("dpo: reference log-probs of %s computed and stored in %s; the reference is freed",
                 " and ".join(splits), folder)

    @torch.no_grad()
    def _precompute(self, reference, split: str) -> torch.Tensor:
        """``(samples, K)`` float64 summed log-probs of every response of ``split`` (NaN where a record has fewer)."""
        from tqdm.auto import tqdm

        ctx = self.ctx
        found: list[tuple[int, int, float]] = []
        batches = ctx.eval_batches(self, split=split, limit=0)
        total = ctx.data.samples(split)
        bar = tqdm(total=total, desc=f"reference log-probs ({split})", unit="pair", disable=not ctx.is_main)
        for batch in batches:
            for micro in ctx.micro_batches(batch):
                with ctx.autocast():
                    lp = reference(micro["input_ids"], position_ids=micro["position_ids"],
                                   output=TokenLogProbs(micro["labels"]))
                comp = comparisons(micro)
                seg = comp.per_segment(lp.float()).double()
                sid = micro["sample_id"][comp.row, 0]
                found += list(zip(sid.tolist(), comp.index.tolist(), seg.tolist()))
            bar.update(int((batch["sample_id"][:, 0] >= 0).sum()) * ctx.world_size)
        bar.close()
        everything = [x for part in ctx.strategy.all_gather_object(found) for x in part]
        k = 1 + max((i for _, i, _ in everything), default=1)
        table = torch.full((total, k), float("nan"), dtype=torch.float64)
        for sid, i, v in everything:
            table[sid, i] = v
        return table


STAGE = DPOStage
