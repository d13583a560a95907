"""GGUF export: transformers loads the file; its logits, tokenizer and chat template equal the source's."""
import json
import shutil

import pytest
import torch

from tests.data.conftest import corpus, llama3_ranks_path, sp_model_path  # noqa: F401 (fixtures)
from tests.models._hf_reference import tiny_hf_llama
from torchft.checkpoint._io import copy_support_files
from torchft.checkpoint.hf import load_hf_args
from torchft.checkpoint.gguf import LOGIT_TOLERANCE as BOUNDS
from torchft.checkpoint.gguf import export_gguf, llama3_rope_factors
from torchft.cli import main as cli_main
from torchft.data import llama2_tokenizer, llama3_tokenizer
from torchft.data.tokenizers.hf_files import LLAMA2_CHAT_TEMPLATE

gguf = pytest.importorskip("gguf")

TEXTS = corpus(20, seed=4) + ["a   b\t\tc\n\n d ", "héllo 日本 🦙", "12345 and 3.14", "It's I'm"]


def step_folder(tmp_path, variant, tokenizer_path):
    """A step-like folder: a tiny random transformers Llama + Meta's tokenizer.model (+ the HF files)."""
    tokenizer = (llama2_tokenizer if variant == "llama2" else llama3_tokenizer)(tokenizer_path)
    source, folder = tmp_path / "input", tmp_path / "step_1"
    source.mkdir()
    shutil.copy(tokenizer_path, source / "tokenizer.model")
    model = tiny_hf_llama(variant, 0, vocab_size=tokenizer.vocab_size, max_position_embeddings=128)
    model.save_pretrained(folder)
    (folder / "generation_config.json").unlink(missing_ok=True)
    copy_support_files(source, folder)
    return folder, model, tokenizer


@pytest.mark.parametrize("variant,dtype", [("llama3", "f16"), ("llama2", "q8_0"), ("llama3_2", "bf16")])
def test_transformers_loads_the_gguf(tmp_path, variant, dtype, llama3_ranks_path, sp_model_path):  # noqa: F811
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, model, ours = step_folder(tmp_path, variant, sp_model_path if variant == "llama2" else llama3_ranks_path)
    out = export_gguf(folder, tmp_path / "gguf" / "model.gguf", dtype=dtype)
    loaded = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32)
    ids = torch.tensor([ours.encode("Hello world, the cat sat on the mat 123!")])
    with torch.no_grad():
        expected, got = model(ids).logits, loaded(ids).logits
    assert (expected - got).abs().max() <= BOUNDS[dtype] * expected.abs().max()
    tokenizer = AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    for text in TEXTS:
        assert tokenizer.encode(text) == ours.encode(text, add_eos=False), text
    chat = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}]
    if variant == "llama2":
        # transformers' sentencepiece rebuild puts no space before the text after <s> (llama.cpp and
        # sentencepiece do), so the chat ids are not compared: the template is the one torchft writes.
        assert tokenizer.chat_template == LLAMA2_CHAT_TEMPLATE
        return
    ids = tokenizer.apply_chat_template(chat, tokenize=True, return_dict=False)
    assert list(ids) == ours.tokenize_messages(chat)[0]


def test_hyperparameters_and_llama3_1_rope_factors(tmp_path, llama3_ranks_path):  # noqa: F811
    folder, model, ours = step_folder(tmp_path, "llama3_1", llama3_ranks_path)
    out = export_gguf(folder, tmp_path / "model.gguf", dtype="f16")
    reader = gguf.GGUFReader(out)
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    config = model.config
    assert field("general.architecture") == "llama"
    assert field("llama.context_length") == config.max_position_embeddings
    assert (field("llama.attention.head_count"), field("llama.attention.head_count_kv")) == (4, 2)
    assert field("llama.rope.freq_base") == 500000.0
    assert field("llama.attention.layer_norm_rms_epsilon") == pytest.approx(config.rms_norm_eps)
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.eos_token_id") == ours.eos_id
    # llama.cpp splits text with the pattern `pre` names and adds BOS only when asked: with "default" or
    # without add_bos_token, its ids differ from torchft's (benchmarks/bench_gguf_llamacpp.py shows it).
    assert field("tokenizer.ggml.pre") == "llama-bpe" and field("tokenizer.ggml.add_bos_token") is True
    assert field("tokenizer.ggml.bos_token_id") == ours.bos_id
    assert "<|start_header_id|>" in field("tokenizer.chat_template")
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" in tensors and "blk.1.ffn_down.weight" in tensors
    # llama.cpp divides each base frequency by its factor: transformers' scaled frequencies say which.
    rotary = model.model.rotary_emb
    base = 1.0 / (500000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    factors = torch.from_numpy(llama3_rope_factors(16, 500000.0, load_hf_args(folder).rope_scaling))
    torch.testing.assert_close(factors, base / rotary.inv_freq, rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.from_numpy(tensors["rope_freqs.weight"].data.copy()), factors)


def tune_export(capsys, *args):
    capsys.readouterr()  # what the fixtures printed
    with pytest.raises(SystemExit) as exit_info:
        cli_main.main(["export", *map(str, args)])
    return exit_info.value.code, capsys.readouterr().err.strip().splitlines()


@pytest.fixture
def llama3_folder(tmp_path, llama3_ranks_path):  # noqa: F811
    return step_folder(tmp_path, "llama3", llama3_ranks_path)[0]


def test_cli_errors_are_one_line_and_leave_no_file(tmp_path, capsys, llama3_folder, monkeypatch):
    out = tmp_path / "model.gguf"
    code, err = tune_export(capsys, "--checkpoint_dir", llama3_folder, "--dtype", "q4_k", "--output", out)
    assert code != 0 and len(err) == 1 and "dtype 'q4_k' is not one of f16, bf16, q8_0" in err[0]

    other = tmp_path / "other"
    shutil.copytree(llama3_folder, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(dict(config, model_type="mistral")))
    code, err = tune_export(capsys, "--checkpoint_dir", other, "--output", out)
    assert code != 0 and len(err) == 1 and "model_type 'mistral' is not 'llama'" in err[0]

    bare = tmp_path / "bare"
    shutil.copytree(llama3_folder, bare, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens_map.json"))
    code, err = tune_export(capsys, "--checkpoint_dir", bare, "--output", out)
    assert code != 0 and len(err) == 1 and "no tokenizer files" in err[0]

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", disk_full)
    code, err = tune_export(capsys, "--checkpoint_dir", llama3_folder, "--output", out)
    assert code != 0 and len(err) == 1 and "No space left on device" in err[0]
    assert list(tmp_path.glob("*.gguf*")) == [] and list(tmp_path.glob(".model.gguf*")) == []


def test_cli_writes_the_file(tmp_path, capsys, llama3_folder):
    out = tmp_path / "model.gguf"
    assert cli_main.main(["export", "--checkpoint_dir", str(llama3_folder), "--output", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {out} (") and out.is_file()


def test_executorch_without_the_package_says_how_to_install(tmp_path, capsys, llama3_folder, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "executorch" else real(name, *a))
    code, err = tune_export(capsys, "--checkpoint_dir", llama3_folder, "--format", "executorch",
                            "--output", tmp_path / "m.pte")
    assert code != 0 and len(err) == 1 and "pip install executorch" in err[0]
    code, err = tune_export(capsys, "--checkpoint_dir", llama3_folder, "--format", "executorch", "--adapter-only",
                            "--output", tmp_path / "m.pte")
    assert code != 0 and len(err) == 1 and "--adapter-only is for --format gguf" in err[0]


# ---- --adapter-only: a GGUF LoRA file for llama.cpp's --lora ----------------------------------------
def lora_step_folder(tmp_path, base_folder, base_model, use_dora=False):
    """A step-like folder of a PEFT LoRA on ``base_model``: the merged model + ``adapter/`` (random B)."""
    import copy

    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(copy.deepcopy(base_model),
                                LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=use_dora))
    torch.manual_seed(3)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.2)  # a delta far above f16 rounding of the weights
    step = tmp_path / "lora_step"
    peft_model.save_pretrained(step / "adapter")
    peft_model.merge_and_unload().save_pretrained(step)
    (step / "generation_config.json").unlink(missing_ok=True)
    copy_support_files(base_folder, step)
    return step


def gguf_tensors(path):
    """name -> float32 numpy array (PyTorch shape) of every tensor in a GGUF file."""
    reader = gguf.GGUFReader(path)
    return {t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
            for t in reader.tensors}, reader


def test_adapter_only_gguf_applied_to_the_base_gguf_equals_the_merged_gguf(tmp_path, llama3_ranks_path):  # noqa: F811
    base_folder, base_model, _ = step_folder(tmp_path, "llama3", llama3_ranks_path)
    step = lora_step_folder(tmp_path, base_folder, base_model)
    base, _ = gguf_tensors(export_gguf(base_folder, tmp_path / "base.gguf", dtype="f16"))
    merged, _ = gguf_tensors(export_gguf(step, tmp_path / "merged.gguf", dtype="f16"))
    # The library call takes the step folder; the CLI is given the adapter folder inside it.
    assert cli_main.main(["export", "--checkpoint_dir", str(step / "adapter"), "--adapter-only", "--dtype", "f32",
                          "--output", str(tmp_path / "adapter.gguf")]) == 0
    adapter, reader = gguf_tensors(tmp_path / "adapter.gguf")
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    assert reader.fields["adapter.lora.alpha"].contents() == 8.0
    assert reader.fields["general.architecture"].contents() == "llama"
    adapted = sorted(name.removesuffix(".lora_a") for name in adapter if name.endswith(".lora_a"))
    assert len(adapted) == 2 * 7 and "blk.1.attn_k.weight" in adapted and "blk.0.ffn_down.weight" in adapted
    for name in adapted:
        a, b = adapter[name + ".lora_a"], adapter[name + ".lora_b"]
        assert a.shape == (4, base[name].shape[1]) and b.shape == (base[name].shape[0], 4)  # [rank, in], [out, rank]
        # llama.cpp: W' = W + alpha / rank * B @ A, on the base GGUF's (q/k-permuted) rows.
        applied = base[name] + 8 / 4 * (b @ a)
        scale = abs(merged[name]).max()
        assert abs(applied - merged[name]).max() <= 2e-3 * scale, name  # f16 rounding of W and W'
        assert abs(b @ a).max() > 0.1 * scale  # the adapter changes the weight far beyond that bound


def test_adapter_only_refuses_dora_and_q8_0_in_one_line(tmp_path, capsys, llama3_ranks_path):  # noqa: F811
    base_folder, base_model, _ = step_folder(tmp_path, "llama3", llama3_ranks_path)
    step = lora_step_folder(tmp_path, base_folder, base_model)
    out = tmp_path / "adapter.gguf"
    code, err = tune_export(capsys, "--checkpoint_dir", step, "--adapter-only", "--dtype", "q8_0", "--output", out)
    assert code != 0 and len(err) == 1 and "is not one of f32, f16, bf16 for --adapter-only" in err[0]
    code, err = tune_export(capsys, "--checkpoint_dir", base_folder, "--adapter-only", "--output", out)
    assert code != 0 and len(err) == 1 and "adapter_config.json: no such file" in err[0]
    config_path = step / "adapter" / "adapter_config.json"
    config_path.write_text(json.dumps(dict(json.loads(config_path.read_text()), use_dora=True)))
    code, err = tune_export(capsys, "--checkpoint_dir", step, "--adapter-only", "--output", out)
    assert code != 0 and len(err) == 1 and "DoRA adapter has no llama.cpp LoRA form" in err[0]
    assert not out.exists()


def test_the_documented_tolerances_are_the_checked_ones():
    """docs/export.md's table quotes LOGIT_TOLERANCE, the bound this file and the llama.cpp benchmark check."""
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parents[2] / "docs" / "export.md").read_text()
    quoted = {d: float(p) / 100 for d, p in re.findall(r"^\| `(\w+)` \|.*?at most ([\d.]+)%", page, re.M)}
    assert quoted == BOUNDS
