"""An lm-eval ``LM`` around a torchft model.

The scoring follows lm-eval's own Hugging Face backend (``HFLM``) step for step, so the same weights give
the same metrics through either: context/continuation split by encoding the whole string and cutting at
the context's length (``TemplateLM._encode_pair``), left truncation to ``max_length + 1`` tokens, rolling
windows with the BOS token as prefix for perplexity, and stop strings cut from generated text.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval import utils as lm_utils
from torch import nn

from torchft.generation import generate


class TorchFTEvalWrapper(TemplateLM):
    """Evaluate a torchft model (base, with adapter, or merged) with lm-eval.

    Args:
        model: a torchft decoder returning logits [b, s, vocab].
        tokenizer: a torchft tokenizer (``encode(text, add_bos, add_eos)``, ``decode``, ``bos_id``,
            ``eos_id``, ``stop_tokens``).
        max_seq_len: longest input scored at once; defaults to ``model.args.max_seq_len``.
        batch_size: requests per forward pass.
        max_gen_toks: default cap on generated tokens for ``generate_until`` tasks.
        add_bos: None (default) puts BOS in front of every encoded string exactly when the model's own
            tokenizer does (``tokenizer.adds_bos``), as lm-eval's HF backend does; True always puts
            ``bos_id`` first, False never.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        max_seq_len: int | None = None,
        batch_size: int = 8,
        max_gen_toks: int = 256,
        add_bos: bool | None = None,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size ({batch_size}) must be >= 1")
        self.model = model
        self.tokenizer = tokenizer
        self._max_length = max_seq_len or model.args.max_seq_len
        self._batch_size = batch_size
        self._max_gen_toks = max_gen_toks
        self.add_bos = add_bos
        self._device = next(model.parameters()).device

    # --- what lm-eval asks of every LM -------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        bos = getattr(self.tokenizer, "bos_id", None)
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        add_bos = self.add_bos if add_special_tokens is None else add_special_tokens
        if add_bos is None:  # the model's own policy
            return list(self.tokenizer.encode(string, add_bos=True, add_eos=False))
        ids = list(self.tokenizer.encode(string, add_bos=False, add_eos=False))
        bos = getattr(self.tokenizer, "bos_id", None)
        return [bos, *ids] if add_bos and bos is not None else ids

    def tok_decode(self, tokens: list[int]) -> str:
        # Special tokens (BOS, EOS, stop tokens) are dropped, as lm-eval's HF backend does.
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)

    # --- scoring -----------------------------------------------------------------------------------
    @torch.no_grad()
    def _model_logprobs(self, batch: list[list[int]]) -> torch.Tensor:
        """Log-probabilities [b, s, vocab] (fp32) of right-padded inputs; causal attention makes the
        padding invisible to the real positions."""
        length = max(len(x) for x in batch)
        tokens = torch.zeros(len(batch), length, dtype=torch.long, device=self.device)
        for row, x in enumerate(batch):
            tokens[row, : len(x)] = torch.tensor(x, device=self.device)
        return F.log_softmax(self.model(tokens).float(), dim=-1)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        was_training = self.model.training
        self.model.eval()
        # Longest first, as lm-eval's HF backend does; results are put back in request order.
        collator = Collator(requests, sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])))
        results = []
        for chunk in collator.get_batched(n=self.batch_size):
            # The model sees context + continuation minus the last token, left-truncated to max_length.
            inputs = [(ctx + cont)[-(self.max_length + 1):][:-1] for _, ctx, cont in chunk]
            logprobs = self._model_logprobs(inputs)  # [b, s, vocab]
            for (cache_key, _, cont), inp, lp in zip(chunk, inputs, logprobs):
                # Positions len(inp)-len(cont) .. len(inp)-1 predict the continuation tokens.
                lp = lp[len(inp) - len(cont): len(inp)]  # [len(cont), vocab]
                cont_ids = torch.tensor(cont, device=self.device)
                is_greedy = bool((lp.argmax(dim=-1) == cont_ids).all())
                answer = (float(lp.gather(1, cont_ids[:, None]).sum()), is_greedy)
                results.append(answer)
                if cache_key is not None:
                    self.cache_hook.add_partial("loglikelihood", cache_key, answer)
        self.model.train(was_training)
        return collator.get_original(results)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Total log-likelihood of whole documents, scored in disjoint windows of ``max_length`` tokens."""
        windows, owners = [], []
        for index, (string,) in enumerate(req.args for req in requests):
            token_windows = lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for window in map(lm_utils.make_disjoint_window, token_windows):
                windows.append((None,) + window)
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows)):
            totals[owner] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # --- generation --------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, per the task's gen_kwargs) continuations cut at the task's stop strings."""
        collator = Collator(
            [req.args for req in requests],
            sort_fn=lambda r: (-len(self.tok_encode(r[0])), r[0]),
            group_by="gen_kwargs",
            group_fn=lambda r: r[1],
        )
        eos_text = self.tokenizer.decode([self.eot_token_id], skip_special_tokens=False)
        stop_ids = list(getattr(self.tokenizer, "stop_tokens", None) or [self.eot_token_id])
        results = []
        for chunk in collator.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*chunk)
            kwargs = normalize_gen_kwargs(dict(all_kwargs[0]), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_gen_toks = kwargs.pop("max_gen_toks")
            max_ctx_len = self.max_length - max_gen_toks
            if max_ctx_len <= 0:
                raise ValueError(f"max_gen_toks ({max_gen_toks}) must be < max_seq_len ({self.max_length})")
            prompts = [self.tok_encode(c)[-max_ctx_len:] for c in contexts]
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0

            def reached_stop_string(rows: list[list[int]]) -> list[bool]:
                texts = [self.tok_decode(r) for r in rows]
                return [any(s and s in t for s in until) for t in texts]

            new_tokens = generate(
                self.model, prompts, max_gen_toks, temperature=temperature, top_k=kwargs.get("top_k"),
                top_p=kwargs.get("top_p"), stop_tokens=stop_ids, stop_fn=reached_stop_string,
                pad_id=self.eot_token_id,
            )
            for context, gen_kwargs, row in zip(contexts, all_kwargs, new_tokens):
                text = postprocess_generated_text(self.tok_decode(row), until, None)
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return collator.get_original(results)
