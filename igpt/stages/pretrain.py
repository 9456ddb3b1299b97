"""Pretraining: next-token prediction on packed documents, attention masked to each document."""

from igpt.stages.base import Stage


class PretrainStage(Stage):
    name = "pretrain"


STAGE = PretrainStage
