"""Quantization-aware training: torchao's fake-quant numerics, the fake_quant_after_n_steps switch and its
resume, and `tune run quantize` of a QAT step folder matching the fake-quantized model."""
import pytest
import torch
from torch import nn

from torchft.modules.peft.lora import LoRALinear
from torchft.training.qat import QATSettings, apply_qat, qat_settings, set_fake_quant, with_fake_quant_schedule

from ..recipes._finetune import make_base, restore_torch_threads, tiny_config, train_losses

_threads = pytest.fixture(autouse=True)(restore_torch_threads)


def _lora(seed=0):
    torch.manual_seed(seed)
    layer = LoRALinear(64, 48, rank=4, alpha=8)
    nn.init.normal_(layer.lora_b.weight, std=0.05)  # a non-zero adapter, so the merged weight differs from W
    return layer


def test_lora_fake_quant_equals_torchaos_qat_linear_on_the_merged_weight():
    """8da4w on a LoRA layer == torchao's FakeQuantizedLinear built by QATConfig from the PTQ config it simulates."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerGroup
    from torchao.quantization.qat import QATConfig

    layer = _lora()
    holder = nn.Sequential(layer)
    apply_qat(holder, QATSettings("8da4w", group_size=32))
    reference = nn.Sequential(nn.Linear(64, 48, bias=False))
    with torch.no_grad():
        reference[0].weight.copy_(layer.merged_weight())
    base = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(32))
    quantize_(reference, QATConfig(base, step="prepare"))
    x = torch.randn(3, 5, 64)
    got, want = holder(x), reference(x)
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    plain = layer.base_forward(x) + layer.scaling * layer.lora_b(layer.lora_a(x))
    assert not torch.allclose(got, plain, atol=1e-3)  # fake quantization really changes the output
    got.sum().backward()  # straight-through: the adapter still gets gradients
    assert layer.lora_b.weight.grad.abs().sum() > 0 and layer.weight.grad is None


def test_switch_off_equals_the_plain_model_and_the_schedule_turns_it_on_after_n_steps():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    plain = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    plain.load_state_dict(model.state_dict())
    apply_qat(model, QATSettings("4w", group_size=32))
    assert set(model.state_dict()) == set(plain.state_dict())  # same names: step folders stay plain HF
    x = torch.randn(4, 64)
    seen = []
    step = with_fake_quant_schedule(lambda batches, s: seen.append(torch.equal(model(x), plain(x))), model,
                                    QATSettings("4w", group_size=32, fake_quant_after_n_steps=2), start_step=0)
    assert torch.equal(model(x), plain(x))  # before step 1: off
    for s in (1, 2, 3, 4):
        step([], s)
    assert seen == [True, True, False, False]
    # a run resumed after step 3 starts with it on
    with_fake_quant_schedule(lambda b, s: None, model, QATSettings("4w", 32, 2), start_step=3)
    assert not torch.equal(model(x), plain(x))
    set_fake_quant(model, False)
    assert torch.equal(model(x), plain(x))


def test_bad_settings_name_the_key_and_the_rule():
    with pytest.raises(ValueError, match=r"qat.scheme 'int3' is not a QAT scheme; choose one of 8da4w, 4w"):
        qat_settings({"scheme": "int3"})
    with pytest.raises(ValueError, match=r"qat: unknown key\(s\) groupsize"):
        qat_settings({"scheme": "4w", "groupsize": 32})
    with pytest.raises(ValueError, match=r"qat.group_size \(48\) must divide .*0 has 64"):
        apply_qat(nn.Sequential(nn.Linear(64, 8)), QATSettings("8da4w", group_size=48))
    with pytest.raises(ValueError, match="qat with LoRA needs lora_dropout 0"):
        apply_qat(nn.Sequential(LoRALinear(64, 8, rank=2, alpha=4, dropout=0.1)), QATSettings("8da4w"))


def _qat_config(root, base, overrides=()):
    return tiny_config("qat_lora", root, base, ["qat.fake_quant_after_n_steps=2", "max_steps=4",
                                                "save_every_n_steps=1", "checkpointer.keep_last_n=10", *overrides])


PROBE = torch.tensor([[1, 5, 9, 22, 40, 7, 7, 3, 100, 512]])


def converted_fake_and_plain_logits(folder, output_dir, probe=PROBE):
    """An 8da4w QAT step folder (group size 32) converted by `tune run quantize`'s library path into
    ``output_dir``: the logits on ``probe`` of the converted model, of the folder's model fake-quantized
    as training computed, and of it unquantized."""
    from torchft._recipes.quantize import main as quantize
    from torchft.config import load_config
    from torchft.generation import load_model
    from torchft.generation._quantize import load_quantized

    quantize(load_config("quantization", [f"checkpoint_dir={folder}", f"output_dir={output_dir}",
                                          "scheme=int8_dynamic_activation_int4_weight", "group_size=32",
                                          "quantize_lm_head=false", "device=cpu", "dtype=fp32"]))
    converted = load_quantized(output_dir)
    fake = load_model(folder, device="cpu", dtype=torch.float32)
    apply_qat(fake, QATSettings("8da4w", group_size=32))
    with torch.no_grad():
        want, got = fake(probe), converted(probe)
        set_fake_quant(fake, False)
        return got, want, fake(probe)


def test_qat_lora_resumes_across_the_switch_and_quantize_matches_the_fake_quant_model(tmp_path):
    from torchft._recipes import lora_finetune_single_device as recipe

    base = make_base(tmp_path)
    recipe.main(_qat_config(tmp_path / "full", base))
    out = tmp_path / "full" / "out"
    expected = train_losses(out)
    plain = tiny_config("lora", tmp_path / "plain", base, ["max_steps=4"])
    recipe.main(plain)
    plain_losses = train_losses(tmp_path / "plain" / "out")
    assert [plain_losses[s] for s in (1, 2)] == [expected[s] for s in (1, 2)]  # off until step 2
    assert plain_losses[3] != expected[3]  # on from step 3
    for resume_step in (1, 3):  # before and after the switch
        run = tmp_path / f"resumed_{resume_step}"
        recipe.main(_qat_config(run, base, [f"resume_from_checkpoint={out / f'step_{resume_step}'}"]))
        got = train_losses(run / "out")
        assert got == {s: expected[s] for s in range(resume_step + 1, 5)}

    # the step folder is a plain HF folder; `tune run quantize` with the same scheme converts it
    got, want, unquantized = converted_fake_and_plain_logits(out / "step_4", tmp_path / "q")
    err = (got - want).abs().max().item()
    assert err < 1e-5, err  # fp32 on CPU: measured 0.0 (the same int8/int4 rounding); the docs state this bound
    assert (unquantized - want).abs().max().item() > 10 * err  # the match is the quantization's, not chance


def test_full_finetune_with_a_qat_section_trains_through_fake_quant_and_saves_plain_hf_weights(tmp_path):
    from omegaconf import OmegaConf
    from safetensors.torch import load_file

    from torchft._recipes import full_finetune_single_device as recipe

    base = make_base(tmp_path)
    short = ["max_steps=2", "save_every_n_steps=2", "eval_every_n_steps=100"]
    recipe.main(tiny_config("full", tmp_path / "qat", base, short + ["+qat.scheme=8da4w", "+qat.group_size=32"]))
    recipe.main(tiny_config("full", tmp_path / "plain", base, short))
    qat_out, plain_out = tmp_path / "qat" / "out", tmp_path / "plain" / "out"
    assert train_losses(qat_out)[1] != train_losses(plain_out)[1]  # step 1 already computes through fake quant
    names = lambda folder: {k for f in folder.glob("*.safetensors") for k in load_file(f)}  # noqa: E731
    assert names(qat_out / "step_2") == names(plain_out / "step_2") == names(base)
    assert OmegaConf.load(qat_out / "torchft_config.yaml").qat.scheme == "8da4w"  # the resolved config records it


@pytest.mark.parametrize("recipe", ["full_finetune_single_device", "lora_finetune_single_device",
                                    "full_finetune_distributed", "lora_finetune_distributed"])
def test_every_fine_tuning_recipe_accepts_a_qat_section(recipe, tmp_path):
    from torchft import registry
    from torchft.config import load_config, validate

    config = next(c for c in registry.get_recipe(recipe).configs if c.name.startswith("quickstart/"))
    # output_dir in tmp_path: a quickstart run on this machine must not make the check fail
    cfg = load_config(config.name, ["+qat.scheme=8da4w", f"output_dir={tmp_path / 'out'}"])
    assert validate(cfg, accepted_keys=registry.accepted_keys(registry.get_recipe(recipe))) == []
    without = registry.accepted_keys(registry.get_recipe("generate"))  # a recipe that does not read it
    assert "qat" not in without


@pytest.mark.gpu
def test_4w_converted_on_cuda_follows_the_fake_quant_model(tmp_path):
    """4w converts only on CUDA (int4_weight_only, bf16): the converted logits sit much nearer the
    fake-quantized model's than the unquantized model's (the kernels round bf16 sums differently, so
    not equal)."""
    from torchft._recipes.quantize import main as quantize
    from torchft.config import load_config
    from torchft.generation import load_model
    from torchft.generation._quantize import load_quantized

    base = make_base(tmp_path)
    quantize(load_config("quantization", [f"checkpoint_dir={base}", f"output_dir={tmp_path / 'q'}",
                                          "scheme=int4_weight_only", "group_size=32", "quantize_lm_head=false",
                                          "device=cuda", "dtype=bf16"]))
    converted = load_quantized(tmp_path / "q", device="cuda")
    fake = load_model(base, device="cuda", dtype=torch.bfloat16)
    apply_qat(fake, QATSettings("4w", group_size=32))
    probe = torch.tensor([[1, 5, 9, 22, 40, 7, 7, 3, 100, 512]], device="cuda")
    with torch.no_grad():
        want, got = fake(probe).float(), converted(probe).float()
        set_fake_quant(fake, False)
        unquantized = fake(probe).float()
    assert (got - want).abs().max() < 0.25 * (unquantized - want).abs().max()
