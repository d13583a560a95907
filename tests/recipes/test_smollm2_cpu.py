"""README's "What next on a CPU": the SmolLM2 config, as shipped, on a folder shaped like the download.

The folder has what HuggingFaceTB/SmolLM2-135M-Instruct ships (config.json, model.safetensors with tied
embeddings, a byte-level BPE tokenizer.json with ChatML specials, tokenizer_config.json with its chat
template) and the model's architecture traits (9 heads over 3 kv heads, tied embeddings, RoPE base
100000), shrunk to 2 layers of dim 72 so two steps run in seconds. Random weights; nothing is downloaded.
"""
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from torchft.cli.main import main as tune

from ._finetune import make_data, restore_torch_threads, train_losses, val_losses

_threads = pytest.fixture(autouse=True)(restore_torch_threads)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # SmolLM2's ids 0, 1, 2
# SmolLM2-Instruct's chat format (ChatML, with a default system message)
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n' }}{% endif %}"
          "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _save_byte_level_tokenizer(folder: Path, texts: list[str]) -> int:
    """A byte-level BPE tokenizer.json trained on ``texts``, saved as transformers saves SmolLM2's; its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=384, special_tokens=SPECIALS, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>")
    fast.chat_template = CHATML
    fast.save_pretrained(folder)
    config_path = folder / "tokenizer_config.json"  # where SmolLM2's folder keeps its template
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "chat_template": CHATML}))
    return tok.get_vocab_size()


def _save_smollm2_shaped_folder(folder: Path, train_file: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    texts = [" ".join(json.loads(line).values()) for line in train_file.read_text().splitlines()]
    vocab_size = _save_byte_level_tokenizer(folder, texts)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=72, intermediate_size=192, num_hidden_layers=2,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, hidden_act="silu",
                         bos_token_id=1, eos_token_id=2, pad_token_id=2,
                         initializer_range=0.5)  # wide weights: the greedy samples vary from token to token
    LlamaForCausalLM(config).save_pretrained(folder)


def test_smollm2_config_trains_on_a_smollm2_shaped_folder_and_its_output_loads_in_transformers_and_peft(
        tmp_path, capsys, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from torchft.data.tokenizers import model_tokenizer
    from torchft.generation import load_model

    monkeypatch.setattr(sys, "argv", list(sys.argv))  # `tune run` sets it, as `python recipe.py` would see it
    train, val = make_data(tmp_path, train_rows=32, val_rows=8)
    base = tmp_path / "SmolLM2-135M-Instruct"
    _save_smollm2_shaped_folder(base, train)
    out = tmp_path / "out"
    assert tune(["run", "lora_finetune_single_device", "--config", "smollm2/135M_lora_single_device",
                 f"checkpointer.checkpoint_dir={base}", f"output_dir={out}",
                 f"dataset.data_files={train}", f"validation_dataset.data_files={val}",
                 "max_steps=2", "save_every_n_steps=2", "eval_every_n_steps=2", "progress_bar=false",
                 "+cpu_threads=1"]) == 0
    printed = capsys.readouterr().out
    losses = {**train_losses(out), **{f"val{k}": v for k, v in val_losses(out).items()}}
    assert set(losses) == {1, 2, "val0", "val2"} and all(math.isfinite(v) for v in losses.values()), losses
    step = out / "step_2"

    # transformers reads the step folder as it is: same tokenizer ids and chat, same logits as torchft's model
    ours = model_tokenizer(str(step))
    theirs = AutoTokenizer.from_pretrained(step)
    chat = [{"role": "user", "content": "Add the two numbers.\n\n3 + 4"}]
    prompt, _ = ours.tokenize_messages(chat, add_eos=False, add_generation_prompt=True)
    assert list(theirs.apply_chat_template(chat, add_generation_prompt=True, return_dict=False)) == prompt
    text = "Write the word in capital letters:  Ünïcode\t\t river  3 + 4"
    assert theirs(text, add_special_tokens=True)["input_ids"] == ours.encode(text, add_bos=True, add_eos=False)
    merged = AutoModelForCausalLM.from_pretrained(step).eval()
    tokens = torch.tensor([prompt])
    with torch.no_grad():
        expected = merged(tokens).logits
        torch.testing.assert_close(load_model(str(step), device="cpu", dtype=torch.float32)(tokens), expected, rtol=1e-4, atol=1e-4)
        # peft: the adapter on the downloaded folder is the merged model
        adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), step / "adapter").eval()
        torch.testing.assert_close(adapted(tokens).logits, expected, rtol=1e-4, atol=1e-4)
        # the "after" sample the run printed is transformers' greedy answer from the step folder
        new = merged.generate(tokens, max_new_tokens=16, do_sample=False, eos_token_id=ours.stop_tokens)[0, len(prompt):]
    answer = ours.decode([t for t in new.tolist() if t not in ours.stop_tokens]).strip()
    after = printed.split("samples after fine-tuning:")[1]
    assert f"'Add the two numbers. 3 + 4' -> {answer!r}" in after and answer
