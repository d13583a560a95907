"""Tiny random Llama weights shared by transformers and torchft, and a tiny tokenizer both can load.

Used by the generation, evaluation and quantization tests: the same weights go through the reference
(transformers / lm-eval's HF backend) and through torchft, so outputs can be compared exactly.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

WORDS = (
    "the a an cat dog bird fish tree house river sun moon red blue green big small old new runs sleeps "
    "sings swims is was and or but on in under over near far yes no one two three four five six seven "
    "eight nine ten question answer true false what where who why how color sky grass water fire user assistant system"
).split()
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
TOKENS = SPECIALS + WORDS + list(".,?!:;'\"-0123456789")
VOCAB_SIZE = len(TOKENS)  # the models' vocabulary matches the tokenizer's


def tiny_hf_config(vocab_size: int = VOCAB_SIZE, tie_word_embeddings: bool = False, max_seq_len: int = 256):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_seq_len,
        rms_norm_eps=1e-5, tie_word_embeddings=tie_word_embeddings, bos_token_id=1, eos_token_id=2,
        pad_token_id=0,
    )


def hf_to_torchft_keys(hf_state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' Llama names -> torchft names: drop the ``model.`` prefix (lm_head stays)."""
    return {k.removeprefix("model."): v for k, v in hf_state_dict.items()}


def make_pair(seed: int = 0, **config_kwargs):
    """(transformers LlamaForCausalLM, torchft model) with identical random weights, both in eval mode."""
    from transformers import LlamaForCausalLM

    from torchft.models import from_hf_config

    torch.manual_seed(seed)
    config = tiny_hf_config(**config_kwargs)
    hf_model = LlamaForCausalLM(config).eval()
    # Random (not default-initialised) norms so every weight matters.
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    model = from_hf_config(config.to_dict()).eval()
    sd = {k: v for k, v in hf_to_torchft_keys(hf_model.state_dict()).items()
          if not (config.tie_word_embeddings and k == "lm_head.weight")}
    model.load_state_dict(sd)
    return hf_model, model


def save_tiny_checkpoint(folder: Path, seed: int = 0, *, tokenizer_adds_bos: bool = True, **config_kwargs):
    """An HF model folder (config.json, model.safetensors, tokenizer files); returns (folder, hf_model)."""
    hf_model, _ = make_pair(seed=seed, **config_kwargs)
    hf_model.save_pretrained(folder)
    save_tiny_tokenizer(folder, adds_bos=tokenizer_adds_bos)
    return folder, hf_model


def save_tiny_tokenizer(folder: Path, adds_bos: bool = True) -> Path:
    """A word-level tokenizer saved in the Hugging Face folder layout. ``adds_bos``: its post-processor
    puts ``<s>`` first, like Llama's; without it the tokenizer adds no BOS (bos_token is still set)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, decoders
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(TOKENS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces, keeps punctuation attached
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
    )
    # A small chat format: "<s> user : hi . assistant : ..." (every piece is in the vocabulary).
    fast.chat_template = (
        "{{ bos_token }}{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} . {% endfor %}"
        "{% if add_generation_prompt %}assistant :{% endif %}"
    )
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(folder)
    # transformers 5 writes the template to chat_template.jinja; older readers look in tokenizer_config.json.
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.setdefault("chat_template", fast.chat_template)
    config_path.write_text(json.dumps(config, indent=2))
    return folder
