"""Knowledge distillation into a LoRA student on one device, from a frozen teacher.

    tune run knowledge_distillation_single_device --config llama3_2/1B_lora_kd_single_device
    tune run knowledge_distillation_single_device --config quickstart/kd_single_device

The loss is ``(1 - kd_ratio) * CE + kd_ratio * KL(teacher || student)`` over target tokens, chunked
(torchft.modules.distillation.ChunkedDistillationLoss). The teacher (``teacher_model`` /
``teacher_checkpointer``: any checkpoint sharing the student's tokenizer; a ``qlora_*`` builder keeps
it in NF4) runs in eval mode without gradients. Everything else is lora_finetune_single_device, which this
recipe runs: its setup, loop, resume and step folders (see that file, read top to bottom).
"""
from omegaconf import DictConfig

from torchft._recipes import lora_finetune_single_device
from torchft.config import recipe_main


def main(cfg: DictConfig) -> None:
    # defined here, so the command line checks the config's keys against this recipe's configs
    lora_finetune_single_device.main(cfg)


if __name__ == "__main__":
    recipe_main(main)
