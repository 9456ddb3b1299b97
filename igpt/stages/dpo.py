"""Direct preference optimisation (Rafailov et al. 2023) and its IPO and hinge variants.

The policy (``init_from``, the SFT model) learns from the same comparisons as a reward model (``igpt.stages.pref``:
pairs, or all C(K, 2) pairs of a K-wise ranking with weight 1/C(K, 2) each) against a frozen reference
(``reference_from``, default ``init_from``). With ``pi`` and ``ref`` the summed log-probabilities of a response's
tokens (``<|im_end|>`` included) and ``w`` / ``l`` the preferred and the other response,

    h = (log pi(w) - log ref(w)) - (log pi(l) - log ref(l))

- ``dpo.loss=sigmoid`` (DPO): ``-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``; ``eps`` =
  ``dpo.label_smoothing`` is conservative DPO (Mitchell 2023: labels assumed flipped with probability eps).
- ``dpo.loss=ipo`` (Azar et al. 2023): ``(h' - 1 / (2 beta))^2`` where ``h'`` uses *length-normalised* log-ratios
  (each log-ratio divided by its response's token count), as TRL implements IPO; the paper's formulation is per
  sequence, and the normalisation keeps the 1/(2 beta) target on one scale whatever the response lengths.
- ``dpo.loss=hinge`` (SLiC, Zhao et al. 2023): ``max(0, 1 - beta h)``.
- ``dpo.nll_weight`` adds that multiple of the chosen response's mean token negative log-likelihood (RPO, Pang et al.
  2024), which keeps the chosen log-probabilities from collapsing.

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
from igpt.stages.pref import Comparisons, comparisons, count_records

log = logging.getLogger("igpt")

METRICS = (
    "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected",
)
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


class DPOStage(Stage):
    name = "dpo"

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
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

    def models(self) -> list[ModelSpec]:
        specs = [ModelSpec("policy", trainable=True, init=self.cfg.init_from)]
        if not self.cfg.dpo.precompute_reference:
            specs.append(self.reference_spec())
        return specs

    def prepare(self, trainer) -> None:
        super().prepare(trainer)
        if self.cfg.dpo.precompute_reference:
            self._load_or_precompute()

    # ---- loss ------------------------------------------------------------------------------------------------------
    def count(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
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
        ref = self._reference(models, batch, comp, split)
        ntok = comp.per_segment((batch["labels"] != -100).float()).clamp(min=1)  # (n,) response tokens
        ratio = logp - ref
        w, lo = comp.better, comp.worse
        if dcfg.loss == "ipo":
            per_pair = dpo_loss(ratio[w] / ntok[w], ratio[lo] / ntok[lo], dcfg.beta, "ipo")
        else:
            per_pair = dpo_loss(ratio[w], ratio[lo], dcfg.beta, dcfg.loss, dcfg.label_smoothing)
        if dcfg.nll_weight:
            per_pair = per_pair + dcfg.nll_weight * (-logp[w] / ntok[w])
        with torch.no_grad():
            chosen, rejected = dcfg.beta * ratio[w], dcfg.beta * ratio[lo]
            right = (chosen > rejected).float() + 0.5 * (chosen == rejected).float()
            metrics = {
                "rewards/chosen": comp.weighted_sum(chosen), "rewards/rejected": comp.weighted_sum(rejected),
                "rewards/accuracies": comp.weighted_sum(right), "rewards/margins": comp.weighted_sum(chosen - rejected),
                "logps/chosen": comp.weighted_sum(logp[w]), "logps/rejected": comp.weighted_sum(logp[lo]),
            }
        return StageOutput(comp.weighted_sum(per_pair), torch.tensor(comp.records), metrics)

    # ---- evaluation ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        trainer = self.trainer
        assert trainer is not None
        models = trainer.models
        models["policy"].eval()
        live = "reference" in models
        sums = torch.zeros(4 + len(METRICS), dtype=torch.float64, device=trainer.device)
        for micro in trainer.eval_micro_batches(self):
            with trainer.strategy.autocast():
                out = self.loss(models, micro, split="val")
                kl = self._exact_kl(models, micro) if live else torch.zeros(2, dtype=torch.float64)
            sums[0] += out.loss_sum.double()
            sums[1] += float(out.tokens)
            sums[2:4] += kl.to(sums.device)
            sums[4:] += torch.stack([out.metrics[k].double() for k in METRICS])
        total = trainer.strategy.all_reduce(sums).tolist()
        n = max(total[1], 1.0)
        result = {"loss": total[0] / n, **{k: v / n for k, v in zip(METRICS, total[4:])}}
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
        kl = f", KL to reference {result['kl']:.4f}" if "kl" in result else ""
        return (f"val loss {result['loss']:.4f}, preference accuracy {result['rewards/accuracies']:.3f}, "
                f"margin {result['rewards/margins']:.3f}{kl}")

    # ---- precomputed reference log-probs ---------------------------------------------------------------------------
    def _cache_key(self) -> dict[str, Any]:
        source, _ = self.reference_source
        ref = {"source": None}
        if source:
            opened = self.trainer.weights_source(self.reference_spec())
            ref = {"source": os.path.abspath(opened.path), "step": opened.meta.get("step")}
        with open(os.path.join(self.cfg.data.dir, "index.json"), "rb") as f:
            data = hashlib.sha256(f.read()).hexdigest()
        return {"reference": ref, "seed": self.cfg.trainer.seed if not source else None, "data": data,
                "seq_len": self.cfg.trainer.seq_len, "precision": self.cfg.precision, "model": asdict(self.cfg.model)}

    def _load_or_precompute(self) -> None:
        from safetensors.torch import load_file

        trainer = self.trainer
        folder = os.path.join(self.cfg.run_dir, CACHE_DIR)
        key = json.dumps(self._cache_key(), sort_keys=True)
        splits = [s for s in ("train", "val") if trainer.index["splits"].get(s, {}).get("samples", 0) > 0]
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
        reference = trainer.build_model(self.reference_spec())
        reference.eval()
        for split in splits:
            self.tables[split] = self._precompute(reference, split)
        del reference
        gc.collect()
        if trainer.is_main:
            from safetensors.torch import save_file

            from igpt.checkpoint import write_text_atomic

            os.makedirs(folder, exist_ok=True)
            for split, path in paths.items():
                save_file({"logps": self.tables[split]}, path + ".tmp")
                os.replace(path + ".tmp", path)
            write_text_atomic(meta_path, key)  # written last: the cache counts only once it exists
        trainer.strategy.barrier()
        log.info("dpo: reference log-probs of %s computed and stored in %s; the reference is freed",
                 " and ".join(splits), folder)

    @torch.no_grad()
    def _precompute(self, reference, split: str) -> torch.Tensor:
        """``(samples, K)`` float64 summed log-probs of every response of ``split`` (NaN where a record has fewer)."""
        from tqdm.auto import tqdm

        trainer = self.trainer
        found: list[tuple[int, int, float]] = []
        batches = trainer.eval_batches(self, split=split, limit=0)
        total = trainer.index["splits"][split]["samples"]
        bar = tqdm(total=total, desc=f"reference log-probs ({split})", unit="pair", disable=not trainer.is_main)
        for batch in batches:
            for micro in trainer.micro_batches(batch):
                with trainer.strategy.autocast():
                    lp = reference(micro["input_ids"], position_ids=micro["position_ids"],
                                   output=TokenLogProbs(micro["labels"]))
                comp = comparisons(micro)
                seg = comp.per_segment(lp.float()).double()
                sid = micro["sample_id"][comp.row, 0]
                found += list(zip(sid.tolist(), comp.index.tolist(), seg.tolist()))
            bar.update(int((batch["sample_id"][:, 0] >= 0).sum()) * trainer.world_size)
        bar.close()
        everything = [x for part in trainer.strategy.all_gather_object(found) for x in part]
        k = 1 + max((i for _, i, _ in everything), default=1)
        table = torch.full((total, k), float("nan"), dtype=torch.float64)
        for sid, i, v in everything:
            table[sid, i] = v
        return table


STAGE = DPOStage
