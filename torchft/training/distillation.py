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


def with_teacher(loss_fn: ChunkedDistillationLoss, build_teacher, teacher_checkpointer, run, *,
                 student_vocab_size: int, compile: bool = False):
    """``(loss_fn, val_loss_fn)`` of a distillation run, for the SFT recipes (LoRA or full student, one
    device or many): the frozen teacher ``build_teacher()`` makes, loaded from ``teacher_checkpointer`` (sharded
    per decoder layer under torchrun) and refused unless it shares the student's vocabulary, runs on every
    micro-batch of the train loss; the validation loss is the student's plain cross-entropy."""
    from torchft.training.wiring import build_model, build_sharded_model

    build = build_model if run.env is None else build_sharded_model
    teacher = build(build_teacher, teacher_checkpointer, run, trainable="none", compile=compile)
    check_same_vocab(teacher.args.vocab_size, student_vocab_size)
    return TeacherDistillation(teacher, loss_fn), loss_fn.cross_entropy()
