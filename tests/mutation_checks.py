"""Mutation checks for the tests that guard a mechanism: resume, the NaN guard, bf16, masked eval batches, checkpoint
fallback, tied embeddings, the install and entry-point rules (M13*). Each mutation disables one mechanism in a scratch
clone of this repository, runs the tests that guard it and prints which fail. Every listed test should FAIL under its
mutation (M3b is the exception: it shows why the bf16 test asserts the compute dtype) and pass without it. Not
collected by pytest; run by hand:

    python tests/mutation_checks.py            # all (about 10 min on 2 cores)
    python tests/mutation_checks.py M1 M6      # some
    python tests/mutation_checks.py M15a M15b  # P15's (safe loading, checksums, run lock, refusals, errors)

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
     [("igpt/trainer.py", "batch = stage.masked(last if last is not None else loader.padding_batch())",
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
    # P13: installs and entry points (an ``old`` of None creates the file)
    ("M13a kernels/ a regular package again (it shadows the PyPI kernels package from the repository root)",
     [("kernels/__init__.py", None, "from igpt.kernels import *  # noqa: F403\n")],
     ["tests/test_install.py::test_import_kernels_finds_the_installed_package_from_the_repo_root",
      "tests/test_install.py::test_no_folder_that_can_start_sys_path_shadows_an_installed_package"]),
    ("M13b igpt/train.py leaves its own folder first on sys.path",
     [("igpt/train.py", "    sys.path[0] = os.getcwd()", "    pass")],
     ["tests/test_install.py::test_import_kernels_finds_the_installed_package_from_the_repo_root"]),
    ("M13c W&B drops trainer.eval_at_start's step 0",
     [("igpt/metrics.py", "self._wandb_had = -1", "self._wandb_had = 0")],
     ["tests/test_trainer.py::test_wandb_offline_read_back"]),
    ("M13d lm_eval's own --device default (cuda:0) wins on a CPU machine",
     [("igpt/lm_eval.py", 'if not any(a == "--device"', 'if False and not any(a == "--device"')],
     ["tests/test_lm_eval.py::test_cli_registers_model_and_hands_over_to_lm_eval"]),
    ("M13e a new model keeps model='s vocabulary when the data's tokenizer has more tokens",
     [("igpt/trainer.py", "return replace(self.cfg.model, vocab_size=max(self.cfg.model.vocab_size, self.vocab_size))",
       "return self.cfg.model")],
     ["tests/test_docs.py::test_runnable_doc_blocks_run_as_written"]),
    ("M13f a missing optional package is a traceback, not a line naming the extra",
     [("igpt/errors.py", "    except ImportError as e:", "    except KeyError as e:")],
     ["tests/test_install.py::test_base_install_runs_the_main_commands_and_extras_are_named"]),
    ("M13g the README check accepts any number",
     [("tests/demo_numbers.py", "        if got != said:", "        if False:")],
     ["tests/test_demo_numbers.py"]),
]

# ---- P15 (trust what you load and what you resume): one mutation per mechanism, each guarded by tests/test_trust.py
T15 = "tests/test_trust.py::"
MUTATIONS += [
    ("M15a the DCP metadata unpickler admits any global (pickle.load as before)",
     [("igpt/safe_load.py", "        if (module, name) in ALLOWED_GLOBALS:", "        if True:")],
     [T15 + "test_malicious_dcp_metadata_is_refused_and_runs_nothing"]),
    ("M15b checkpoint checksums recorded but never verified",
     [("igpt/checkpoint.py", '    sums = meta.get("checksums") if verify else None', "    sums = None")],
     [T15 + "test_checksum_mismatch_falls_back_to_the_newest_intact_checkpoint"]),
    ("M15c shard checksums never verified",
     [("igpt/data/partition.py", "        if info.checksum:\n", "        if False:\n")],
     [T15 + "test_shard_checksum_is_verified_once"]),
    ("M15d the run lock is not taken",
     [("igpt/trainer.py", "                lock.acquire()\n", "                pass\n")],
     [T15 + "test_second_run_on_a_run_dir_fails_at_once_naming_the_holder"]),
    ("M15e a stale lock is never recognised (dead pid, Slurm requeue)",
     [("igpt/runlock.py", "        me = self.me\n", "        return None\n        me = self.me\n")],
     [T15 + "test_stale_locks_are_taken_over_and_released"]),
    ("M15f resume ignores a changed model architecture",
     [("igpt/trainer.py", "        if diffs:\n", "        if False:\n")],
     [T15 + "test_resume_refuses_another_model_stage_or_tokenizer"]),
    ("M15g init_from accepts data of another tokenizer",
     [("igpt/trainer.py", "        why = tokenizer_conflict(self.tokenizer_path, theirs)\n        if why is None:",
       "        why = tokenizer_conflict(self.tokenizer_path, theirs)\n        if True:")],
     [T15 + "test_init_from_with_another_tokenizer_fails_unless_allowed"]),
    ("M15h prepare keeps chosen == rejected pairs",
     [("igpt/data/prepare.py", "_DROPPED_SAME if _same_responses(rec) else self._pref(rec)", "self._pref(rec)")],
     [T15 + "test_prepare_drops_identical_pairs_and_empty_prompts"]),
    ("M15i prepare overwrite=true replaces any folder",
     [("igpt/data/prepare.py", "        _check_replaceable(output_dir, files)\n", "        pass\n")],
     [T15 + "test_prepare_overwrite_replaces_only_a_prepared_dataset"]),
    ("M15j a full disk during a checkpoint is not recognised (raw error, temp folder kept)",
     [("igpt/checkpoint.py", "        shutil.rmtree(tmp, ignore_errors=True)  # the previous",
       "        pass  # the previous"),
      ("igpt/checkpoint.py", "        if _no_space(e, root):", "        if False:")],
     [T15 + "test_full_disk_during_a_checkpoint_is_one_line_and_leaves_no_temp_files"]),
    ("M15k zero sizes pass validation",
     [("igpt/config.py", "        if value is not None and value < 1:", "        if False:")],
     [T15 + "test_zero_sizes_are_config_errors"]),
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


def main() -> None:
    only = sys.argv[1:]
    repo = tempfile.mkdtemp(prefix="igpt-mutants-")
    try:
        subprocess.run(["git", "clone", "-q", HERE, repo], check=True)
        env = {**os.environ, "PYTHONPATH": repo}
        for name, patches, tests in MUTATIONS:
            if only and name.split()[0] not in only:
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
    finally:
        shutil.rmtree(repo, ignore_errors=True)


if __name__ == "__main__":
    main()
