"""The quickstart, exactly as shipped (only its folders moved under tmp): the README's main command."""
import json
import math
import re
from pathlib import Path

import pytest
import torch

from torchft._recipes import full_finetune_single_device, lora_finetune_single_device
from torchft.config import load_config

from torchft.checkpoint.peft import ADAPTER_WEIGHTS_NAME as ADAPTER_FILE

from ._finetune import restore_torch_threads, val_losses

_threads = pytest.fixture(autouse=True)(restore_torch_threads)

# The quickstart figures README.md and docs/quickstart.md quote come from these runs. "about X (within
# T)" is checked within T; "below X" as an upper bound; parameter counts to the digits printed.
ROOT = Path(__file__).resolve().parents[2]
README, QUICKSTART = (ROOT / "README.md").read_text(), (ROOT / "docs" / "quickstart.md").read_text()


def _quoted(text: str, pattern: str) -> list[float]:
    found = re.search(pattern, " ".join(text.split()))  # figures may wrap across lines
    assert found, f"the docs no longer quote {pattern!r}: update this test with them"
    return [float(g) for g in found.groups()]


def _numel_millions(path: Path) -> float:
    """Parameters in a safetensors file, in millions to the 2 decimals the docs print."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return round(sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys()) / 1e6, 2)


def _check_validation_figures(val: dict[int, float], text: str, pattern: str) -> None:
    about, within, below = _quoted(text, pattern)
    assert abs(val[0] - about) <= within, (val[0], about, within)
    assert val[max(val)] < below, (val[max(val)], below)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """Both quickstarts share one base folder, as they do in /tmp: the second run reuses the first's base."""
    return tmp_path_factory.mktemp("quickstart") / "base"


def _run(recipe, name, tmp_path, base_dir, capsys):
    cfg = load_config(f"quickstart/{name}", [f"output_dir={tmp_path / 'out'}", f"base_model.path={base_dir}",
                                             "progress_bar=false"])
    recipe.main(cfg)
    return capsys.readouterr().out


def test_lora_quickstart_halves_the_validation_loss_and_loads_in_peft(tmp_path, base_dir, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = _run(lora_finetune_single_device, "lora_single_device", tmp_path, base_dir, capsys)
    assert "samples before fine-tuning:" in out and "samples after fine-tuning:" in out
    val = val_losses(tmp_path / "out")
    final_step = max(val)
    assert val[final_step] <= 0.5 * val[0]
    step = tmp_path / "out" / f"step_{final_step}"
    adapter_config = json.loads((step / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(base_dir.resolve())
    tokens = torch.tensor([[1, 5, 9, 300, 42, 7]])
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(step)(tokens).logits
        with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir),
                                                 step / "adapter")(tokens).logits
    torch.testing.assert_close(with_adapter, merged, rtol=1e-4, atol=1e-4)

    # the figures the docs quote
    _check_validation_figures(val, QUICKSTART, r"`step 0: validation loss` of about ([\d.]+) \(within ([\d.]+)\)"
                                               r".*?\(below ([\d.]+) at the end\)")
    total, adapter = _numel_millions(step / "model.safetensors"), _numel_millions(step / "adapter" / ADAPTER_FILE)
    assert _quoted(QUICKSTART, r"([\d.]+)M parameters; its LoRA adapters add ([\d.]+)M") == [total, adapter]
    assert _quoted(README, r"\(([\d.]+)M parameters, made.*?\(([\d.]+)M trainable adapter") == [total, adapter]
    about, below = _quoted(README, r"validation loss \(about ([\d.]+) at step 0, below ([\d.]+) at the end")
    assert abs(val[0] - about) <= 1 and val[final_step] < below
    after = out.split("samples after fine-tuning:")[1]
    quoted = re.findall(r"(`'[^`]*' -> '[^`]*'`)", " ".join((README + QUICKSTART).split()))
    assert len(quoted) >= 3
    for sample in quoted:
        assert sample.strip("`") in " ".join(after.split()), sample
    _gguf_generates_the_same_text(step, tmp_path / "model.gguf")


def _gguf_generates_the_same_text(step, gguf_path):
    """docs/export.md's round trip: the step folder as GGUF, loaded by transformers, answers as the folder does."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from torchft.cli.main import main as tune
    from torchft.data.tokenizers import model_tokenizer

    assert tune(["export", "--checkpoint_dir", str(step), "--format", "gguf", "--dtype", "f16",
                 "--output", str(gguf_path)]) == 0
    chat = [{"role": "user", "content": "Add the two numbers. 3 + 4"}]
    ours = model_tokenizer(str(step))
    prompt, _ = ours.tokenize_messages(chat, add_generation_prompt=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    assert list(tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=False)) == prompt
    texts = []
    for model in (AutoModelForCausalLM.from_pretrained(step),
                  AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)):
        out = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=ours.stop_tokens)
        texts.append(ours.decode(out[0, len(prompt):].tolist()))
    assert texts[0] == texts[1] and texts[0].strip()
    # docs/export.md's --adapter-only command, on the same step folder
    adapter_path = gguf_path.with_name("lora.gguf")
    assert tune(["export", "--checkpoint_dir", str(step), "--adapter-only", "--output", str(adapter_path)]) == 0
    assert adapter_path.stat().st_size < gguf_path.stat().st_size / 2  # the adapter matrices only


def test_full_quickstart_halves_the_validation_loss(tmp_path, base_dir, capsys):
    from transformers import AutoModelForCausalLM

    _run(full_finetune_single_device, "full_single_device", tmp_path, base_dir, capsys)
    val = val_losses(tmp_path / "out")
    assert val[max(val)] <= 0.5 * val[0]
    _check_validation_figures(val, QUICKSTART, r"full fine-tuning variant .*?\(validation loss from about ([\d.]+) "
                                               r"\(within ([\d.]+)\) to below ([\d.]+) in 400 steps\)")
    assert max(val) == 400
    AutoModelForCausalLM.from_pretrained(tmp_path / "out" / f"step_{max(val)}")


DISTILLATION = (ROOT / "docs" / "distillation.md").read_text()


def test_kd_quickstart_distils_the_quickstart_base_into_a_smaller_student(tmp_path, base_dir, capsys):
    """docs/distillation.md's command as shipped (the teacher is the quickstart's base), its first 40 steps."""
    from torchft._recipes import knowledge_distillation_single_device

    cfg = load_config("quickstart/kd_single_device", [
        f"output_dir={tmp_path / 'out'}", f"teacher_base_model.path={base_dir}",
        f"base_model.path={tmp_path / 'student'}", "progress_bar=false", "max_steps=40", "eval_every_n_steps=20"])
    knowledge_distillation_single_device.main(cfg)
    out = capsys.readouterr().out
    assert "samples after fine-tuning:" in out
    val = val_losses(tmp_path / "out")
    assert list(val) == [0, 20, 40]
    _check_validation_figures(val, DISTILLATION, r"validation loss starts at about ([\d.]+) \(within ([\d.]+)\) "
                                                 r"and is below ([\d.]+) by step 40")
    loss = [json.loads(line)["loss"] for line in (tmp_path / "out" / "logs" / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]
    assert sum(loss[-5:]) / 5 < 0.5 * sum(loss[:5]) / 5  # the KD loss (CE and KL from the teacher) falls
