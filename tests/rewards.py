"""Reward functions used by tests/test_ppo.py (importable as ``rewards:<name>`` with tests/ on sys.path)."""

BANDIT = {"a": 1.0, "b": 0.5, "c": 0.0, "d": -0.5, "e": -1.0}


def bandit(prompts, completions, **fields):
    """The toy bandit's fixed reward of each one-token completion; anything else (a special token) -1."""
    return [BANDIT.get(c.strip(), -1.0) for c in completions]


def raises(prompts, completions, **fields):
    return [1 / 0 for _ in completions]


def not_a_number(prompts, completions, **fields):
    return ["high" for _ in completions]


def constant(prompts, completions, **fields):
    """The same reward for every completion: GRPO's advantages are all 0."""
    return [1.0 for _ in completions]
