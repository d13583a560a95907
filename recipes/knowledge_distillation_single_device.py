"""Knowledge distillation on one device: a LoRA or fully fine-tuned student learns from a frozen teacher.

    tune run knowledge_distillation_single_device --config llama3_2/1B_lora_kd_single_device
    tune run knowledge_distillation_single_device --config quickstart/kd_single_device
    tune run knowledge_distillation_single_device --config quickstart/kd_full_single_device

The loss is ``(1 - kd_ratio) * CE + kd_ratio * KL(teacher || student)`` over target tokens, chunked
(torchft.modules.distillation.ChunkedDistillationLoss). The teacher (``teacher_model`` /
``teacher_checkpointer``: any checkpoint sharing the student's tokenizer; a ``qlora_*`` builder keeps
it in NF4) runs in eval mode without gradients. The student's builder picks the recipe this one runs, with
its setup, loop, resume and step folders (see those files, read top to bottom): a ``lora_*`` / ``qlora_*``
builder (or LoRA targets) lora_finetune_single_device, any other builder full_finetune_single_device.
"""
from omegaconf import DictConfig

from torchft._recipes import full_finetune_single_device, lora_finetune_single_device
from torchft.config import recipe_main
from torchft.training.wiring import builds_adapters


def main(cfg: DictConfig) -> None:
    # defined here, so the command line checks the config's keys against this recipe's configs
    student = lora_finetune_single_device if builds_adapters(cfg.model) else full_finetune_single_device
    student.main(cfg)


if __name__ == "__main__":
    recipe_main(main)
