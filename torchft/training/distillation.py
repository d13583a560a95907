"""The frozen teacher of the knowledge distillation recipes, on one device or many."""
from __future__ import annotations

import torch
from torch import nn

from torchft.modules.distillation import ChunkedDistillationLoss


def check_same_vocab(teacher_vocab: int, student_vocab: int) -> None:
    """The KL compares the two models' distributions token by token: their vocabularies must match."""
    if teacher_vocab != student_vocab:
        raise ValueError(f"teacher vocab_size ({teacher_vocab}) must equal the student's ({student_vocab}): "
                         "distill from a teacher that shares the student's tokenizer")


class TeacherDistillation:
    """The KD recipes' ``loss_fn`` for the shared SFT train step: runs the frozen ``teacher`` on the
    micro-batch (no grad), then ``kd_loss`` on both models' hidden states.

    Called as the cross-entropy is, plus the micro-batch (``uses_batch``); returns ``(loss_sum, num_tokens)``.
    """

    uses_batch = True  # the SFT step hands the micro-batch to the loss (the teacher reads its tokens)

    def __init__(self, teacher: nn.Module, kd_loss: ChunkedDistillationLoss):
        self.teacher = teacher.eval()
        self.kd_loss = kd_loss
        self.ignore_index = kd_loss.ignore_index

    def __call__(self, hidden, targets, output_fn, params=(), *, batch: dict):
        with torch.no_grad():  # [b, s, teacher_dim]
            teacher_hidden = self.teacher.hidden_states(batch["tokens"], mask=batch.get("mask"),
                                                        input_pos=batch.get("input_pos"))
        return self.kd_loss(hidden, targets, output_fn, params, teacher_hidden, self.teacher.output)
