"""Pretraining: next-token prediction on packed documents, attention masked to each document."""

from igpt.stages.base import Stage


class PretrainStage(Stage):
    """The base stage as it is: the loss on every token."""


STAGE = PretrainStage
