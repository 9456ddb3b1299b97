"""Mutation checks for the tests that guard a mechanism: resume, the NaN guard, bf16, masked eval batches, checkpoint
fallback, tied embeddings, (M7-M25) the RL and preference maths and their wiring, (M26-M32) the install and
entry-point rules, (M33-M43) safe loading, checksums, the run lock and refusals, (M50-M52) the one-way core. Each
mutation disables one mechanism in a scratch clone of this repository, runs the tests that guard it and prints which
fail. Every listed test should
FAIL under its mutation (M3b is the exception: it shows why the bf16 test asserts the compute dtype) and pass without
it. Not collected by pytest (and not part of ``make test``); run by hand:

    python tests/mutation_checks.py            # all (M1-M6 about 10 min on 2 cores, M7-M25 about 5 min)
    python tests/mutation_checks.py M1 M6      # some
    python tests/mutation_checks.py M7-M25     # a range (M12b, M13b, ... included): 270 s on 2 shared cores
    python tests/mutation_checks.py M26-M43    # the install rules, then safe loading, checksums, lock, refusals

The clone is of the committed HEAD, so commit first.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MUTATIONS = [
    ("M1 resume=auto ignored (the second process restarts instead of resuming)",
     [("igpt/trainer.py", 'if cfg.resume == "auto" and self.is_main', "if False and self.is_main")],
     ["tests/test_trainer.py::test_resume_equals_uninterrupted_run",
      "tests/test_strategies.py::test_fsdp_resume_two_ranks_to_one_and_back",
      "tests/test_strategies.py::test_zero_resume_two_ranks_to_one_and_back[zero2]",
      "tests/test_dpo.py::test_resume_mid_run_equals_uninterrupted[rm]",
      "tests/test_ppo.py::test_resume_mid_run_equals_uninterrupted"]),
    ("M2 a non-finite update applied (skip ignored)",
     [("igpt/parallel/base.py", "        if not skip:", "        if True:"),
      ("igpt/parallel/fsdp.py", "        if not skip:", "        if True:")],
     ["tests/test_nan_guard.py::test_non_finite_step_changes_nothing_and_training_goes_on[single]",
      "tests/test_nan_guard.py::test_non_finite_step_changes_nothing_and_training_goes_on[fsdp]"]),
    ("M3 precision=bf16 computing in fp32 (FSDP param_dtype dropped)",
     [("igpt/parallel/fsdp.py", 'self.param_dtype = _dtype(param_name, "strategy.param_dtype")',
       "self.param_dtype = None")],
     ["tests/test_strategies.py::test_bf16_two_ranks_close_to_one_process[fsdp]"]),
    ("M3b as M3, with the compute_dtype assertion removed (the tolerances alone cannot tell)",
     [("igpt/parallel/fsdp.py", 'self.param_dtype = _dtype(param_name, "strategy.param_dtype")',
       "self.param_dtype = None"),
      ("tests/test_strategies.py",
       '    assert ref[1]["compute_dtype"] == got[1]["compute_dtype"] == "bfloat16"\n', "")],
     ["tests/test_strategies.py::test_bf16_two_ranks_close_to_one_process[fsdp]"]),
    ("M4 a rank out of val data evaluates its last batch again instead of a masked copy",
     [("igpt/stages/context.py", "batch = stage.masked(last if last is not None else loader.padding_batch())",
       "batch = last if last is not None else stage.masked(loader.padding_batch())")],
     ["tests/test_strategies.py::test_two_ranks_match_one_process[fsdp]"]),
    ("M5 checkpoint fallback removed (a broken newest checkpoint restarts the run)",
     [("igpt/checkpoint.py", "    steps = sorted((int(m.group(1)), d) for d in os.listdir(ckpt_root)",
       "    return None\n    steps = sorted((int(m.group(1)), d) for d in os.listdir(ckpt_root)")],
     ["tests/test_trainer.py::test_corrupt_newest_checkpoint_falls_back_to_the_previous_one"]),
    ("M6 tie_embeddings ignored (untied)",
     # the one switch: the constructor, the init plan and every re-tie after to_empty or a load ask ``tied``
     [("igpt/model/transformer.py", 'return self.head == "lm" and self.cfg.tie_embeddings', "return False")],
     ["tests/test_strategies.py::test_tied_embeddings_two_ranks_match_one_process",
      "tests/test_trainer.py::test_tied_embeddings_train_resume_and_store_one_matrix"]),
    # ---- alignment: the fixes, then every mechanism the RL and preference tests guard
    ("M7 GRPO/RLOO advantages whitened over tokens again (long responses set the mean)",
     [("igpt/stages/ppo.py", "        return seq_adv[:, None].expand_as(mask) * mask, None, None",
       "        adv = seq_adv[:, None].expand_as(mask) * mask\n"
       "        return masked_whiten(adv, mask, *self._global_mean_var(adv, mask)), None, None")],
     ["tests/test_ppo.py::test_critic_free_advantages_are_not_whitened_by_token_count"]),
    ("M8 K-wise NLL term on the better response of every pair",
     [("igpt/stages/dpo.py", "loss_sum = loss_sum + nll_weight * (comp.best_weight * -avg).sum()",
       "loss_sum = loss_sum + nll_weight * comp.weighted_sum(-avg[w])")],
     ["tests/test_dpo.py::test_stage_loss_on_fixed_logprobs_with_kwise_records"]),
    ("M9 K-wise pairs weighted 1/C(K, 2) whatever the ties",
     [("igpt/stages/pref.py", "    weight = 1.0 / pairs_per_row[row[better]]",
       "    weight = (lambda k: 2.0 / (k * (k - 1)))(torch.bincount(row, minlength=b).float())[row[better]]")],
     ["tests/test_dpo.py::test_ties_in_kwise_records_spread_the_record_weight_over_its_untied_pairs"]),
    ("M10 k3 log-ratio unclamped",
     [("igpt/stages/ppo_math.py", "        logr = logr.clamp(-K3_CLAMP, K3_CLAMP)", "        logr = logr")],
     ["tests/test_ppo.py::test_k3_log_ratio_is_clamped_to_ten"]),
    ("M11 TokenLogProbs divides the (bf16) hidden states by T before the matmul",
     [("igpt/model/outputs.py", 'if model.loss_backend == "triton" and _power_of_two(t):', "if True:")],
     ["tests/test_ppo.py::test_bf16_logprobs_of_policy_and_reference_agree_exactly_at_any_temperature"]),
    ("M12 PPO update ignores rollout.temperature",
     [("igpt/stages/ppo.py", "        temp = cfg.rollout.temperature if cfg.rollout.temperature > 0 else 1.0",
       "        temp = 1.0")],
     ["tests/test_ppo.py::test_first_minibatch_ratio_is_one"]),
    ("M12b PPO old log-probs ignore rollout.temperature",
     [("igpt/stages/ppo.py", "temp = self.cfg.rollout.temperature if self.cfg.rollout.temperature > 0 else 1.0",
       "temp = 1.0")],
     ["tests/test_ppo.py::test_first_minibatch_ratio_is_one"]),
    ("M13 missing-EOS penalty on the responses that ended",
     [("igpt/stages/ppo.py", "cfg.reward.missing_eos_penalty * (~ro.sampled.ended).float()",
       "cfg.reward.missing_eos_penalty * ro.sampled.ended.float()")],
     ["tests/test_ppo.py::test_missing_eos_penalty_lands_only_on_truncated_responses"]),
    ("M13b the rollout's ended flag set on every live row",
     [("igpt/sampling.py", "        ended |= is_stop", "        ended |= live")],
     ["tests/test_ppo.py::test_missing_eos_penalty_lands_only_on_truncated_responses"]),
    ("M14 PPO-ptx dropped from the gradient (its loss still logged)",
     [("igpt/stages/ppo.py", "return cfg.ptx.coef * ptx * ptx_scale", "return 0.0 * ptx")],
     ["tests/test_ppo.py::test_ptx_gradient_is_coef_times_the_pretraining_loss_gradient"]),
    ("M15 KL controller moves the wrong way",
     [("igpt/stages/ppo_math.py", "error = min(max(kl / self.target - 1.0, -0.2), 0.2)",
       "error = min(max(1.0 - kl / self.target, -0.2), 0.2)")],
     ["tests/test_ppo.py::test_kl_controller_moves_the_coefficient_toward_the_target"]),
    ("M16 value clipping inverted (the smaller error)",
     [("igpt/stages/ppo_math.py", "return 0.5 * torch.maximum(a, b), b > a",
       "return 0.5 * torch.minimum(a, b), b > a")],
     ["tests/test_ppo.py::test_clipped_value_loss_takes_the_larger_error"]),
    ("M17 advantage whitening does not subtract the mean",
     [("igpt/stages/ppo_math.py", "torch.where(mask, (x - mean) * torch.rsqrt(", "torch.where(mask, x * torch.rsqrt(")],
     ["tests/test_ppo.py::test_gae_advantages_are_whitened_over_response_tokens_only"]),
    ("M17b advantage whitening statistics computed over padding",
     [("igpt/stages/ppo.py", "        m = mask.to(torch.float64)",
       "        m = torch.ones_like(mask, dtype=torch.float64)")],
     ["tests/test_ppo.py::test_gae_advantages_are_whitened_over_response_tokens_only"]),
    ("M18 exact KL reversed (KL(ref || pi))",
     [("igpt/model/outputs.py", 'out["kl"][idx] = (p * (logp - other)).sum(-1)',
       'out["kl"][idx] = (other.exp() * (other - logp)).sum(-1)')],
     ["tests/test_ppo.py::test_token_stats_exact_kl_and_entropy_equal_torch_distributions"]),
    ("M18b entropy computed wrong (mean of -log p, not the expectation)",
     [("igpt/model/outputs.py", 'out["entropy"][idx] = -(p * logp).sum(-1)', 'out["entropy"][idx] = -logp.mean(-1)')],
     ["tests/test_ppo.py::test_token_stats_exact_kl_and_entropy_equal_torch_distributions"]),
    ("M19 reward model's normalisation offset not applied on the PPO path",
     [("igpt/build.py", "model.value_offset = -source.reward_mean", "model.value_offset = 0.0")],
     ["tests/test_ppo.py::test_reward_model_score_on_the_ppo_path_is_normalised_and_read_at_the_last_token"]),
    ("M19b reward model score read one token early",
     [("igpt/stages/rm.py", "values.gather(1, last_real_index(real)[:, None])",
       "values.gather(1, (last_real_index(real) - 1)[:, None])")],
     ["tests/test_ppo.py::test_reward_model_score_on_the_ppo_path_is_normalised_and_read_at_the_last_token"]),
    ("M20 LR warmup off by one at its boundary",
     [("igpt/schedule.py", "    if step < cfg.warmup_steps:", "    if step <= cfg.warmup_steps:")],
     ["tests/test_trainer.py::test_lr_warmup_reaches_the_peak_exactly_at_its_last_step"]),
    ("M21 gradient accumulation weighs micro-batches equally, not by their loss units",
     [("igpt/stages/base.py", "            return out.loss_sum * scale",
       "            return out.loss_sum / max(float(out.tokens), 1.0) / ctx.accum")],
     ["tests/test_trainer.py::test_accumulated_micro_batches_equal_one_batch_on_variable_length_data[sft]"]),
    ("M22 SimPO's target margin with the wrong sign",
     [("igpt/stages/dpo.py", "x = beta * (chosen_avg - rejected_avg) - gamma",
       "x = beta * (chosen_avg - rejected_avg) + gamma")],
     ["tests/test_dpo.py::test_simpo_orpo_and_kto_losses_equal_their_formulas",
      "tests/test_dpo.py::test_stage_loss_on_fixed_logprobs_with_kwise_records[simpo]"]),
    ("M23 ORPO without its SFT (NLL) term",
     [("igpt/stages/dpo.py", 'nll_weight = dcfg.nll_weight + (1.0 if dcfg.loss == "orpo" else 0.0)',
       "nll_weight = dcfg.nll_weight")],
     ["tests/test_dpo.py::test_stage_loss_on_fixed_logprobs_with_kwise_records[orpo]"]),
    ("M24 KTO's reference point not detached (a gradient through the batch mean)",
     [("igpt/stages/dpo.py", "z = ratio.detach().mean().clamp(min=0)", "z = ratio.mean().clamp(min=0)")],
     ["tests/test_dpo.py::test_kto_stage_loss_on_fixed_logprobs"]),
    ("M25 reference-free losses build a reference model",
     [("igpt/stages/dpo.py", "if not self.cfg.dpo.precompute_reference and not self.reference_free:",
       "if not self.cfg.dpo.precompute_reference:")],
     ["tests/test_dpo.py::test_reference_free_losses_build_no_reference"]),
    # ---- installs and entry points (an ``old`` of None creates the file)
    ("M26 kernels/ a regular package again (it shadows the PyPI kernels package from the repository root)",
     [("kernels/__init__.py", None, "from igpt.kernels import *  # noqa: F403\n")],
     ["tests/test_install.py::test_import_kernels_finds_the_installed_package_from_the_repo_root",
      "tests/test_install.py::test_no_folder_that_can_start_sys_path_shadows_an_installed_package"]),
    ("M27 igpt/train.py leaves its own folder first on sys.path",
     [("igpt/train.py", "    sys.path[0] = os.getcwd()", "    pass")],
     ["tests/test_install.py::test_import_kernels_finds_the_installed_package_from_the_repo_root"]),
    ("M28 W&B drops trainer.eval_at_start's step 0",
     [("igpt/metrics.py", "self._wandb_had = -1", "self._wandb_had = 0")],
     ["tests/test_trainer.py::test_wandb_offline_read_back"]),
    ("M29 lm_eval's own --device default (cuda:0) wins on a CPU machine",
     [("igpt/lm_eval.py", 'if not any(a == "--device"', 'if False and not any(a == "--device"')],
     ["tests/test_lm_eval.py::test_cli_registers_model_and_hands_over_to_lm_eval"]),
    ("M30 a new model keeps model='s vocabulary when the data's tokenizer has more tokens",
     [("igpt/build.py", "return replace(self.cfg.model, vocab_size=max(self.cfg.model.vocab_size, vocab))",
       "return self.cfg.model")],
     ["tests/test_docs.py::test_runnable_doc_blocks_run_as_written"]),
    ("M31 a missing optional package is a traceback, not a line naming the extra",
     [("igpt/errors.py", "    except ImportError as e:", "    except KeyError as e:")],
     ["tests/test_install.py::test_base_install_runs_the_main_commands_and_extras_are_named"]),
    ("M32 the README check accepts any number",
     [("tests/demo_numbers.py", "        if got != said:", "        if False:")],
     ["tests/test_demo_numbers.py"]),
]

# ---- trust what you load and what you resume: one mutation per mechanism, each guarded by tests/test_trust.py
T15 = "tests/test_trust.py::"
MUTATIONS += [
    ("M33 the DCP metadata unpickler admits any global (pickle.load as before)",
     [("igpt/safe_load.py", "        if (module, name) in ALLOWED_GLOBALS:", "        if True:")],
     [T15 + "test_malicious_dcp_metadata_is_refused_and_runs_nothing"]),
    ("M34 checkpoint checksums recorded but never verified",
     [("igpt/checkpoint.py", '    sums = meta.get("checksums") if verify else None', "    sums = None")],
     [T15 + "test_checksum_mismatch_falls_back_to_the_newest_intact_checkpoint"]),
    ("M35 shard checksums never verified",
     [("igpt/data/partition.py", "        if info.checksum:\n", "        if False:\n")],
     [T15 + "test_shard_checksum_is_verified_once"]),
    ("M36 the run lock is not taken",
     [("igpt/trainer.py", "                lock.acquire()\n", "                pass\n")],
     [T15 + "test_second_run_on_a_run_dir_fails_at_once_naming_the_holder"]),
    ("M37 a stale lock is never recognised (dead pid, Slurm requeue)",
     [("igpt/runlock.py", "        me = self.me\n", "        return None\n        me = self.me\n")],
     [T15 + "test_stale_locks_are_taken_over_and_released"]),
    ("M38 resume ignores a changed model architecture",
     [("igpt/build.py", "        if diffs:\n", "        if False:\n")],
     [T15 + "test_resume_refuses_another_model_stage_or_tokenizer"]),
    ("M39 init_from accepts data of another tokenizer",
     [("igpt/build.py", "        why = tokenizer_conflict(self.data.tokenizer_path, theirs)\n        if why is None:",
       "        why = tokenizer_conflict(self.data.tokenizer_path, theirs)\n        if True:")],
     [T15 + "test_init_from_with_another_tokenizer_fails_unless_allowed"]),
    ("M40 prepare keeps chosen == rejected pairs",
     [("igpt/data/prepare.py", "_DROPPED_SAME if _same_responses(rec) else self._pref(rec)", "self._pref(rec)")],
     [T15 + "test_prepare_drops_identical_pairs_and_empty_prompts"]),
    ("M41 prepare overwrite=true replaces any folder",
     [("igpt/data/prepare.py", "        _check_replaceable(output_dir, files)\n", "        pass\n")],
     [T15 + "test_prepare_overwrite_replaces_only_a_prepared_dataset"]),
    ("M42 a full disk during a checkpoint is not recognised (raw error, temp folder kept)",
     [("igpt/checkpoint.py", "        shutil.rmtree(tmp, ignore_errors=True)  # the previous",
       "        pass  # the previous"),
      ("igpt/checkpoint.py", "        if _no_space(e, root):", "        if False:")],
     [T15 + "test_full_disk_during_a_checkpoint_is_one_line_and_leaves_no_temp_files"]),
    ("M43 zero sizes pass validation",
     [("igpt/config.py", "        if value is not None and value < 1:", "        if False:")],
     [T15 + "test_zero_sizes_are_config_errors"]),
]


# ---- a core that reads one way (P16): the layering, the stage contract and the configuration as a value
TL = "tests/test_layers.py::"
MUTATIONS += [
    ("M53 the run's log file opened before the run holds its run_dir (a refused run appends to the holder's log)",
     [("igpt/runlog.py", "    root.addHandler(_Pending())\n",
       "    root.addHandler(_Pending())\n    if run_dir:\n        attach_run_log(run_dir)\n")],
     [T15 + "test_a_refused_run_writes_nothing_into_the_holders_run_dir"]),
    ("M54 overrides.yaml written before the run holds its run_dir",
     [("igpt/train.py", "    check_sweep_claim(config.run_dir, job)\n",
       "    check_sweep_claim(config.run_dir, job)\n    record_job(config.run_dir, job)\n")],
     [T15 + "test_a_refused_run_writes_nothing_into_the_holders_run_dir"]),
    ("M55 a full disk during prepare is a raw OSError",
     [("igpt/data/prepare.py", "        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):",
       "        if False:")],
     [T15 + "test_full_disk_during_prepare_is_one_line_and_leaves_no_temp_files"]),
    ("M56 optimiser ranges not checked",
     [("igpt/config.py", "        if below or above:", "        if False:")],
     [T15 + "test_out_of_range_optimiser_values_are_config_errors"]),
    ("M57 a diverged run raises a bare FloatingPointError",
     [("igpt/trainer.py", "            raise DivergedError(", "            raise FloatingPointError(")],
     [T15 + "test_a_diverged_run_and_a_data_dir_without_tokenizer_are_typed_errors"]),
    ("M58 a crafted optimizer.pt / train_state.pt reaches the user as torch's UnpicklingError traceback",
     [("igpt/safe_load.py", "    except pickle.UnpicklingError as e:\n", "    except ImportError as e:\n")],
     [T15 + "test_crafted_optimizer_and_train_state_pickles_are_refused_naming_the_file"]),
    ("M50 a stage imports the trainer for its type hints (the two-way contract back)",
     [("igpt/stages/base.py", "    from igpt.parallel.base import Wrapped\n",
       "    from igpt.parallel.base import Wrapped\n    from igpt.trainer import Trainer  # noqa: F401\n")],
     [TL + "test_stages_never_reach_the_trainer"]),
    ("M51 a library module imports the loop (an import pointing up, and a cycle)",
     [("igpt/checkpoint.py", "    from igpt.data.chat import FORMAT_FILES\n\n    shutil.copyfile(",
       "    from igpt.data.chat import FORMAT_FILES\n    from igpt.trainer import Trainer  # noqa: F401\n\n"
       "    shutil.copyfile(")],
     [TL + "test_every_import_points_down_the_layers", TL + "test_no_import_cycle"]),
    ("M52 the resolved architecture written back into the run's config",
     [("igpt/trainer.py", "        ctx.model_cfg, self.hf_config = resolved.model, resolved.hf_config\n",
       "        ctx.model_cfg, self.hf_config = resolved.model, resolved.hf_config\n"
       "        cfg.model = resolved.model\n")],
     ["tests/test_trainer.py::test_sft_from_pretrained_checkpoint"]),
]

def patch(repo: str, path: str, old: str | None, new: str) -> None:
    full = os.path.join(repo, path)
    if old is None:
        with open(full, "w", encoding="utf-8") as f:
            f.write(new)
        return
    with open(full, encoding="utf-8") as f:
        text = f.read()
    if old not in text:
        raise SystemExit(f"{path}: the line to mutate is gone ({old!r}); update tests/mutation_checks.py")
    with open(full, "w", encoding="utf-8") as f:
        f.write(text.replace(old, new))


def selected(names: list[str], only: list[str]) -> list[str]:
    """The mutation ids (``M7``, ``M12b``) that ``only`` names: ids, or ranges ``M7-M25`` (their b-variants too)."""
    def number(n: str) -> int:
        return int(re.match(r"M(\d+)", n).group(1))

    keep = []
    for n in names:
        for spec in only:
            lo, _, hi = spec.partition("-")
            if n == spec or (hi and number(lo) <= number(n) <= number(hi)):
                keep.append(n)
                break
    return keep


def main() -> None:
    only = sys.argv[1:]
    chosen = selected([name.split()[0] for name, _, _ in MUTATIONS], only) if only else None
    total = time.time()
    repo = tempfile.mkdtemp(prefix="igpt-mutants-")
    try:
        subprocess.run(["git", "clone", "-q", HERE, repo], check=True)
        env = {**os.environ, "PYTHONPATH": repo}
        for name, patches, tests in MUTATIONS:
            if chosen is not None and name.split()[0] not in chosen:
                continue
            subprocess.run(["git", "checkout", "-q", "."], cwd=repo, check=True)
            subprocess.run(["git", "clean", "-qfd", "--", "kernels"], cwd=repo, check=True)
            for path, old, new in patches:
                patch(repo, path, old, new)
            start = time.time()
            proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf", *tests],
                                  cwd=repo, env=env, capture_output=True, text=True)
            lines = [line for line in proc.stdout.splitlines()
                     if line.startswith(("FAILED", "ERROR")) or re.match(r"\d+ (passed|failed)", line)]
            print(f"== {name} ({time.time() - start:.0f} s)", *lines, sep="\n", flush=True)
        print(f"== all done in {time.time() - total:.0f} s", flush=True)
    finally:
        shutil.rmtree(repo, ignore_errors=True)


if __name__ == "__main__":
    main()
