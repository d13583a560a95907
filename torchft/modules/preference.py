"""Preference losses (DPO, IPO, SimPO) and the answers' log-probabilities they compare.

The log-probability of an answer is the sum over its tokens of ``log p(token | everything before)``.
:func:`sequence_log_probs` computes it from the final hidden states (``model.hidden_states()``) ``chunk_tokens``
positions at a time, so the ``[batch, seq, vocab]`` logits never exist: each chunk's logits are made, reduced to
one log-probability per position, and freed; backward recomputes the chunk's logits (activation
checkpointing of the output projection), so the memory of the loss is one chunk of logits either way.

:class:`PreferenceLoss` turns the policy's (and the reference's) log-probabilities of a batch of pairs into
per-pair losses and the rewards TRL reports, with the conventions of TRL's ``DPOTrainer`` (``sigmoid``,
``ipo``) and ``CPOTrainer`` (``simpo``)::

    dpo:    -(1 - eps) * logsigmoid(beta * d) - eps * logsigmoid(-beta * d)   d = (pc - rc) - (pr - rr)
    ipo:    (d' - 1 / (2 * beta)) ** 2                                         d' as d, each term / its length
    simpo:  -(1 - eps) * logsigmoid(beta * s - gamma) - eps * logsigmoid(gamma - beta * s)
                                                                               s = pc / len_c - pr / len_r

with ``pc`` / ``pr`` the policy's log-probabilities of the chosen / rejected answer, ``rc`` / ``rr`` the
reference's and ``eps`` the ``label_smoothing`` (conservative DPO). SimPO needs no reference model.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from torchft.data.collate import IGNORE_INDEX

LOSS_TYPES = ("dpo", "ipo", "simpo")


def _chunk_log_probs(hidden: torch.Tensor, targets: torch.Tensor, output_fn, ignore_index: int) -> torch.Tensor:
    # hidden: [n, dim], targets: [n] -> [n] fp32 log p(target), 0 where the target is ignored
    logits = output_fn(hidden).float()  # [n, vocab]: the only logits alive
    return -F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="none")


def token_log_probs(hidden: torch.Tensor, targets: torch.Tensor, output_fn: Callable[[torch.Tensor], torch.Tensor],
                    chunk_tokens: int = 1024, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``log p(targets)`` per position, [b, s] fp32 (0 where ``targets`` is ``ignore_index``), from the
    hidden states [b, s, dim] and the output projection, ``chunk_tokens`` positions at a time."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens ({chunk_tokens}) must be >= 1")
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])  # [n, dim]
    flat_targets = targets.reshape(-1)  # [n]
    recompute = torch.is_grad_enabled()
    pieces = []
    for start in range(0, flat_hidden.shape[0], chunk_tokens):
        args = (flat_hidden[start:start + chunk_tokens], flat_targets[start:start + chunk_tokens], output_fn,
                ignore_index)
        # With gradients: keep only the chunk's input, recompute its logits in backward.
        pieces.append(checkpoint(_chunk_log_probs, *args, use_reentrant=False) if recompute
                      else _chunk_log_probs(*args))
    return torch.cat(pieces).reshape(targets.shape)


def sequence_log_probs(hidden: torch.Tensor, targets: torch.Tensor, output_fn: Callable[[torch.Tensor], torch.Tensor],
                       chunk_tokens: int = 1024, ignore_index: int = IGNORE_INDEX
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's summed log-probability of its targets ([b] fp32) and its count of targets ([b] fp32).

    ``targets`` [b, s] are next-token targets (``shift_targets(labels)``), ``ignore_index`` on the prompt
    and the padding.
    """
    per_token = token_log_probs(hidden, targets, output_fn, chunk_tokens, ignore_index)  # [b, s]
    return per_token.sum(dim=1), (targets != ignore_index).sum(dim=1).float()


class PreferenceLoss:
    """Per-pair preference loss (see the module docstring).

    Args:
        loss_type: ``dpo`` (sigmoid), ``ipo`` or ``simpo`` (reference-free, length-normalised).
        beta: the inverse temperature (DPO/SimPO) or IPO's regularisation (its tau).
        label_smoothing: the probability that a pair's preference is flipped (conservative DPO / SimPO).
        simpo_gamma: SimPO's target reward margin (gamma; TRL's ``simpo_gamma``).
        chunk_tokens: positions per chunk of the log-probabilities (see :func:`sequence_log_probs`).
    """

    def __init__(self, loss_type: str = "dpo", beta: float = 0.1, label_smoothing: float = 0.0,
                 simpo_gamma: float = 0.5, chunk_tokens: int = 1024, ignore_index: int = IGNORE_INDEX):
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss.loss_type ({loss_type!r}) must be one of {', '.join(LOSS_TYPES)}")
        if beta <= 0:
            raise ValueError(f"loss.beta ({beta}) must be > 0")
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"loss.label_smoothing ({label_smoothing}) must be in [0, 0.5)")
        if chunk_tokens < 1:
            raise ValueError(f"loss.chunk_tokens ({chunk_tokens}) must be >= 1")
        self.loss_type, self.beta, self.label_smoothing = loss_type, beta, label_smoothing
        self.simpo_gamma, self.chunk_tokens, self.ignore_index = simpo_gamma, chunk_tokens, ignore_index

    @property
    def needs_reference(self) -> bool:
        """SimPO compares the policy with itself; DPO and IPO need the reference's log-probabilities."""
        return self.loss_type != "simpo"

    def log_probs(self, hidden: torch.Tensor, targets: torch.Tensor, output_fn) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`sequence_log_probs` with this loss's chunking: ([2b] sums, [2b] counts)."""
        return sequence_log_probs(hidden, targets, output_fn, self.chunk_tokens, self.ignore_index)

    def _smoothed_sigmoid(self, logits: torch.Tensor) -> torch.Tensor:
        eps = self.label_smoothing
        return -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)

    def __call__(self, policy: torch.Tensor, lengths: torch.Tensor, reference: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Losses and rewards of ``b`` pairs.

        Args:
            policy: [2b] the policy's summed log-probabilities, chosen answers first (as collated).
            lengths: [2b] the answers' token counts.
            reference: [2b] the reference's log-probabilities (None for SimPO).
        Returns:
            ``(losses [b], chosen_rewards [b], rejected_rewards [b])``; the rewards are detached:
            ``beta * (policy - reference)`` (SimPO: ``beta * policy / length``), as TRL logs them.
        """
        if self.needs_reference and reference is None:
            raise ValueError(f"loss_type {self.loss_type!r} needs the reference model's log-probabilities")
        if self.loss_type == "simpo":
            scores = policy / lengths.clamp(min=1)  # [2b] mean log-probability per answer token
        else:
            scores = policy - reference  # [2b] log-ratios
        chosen, rejected = scores.chunk(2)
        if self.loss_type == "dpo":
            losses = self._smoothed_sigmoid(self.beta * (chosen - rejected))
        elif self.loss_type == "ipo":
            chosen_len, rejected_len = lengths.clamp(min=1).chunk(2)
            losses = (chosen / chosen_len - rejected / rejected_len - 1 / (2 * self.beta)) ** 2
        else:
            losses = self._smoothed_sigmoid(self.beta * (chosen - rejected) - self.simpo_gamma)
        return losses, self.beta * chosen.detach(), self.beta * rejected.detach()


def preference_metrics(losses: torch.Tensor, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor
                       ) -> torch.Tensor:
    """Per-batch SUMS [5] of loss, rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins:
    summed over micro-batches (and ranks), then divided by the pair count (the names: :data:`METRIC_NAMES`)."""
    return torch.stack([losses.detach().sum(), chosen_rewards.sum(), rejected_rewards.sum(),
                        (chosen_rewards > rejected_rewards).float().sum(), (chosen_rewards - rejected_rewards).sum()])


METRIC_NAMES = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")
