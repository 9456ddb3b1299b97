"""Supervised fine-tuning (InstructGPT step 1): the loss covers assistant tokens only.

The loader turns the SFT loss mask into labels (-100 on system/user turns, role headers and padding), so the loss is
the language-modelling loss over exactly the assistant's tokens; the trainer starts from ``init_from``.
"""

from igpt.stages.base import Stage


class SFTStage(Stage):
    """The base stage: the loader's labels already cover the assistant's tokens only."""


STAGE = SFTStage
