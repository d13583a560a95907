"""GGUF export: transformers loads the file; its logits, tokenizer and chat template equal the source's."""
import json
import shutil

import pytest
import torch

from tests.data.conftest import corpus, llama3_ranks_path, sp_model_path  # noqa: F401 (fixtures)
from tests.models._hf_reference import tiny_hf_llama
from torchft.checkpoint._io import copy_support_files
from torchft.checkpoint.hf import load_hf_args
from torchft.checkpoint.gguf import export_gguf, llama3_rope_factors
from torchft.cli import main as cli_main
from torchft.data import llama2_tokenizer, llama3_tokenizer
from torchft.data.tokenizers.hf_files import LLAMA2_CHAT_TEMPLATE

gguf = pytest.importorskip("gguf")

# Largest |logit difference| allowed, relative to the largest |logit| (f16/bf16: rounding; q8_0: 8-bit blocks).
BOUNDS = {"f16": 2e-3, "bf16": 1e-2, "q8_0": 3e-2}
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
