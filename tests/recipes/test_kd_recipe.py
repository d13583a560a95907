"""End-to-end runs of recipes/knowledge_distillation_single_device.py on tiny models (CPU)."""
import importlib.util
from pathlib import Path

import pytest
import torch

from torchft.config import load_config
from torchft.training.quickstart import tiny_base_model

from ._finetune import (TINY, assert_resume_from_step_2_of_4_is_exact, make_base, make_data, read_metrics,
                        restore_torch_threads, train_losses)

_threads = pytest.fixture(autouse=True)(restore_torch_threads)
ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = str(ROOT / "recipes" / "configs" / "quickstart" / "kd_single_device.yaml")
# the student: smaller than the teacher (TINY), same tokenizer
STUDENT = dict(num_layers=1, embed_dim=32, num_heads=2, num_kv_heads=1, intermediate_dim=64, max_seq_len=256)


def _recipe():
    path = ROOT / "recipes" / "knowledge_distillation_single_device.py"
    spec = importlib.util.spec_from_file_location("knowledge_distillation_single_device", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("kd_models")
    teacher = tiny_base_model(str(root / "teacher"), seed=0, pretrain_steps=30, **TINY)
    student = make_base(root / "student_root", STUDENT)
    return teacher, student, make_data(root, train_rows=64)


FULL_STUDENT = str(ROOT / "recipes" / "configs" / "quickstart" / "kd_full_single_device.yaml")


def kd_config(out: Path, models, overrides=(), config: str = QUICKSTART):
    teacher, student, (train, val) = models
    return load_config(config, [
        "~base_model", "~teacher_base_model", f"output_dir={out}",
        f"checkpointer.checkpoint_dir={student}", f"teacher_checkpointer.checkpoint_dir={teacher}",
        "dataset.source=json", f"dataset.data_files={train}",
        "validation_dataset.source=json", f"validation_dataset.data_files={val}",
        "batch_size=4", "progress_bar=false", "sample_prompts=null", "optimizer.lr=1e-2",
        "lr_scheduler.num_warmup_steps=0", "save_every_n_steps=100", "loss.num_chunks=3", *overrides])


def test_kd_loss_on_the_teachers_outputs_falls_and_step_folders_are_drop_in(tmp_path, models):
    # kd_ratio=1: the logged loss is the KL of the student from the teacher alone
    _recipe().main(kd_config(tmp_path / "out", models, ["max_steps=12", "eval_every_n_steps=12",
                                                        "loss.kd_ratio=1.0", "save_every_n_steps=12"]))
    losses = train_losses(tmp_path / "out")
    first, last = sum(losses[s] for s in (1, 2)) / 2, sum(losses[s] for s in (11, 12)) / 2
    assert last < 0.8 * first, losses
    val = {m["step"]: m["val_loss"] for m in read_metrics(tmp_path / "out") if "val_loss" in m}
    assert set(val) == {0, 12}  # the student's cross-entropy on held-out rows
    step = tmp_path / "out" / "step_12"
    assert {"model.safetensors", "config.json", "training_state.pt"} <= {p.name for p in step.iterdir()}
    assert {p.name for p in (step / "adapter").iterdir()} == {"adapter_model.safetensors", "adapter_config.json"}


def test_kd_resume_reproduces_the_uninterrupted_run_and_a_used_output_dir_is_refused(tmp_path, models):
    recipe = _recipe()
    common = ["max_steps=4", "save_every_n_steps=2", "validation_dataset=null"]
    recipe.main(kd_config(tmp_path / "full", models, common))
    recipe.main(kd_config(tmp_path / "resumed", models,
                          [*common, f"resume_from_checkpoint={tmp_path / 'full' / 'step_2'}"]))
    assert_resume_from_step_2_of_4_is_exact(tmp_path / "full", tmp_path / "resumed")
    with pytest.raises(Exception, match="already holds step_2, step_4 from an earlier run"):
        recipe.main(kd_config(tmp_path / "full", models, ["max_steps=4"]))


def test_a_teacher_with_another_vocabulary_is_refused(tmp_path, models):
    other = tiny_base_model(str(tmp_path / "teacher_2048"), seed=0, vocab_size=2048, **STUDENT)
    with pytest.raises(ValueError, match=r"teacher vocab_size \(2048\) must equal the student's \(1024\)"):
        _recipe().main(kd_config(tmp_path / "out", models, [f"teacher_checkpointer.checkpoint_dir={other}"]))
    assert not (tmp_path / "out").exists()  # refused before writing anything


def test_an_nf4_teacher_distils_and_stays_quantized(tmp_path, models, monkeypatch):
    from torchft.modules.peft._nf4 import is_nf4
    from torchft.training import distillation

    from ._finetune import TINY_NF4

    teacher = tiny_base_model(str(tmp_path / "teacher_nf4"), seed=0, **TINY_NF4)
    built = []
    monkeypatch.setattr(distillation.TeacherDistillation, "__init__", _recording(built))
    _recipe().main(kd_config(tmp_path / "out", models, [
        f"teacher_checkpointer.checkpoint_dir={teacher}", "+teacher_model.quantize_base=true",
        "+teacher_model.lora_attn_modules=[]", "max_steps=2", "validation_dataset=null"]))
    assert is_nf4(built[0].layers[0].self_attn.q_proj.weight)
    assert all(not p.requires_grad for p in built[0].parameters()) and not built[0].training
    assert len(train_losses(tmp_path / "out")) == 2


def _recording(built):
    from torchft.training.distillation import TeacherDistillation

    init = TeacherDistillation.__init__

    def record(self, teacher, kd_loss):
        init(self, teacher, kd_loss)
        built.append(teacher)
    return record


def test_a_full_student_distils_every_weight_and_kd_ratio_0_is_plain_full_fine_tuning(tmp_path, models):
    """A plain student builder runs full_finetune_single_device underneath: the KL on the teacher's outputs
    falls, every weight moves, the step folder has no adapter, a resume from step 4 continues exactly; with
    kd_ratio=0 the losses are full SFT's."""
    from torchft._recipes import full_finetune_single_device

    from torchft.checkpoint import load_hf_checkpoint

    recipe, student = _recipe(), models[1]
    kd = ["max_steps=8", "loss.kd_ratio=1.0", "optimizer.lr=3e-3", "save_every_n_steps=4", "validation_dataset=null"]
    recipe.main(kd_config(tmp_path / "kd", models, kd, FULL_STUDENT))
    recipe.main(kd_config(tmp_path / "resumed", models, [*kd, f"resume_from_checkpoint={tmp_path / 'kd' / 'step_4'}"],
                          FULL_STUDENT))
    losses, resumed = train_losses(tmp_path / "kd"), train_losses(tmp_path / "resumed")
    assert resumed == {s: losses[s] for s in (5, 6, 7, 8)}  # a resumed full student continues exactly
    assert (losses[7] + losses[8]) / 2 < 0.8 * (losses[1] + losses[2]) / 2, losses
    trained, initial = load_hf_checkpoint(tmp_path / "kd" / "step_8"), load_hf_checkpoint(student)
    assert not (tmp_path / "kd" / "step_8" / "adapter").exists() and sorted(trained) == sorted(initial)
    assert all(not torch.equal(trained[k], initial[k]) for k in trained if "norm" not in k)  # every weight trained
    assert all(torch.equal(trained[k], v) for k, v in load_hf_checkpoint(tmp_path / "resumed" / "step_8").items())

    common = ["max_steps=3", "loss.kd_ratio=0.0", "validation_dataset=null"]
    recipe.main(kd_config(tmp_path / "kd0", models, common, FULL_STUDENT))
    full_finetune_single_device.main(kd_config(tmp_path / "sft", models, [
        *common, "~teacher_model", "~teacher_checkpointer", "~loss.kd_ratio", "~loss.temperature",
        "loss._component_=torchft.modules.loss.ChunkedCrossEntropy"], FULL_STUDENT))
    kd0, sft = train_losses(tmp_path / "kd0"), train_losses(tmp_path / "sft")
    assert list(kd0) == [1, 2, 3] and all(kd0[s] == pytest.approx(sft[s], abs=1e-6) for s in kd0), (kd0, sft)


def test_a_non_finite_kd_loss_stops_the_run_at_the_last_good_checkpoint(tmp_path, models, monkeypatch):
    """As in the SFT recipes: step 3's loss is nan (the teacher's weights turned nan), the run stops naming
    step_2 as the last good checkpoint, and writes no later folder; step_2's weights are finite."""
    from torchft.checkpoint import load_hf_checkpoint
    from torchft.training import distillation
    from torchft.training.steps import NonFiniteLossError

    real_call, calls = distillation.TeacherDistillation.__call__, []

    def poisoned(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # the third micro-batch, step 3: the teacher blows up
            with torch.no_grad():
                next(self.teacher.parameters()).fill_(float("nan"))
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(distillation.TeacherDistillation, "__call__", poisoned)
    stop = r"loss is nan at step 3: training stopped .* last good checkpoint is .*step_2"
    with pytest.raises(NonFiniteLossError, match=stop):
        _recipe().main(kd_config(tmp_path / "out", models, ["max_steps=5", "save_every_n_steps=2",
                                                            "validation_dataset=null"], FULL_STUDENT))
    assert sorted(p.name for p in (tmp_path / "out").glob("step_*")) == ["step_2"]
    assert all(torch.isfinite(w).all() for w in load_hf_checkpoint(tmp_path / "out" / "step_2").values())
