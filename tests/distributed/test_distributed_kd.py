"""recipes/knowledge_distillation_distributed.py on 2 CPU processes (gloo) against the single-device recipe."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.recipes._finetune import TINY, make_data, restore_torch_threads, train_losses, val_losses
from tests.recipes.test_kd_recipe import STUDENT, kd_config
from torchft.training.quickstart import tiny_base_model

from ._launch import launch

_threads = pytest.fixture(autouse=True)(restore_torch_threads)


def test_kd_on_2_ranks_matches_one_device_with_the_global_batch(tmp_path):
    """One launch: 4 steps of 2 x 2 samples (global), both models sharded; the single-device run with the same batch."""
    from torchft._recipes import knowledge_distillation_single_device

    teacher = tiny_base_model(str(tmp_path / "teacher"), seed=0, **TINY)
    student = tiny_base_model(str(tmp_path / "student"), seed=1, **STUDENT)
    train, val = make_data(tmp_path, val_rows=7)  # 7 rows: 2 ranks cannot split them evenly
    common = [f"checkpointer.checkpoint_dir={student}", f"teacher_checkpointer.checkpoint_dir={teacher}",
              f"dataset.data_files={train}", f"validation_dataset.data_files={val}", "batch_size=4",
              "gradient_accumulation_steps=2", "max_steps=4", "eval_every_n_steps=2", "save_every_n_steps=4",
              "progress_bar=false", "optimizer.lr=1e-2", "lr_scheduler.num_warmup_steps=0", "loss.num_chunks=3"]
    result = launch("knowledge_distillation_distributed", "quickstart/kd_distributed",
                    ["~base_model", "~teacher_base_model", f"output_dir={tmp_path / 'dist'}", *common])
    assert result.returncode == 0, result.stderr[-3000:]
    knowledge_distillation_single_device.main(kd_config(tmp_path / "single", (teacher, student, (train, val)),
                                                        [f"output_dir={tmp_path / 'single'}", *common]))
    dist, single = tmp_path / "dist", tmp_path / "single"
    losses, reference = train_losses(dist), train_losses(single)
    assert list(losses) == [1, 2, 3, 4]
    for step in losses:
        assert abs(losses[step] - reference[step]) < 1e-5, (step, losses[step], reference[step])
    assert list(val_losses(dist)) == [0, 2, 4]
    for step, value in val_losses(single).items():
        assert abs(val_losses(dist)[step] - value) < 1e-5
    adapters = [load_file(run / "step_4" / "adapter" / "adapter_model.safetensors") for run in (dist, single)]
    assert sorted(adapters[0]) == sorted(adapters[1])
    assert max(float((adapters[0][k] - adapters[1][k]).abs().max()) for k in adapters[0]) < 1e-3


def test_a_full_student_on_2_ranks_matches_one_device(tmp_path):
    """A plain student builder: full_finetune_distributed with the sharded teacher, as one device trains it."""
    from torchft._recipes import knowledge_distillation_single_device

    teacher = tiny_base_model(str(tmp_path / "teacher"), seed=0, **TINY)
    student = tiny_base_model(str(tmp_path / "student"), seed=1, **STUDENT)
    train, val = make_data(tmp_path)
    plain = [f"~model.{key}" for key in ("lora_attn_modules", "apply_lora_to_mlp", "apply_lora_to_output", "lora_rank",
                                         "lora_alpha", "lora_dropout", "use_dora")]
    common = [f"checkpointer.checkpoint_dir={student}", f"teacher_checkpointer.checkpoint_dir={teacher}",
              f"dataset.data_files={train}", "validation_dataset=null", "batch_size=4", "max_steps=2",
              "save_every_n_steps=2", "progress_bar=false", "optimizer.lr=3e-3", "lr_scheduler.num_warmup_steps=0",
              "loss.num_chunks=3", *plain]
    result = launch("knowledge_distillation_distributed", "quickstart/kd_distributed",
                    ["~base_model", "~teacher_base_model", f"output_dir={tmp_path / 'dist'}", *common])
    assert result.returncode == 0, result.stderr[-3000:]
    knowledge_distillation_single_device.main(kd_config(tmp_path / "single", (teacher, student, (train, val)),
                                                        [f"output_dir={tmp_path / 'single'}", *common]))
    losses, reference = train_losses(tmp_path / "dist"), train_losses(tmp_path / "single")
    assert list(losses) == [1, 2] and all(abs(losses[s] - reference[s]) < 1e-5 for s in losses), (losses, reference)
    weights = [load_file(tmp_path / run / "step_2" / "model.safetensors") for run in ("dist", "single")]
    assert not (tmp_path / "dist" / "step_2" / "adapter").exists() and sorted(weights[0]) == sorted(weights[1])
    assert max(float((weights[0][k] - weights[1][k]).abs().max()) for k in weights[0]) < 1e-4
    initial = load_file(Path(student) / "model.safetensors")
    key = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(weights[0][key], initial[key])  # the student's own weights trained
