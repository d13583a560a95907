"""The setup every recipe shares, driven with another loss than the SFT one (as a DPO or KD recipe would)."""
import inspect

import pytest
import torch

from torchft.training.loop import TrainingLoop
from torchft.training.metric_logging import MetricLogger
from torchft.training.steps import StepResult, accumulate_gradients, update_weights
from torchft.training.wiring import (LOOP_KEYS, build_loaders, build_model, make_loop, start_run, train,
                                     trainable_params)
from tests.recipes._finetune import make_base, make_data


def test_loop_keys_are_the_loops_keyword_arguments():
    assert set(LOOP_KEYS) <= set(inspect.signature(TrainingLoop).parameters)


def test_micro_batches_accumulate_as_one_batch_for_any_summed_loss():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(3))
    batches = [{"tokens": torch.randn(2, 3)} for _ in range(4)]
    loss = lambda batch: (batch["tokens"] @ weight).square().sum()  # a loss summed over its samples
    total = accumulate_gradients(batches, loss, 8)
    accumulated = weight.grad.clone()
    weight.grad = None
    whole = {"tokens": torch.cat([b["tokens"] for b in batches])}
    seen = []
    assert torch.allclose(accumulate_gradients([whole], loss, 8, before_batch=seen.append), total)
    torch.testing.assert_close(weight.grad, accumulated)
    assert seen == [0]


def test_a_recipe_with_its_own_loss_reuses_the_setup_and_the_loop(tmp_path):
    from torchft.checkpoint import HFCheckpointer
    from torchft.data._assets import quickstart_tokenizer
    from torchft.training.quickstart import quickstart_dataset
    from torchft.models import from_hf_config

    base = make_base(tmp_path)
    train_file, _ = make_data(tmp_path, train_rows=8)
    run = start_run(tmp_path / "out", None, "cpu", "fp32", seed=0)
    checkpointer = HFCheckpointer(base, tmp_path / "out")
    student = build_model(lambda: from_hf_config(base, lora_attn_modules=["q_proj"], lora_rank=4, lora_alpha=8),
                          checkpointer, run, trainable="adapters")
    teacher = build_model(lambda: from_hf_config(base), checkpointer, run, trainable="none")
    assert not trainable_params(teacher) and all("lora" in n for n, p in student.named_parameters() if p.requires_grad)
    tokenizer = quickstart_tokenizer()
    loader, val_loader = build_loaders(quickstart_dataset(tokenizer, source="json", data_files=str(train_file)), None, 2,
                                       run, seed=0, pad_id=tokenizer.pad_id)
    assert val_loader is None
    optimizer = torch.optim.SGD(trainable_params(student), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

    def distill(batch):  # [] summed squared distance of the student's logits to (a shuffle of) the teacher's
        with torch.no_grad():
            target = teacher(batch["tokens"]).roll(1, dims=-1)  # unshuffled, fresh adapters would be exact
        return (student(batch["tokens"]) - target).square().sum()

    def train_step(micro_batches, step):
        count = sum(b["tokens"].numel() for b in micro_batches)
        loss = accumulate_gradients(micro_batches, distill, count) / count
        grad_norm, found_inf = update_weights(optimizer, scheduler, loss)
        return StepResult(loss, count, grad_norm, found_inf)

    saves, logger = [], MetricLogger()
    loop = make_loop(run, 3, lambda step: saves.append(step) or f"step_{step}", logger, start_step=0,
                     gradient_accumulation_steps=2, save_every_n_steps=2, progress_bar=False)
    train(loop, student, loader, train_step, optimizer, logger)
    assert saves == [2, 3] and loop.step == 3
    assert any(float(p.detach().abs().sum()) > 0 for n, p in student.named_parameters() if "lora_b" in n)  # it learned


def test_a_model_of_another_architecture_is_refused(tmp_path):
    from torchft.checkpoint import HFCheckpointer
    from torchft.models import from_hf_config

    base = make_base(tmp_path)
    run = start_run(tmp_path / "out", None, "cpu", "fp32", seed=0)
    config = {**__import__("json").loads((base / "config.json").read_text()), "num_hidden_layers": 1}
    with pytest.raises(ValueError, match=r"holds another architecture than the config's model"):
        build_model(lambda: from_hf_config(config), HFCheckpointer(base, tmp_path / "out"), run, trainable="all")


def test_training_reaches_only_the_public_names_of_torchft_checkpoint():
    """What torchft.training shares with torchft.checkpoint is public there (no private module or helper)."""
    import re
    from pathlib import Path

    import torchft.training

    private = re.compile(r"from torchft\.checkpoint(\.\w+)* import _|torchft\.checkpoint\._|checkpointer\._")
    uses = [f"{path.name}:{n}" for path in Path(torchft.training.__file__).parent.glob("*.py")
            for n, line in enumerate(path.read_text().splitlines(), 1) if private.search(line)]
    assert uses == []


def test_the_model_node_says_whether_adapters_train():
    """What the DPO and KD recipes read to train adapters or every weight: the builder, or LoRA targets."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from torchft.training.wiring import builds_adapters

    assert builds_adapters({"_component_": "torchft.models.llama3_2.lora_llama3_2_1b"})
    assert builds_adapters({"_component_": "torchft.models.llama3_2.qlora_llama3_2_1b", "lora_attn_modules": []})
    assert not builds_adapters({"_component_": "torchft.models.llama3_2.llama3_2_1b"})
    hf = {"_component_": "torchft.models.from_hf_config", "path_or_dict": "/x"}
    assert not builds_adapters(hf) and not builds_adapters({**hf, "lora_attn_modules": []})
    assert builds_adapters({**hf, "lora_attn_modules": ["q_proj"]}) and builds_adapters({**hf, "apply_lora_to_mlp": True})
    configs = Path(__file__).resolve().parents[2] / "recipes" / "configs"
    for path in configs.glob("*/*dpo*.yaml"):  # every shipped DPO config trains what its name says
        assert builds_adapters(OmegaConf.load(path).model) == ("lora_dpo" in path.name), path
