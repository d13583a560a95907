"""Knowledge distillation loss over hidden states, chunk by chunk: neither model's full logits exist.

For every target token (label not ``ignore_index``) the student is trained on

    (1 - kd_ratio) * CE(student, label) + kd_ratio * KL(teacher || student)

where ``KL(p_t || p_s) = sum_v p_t(v) (log p_t(v) - log p_s(v))`` over the vocabulary, with both
distributions taken at ``temperature`` (1 by default). As with :class:`~torchft.modules.loss.ChunkedCrossEntropy`,
the loss takes the final hidden states of both models and projects them through each model's output
layer ``chunk_tokens`` positions at a time; the chunk's student gradients are taken at once and its
logits (student and teacher) are freed. Memory of the loss: one chunk of logits per model.

The result is ``(sum over target tokens, number of target tokens)``, token-weighted like the SFT
loss: the recipe divides by the step's global count of target tokens.
"""
from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F

from torchft.modules.loss import IGNORE_INDEX, ChunkedCrossEntropy


def _kd_sum(student_logits: torch.Tensor, chunk: tuple[torch.Tensor, torch.Tensor], ignore_index: int, *,
            kd_ratio: float, temperature: float, teacher_output: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    # student_logits: [n, vocab]; chunk: targets [n] and the teacher's hidden states [n, teacher_dim]
    targets, teacher_hidden = chunk
    logits = student_logits.float()
    ce = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")
    with torch.no_grad():  # the teacher is frozen; its [n, vocab] logits live only in this chunk
        teacher_logp = F.log_softmax(teacher_output(teacher_hidden).float() / temperature, dim=-1)
    student_logp = F.log_softmax(logits / temperature, dim=-1)
    kl = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)  # [n]
    kl_sum = torch.where(targets != ignore_index, kl, torch.zeros_like(kl)).sum()
    return (1.0 - kd_ratio) * ce + kd_ratio * kl_sum


class ChunkedDistillationLoss(ChunkedCrossEntropy):
    """Token-weighted ``(1 - kd_ratio) * CE + kd_ratio * KL(teacher || student)`` without the full logits.

    Args:
        kd_ratio: weight of the KL term in [0, 1]; 0 is the plain cross-entropy.
        temperature: divides both models' logits in the KL term (> 0).
        chunk_tokens, num_chunks, ignore_index, compile: as in :class:`ChunkedCrossEntropy`
            (``compile`` is accepted for the same config keys; the KD chunk runs eagerly).

    Call ``loss_fn(hidden, targets, output_fn, params, teacher_hidden, teacher_output)``: the student's
    hidden [b, s, dim], targets [b, s] (shifted, ``ignore_index`` where no loss), ``output_fn`` and
    ``params`` as for the cross-entropy; the teacher's hidden states [b, s, teacher_dim] and its output
    layer (same vocabulary). Returns ``(loss_sum, num_tokens)`` on the device.
    """

    def __init__(self, kd_ratio: float = 0.5, temperature: float = 1.0, chunk_tokens: int = 1024,
                 num_chunks: int | None = None, ignore_index: int = IGNORE_INDEX, compile: bool = False):
        super().__init__(chunk_tokens=chunk_tokens, num_chunks=num_chunks, ignore_index=ignore_index)
        if not 0.0 <= kd_ratio <= 1.0:
            raise ValueError(f"loss kd_ratio ({kd_ratio}) must be between 0 and 1")
        if temperature <= 0:
            raise ValueError(f"loss temperature ({temperature}) must be > 0")
        self.kd_ratio = kd_ratio
        self.temperature = temperature

    def cross_entropy(self) -> ChunkedCrossEntropy:
        """The student's plain cross-entropy in the same chunks (the validation loss of the KD recipes)."""
        return ChunkedCrossEntropy(self.chunk_tokens, self.num_chunks, self.ignore_index)

    def __call__(self, hidden: torch.Tensor, targets: torch.Tensor, output_fn: Callable[[torch.Tensor], torch.Tensor],
                 params: Sequence[torch.Tensor] = (), teacher_hidden: torch.Tensor | None = None,
                 teacher_output: Callable[[torch.Tensor], torch.Tensor] | None = None):
        if teacher_hidden is None or teacher_output is None:
            raise ValueError("ChunkedDistillationLoss needs the teacher's hidden states and output layer")
        targets = targets.reshape(-1)  # [n]
        num_tokens = (targets != self.ignore_index).sum()
        chunk_loss = partial(_kd_sum, kd_ratio=self.kd_ratio, temperature=self.temperature,
                             teacher_output=teacher_output)
        teacher_hidden = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).detach()  # [n, teacher_dim]
        return self._chunked_sum(hidden, (targets, teacher_hidden), output_fn, params, chunk_loss), num_tokens
