"""Knowledge distillation into a LoRA student on many devices (FSDP2, torchrun), from a frozen teacher.

    tune run --nproc_per_node 8 knowledge_distillation_distributed --config llama3_2/1B_lora_kd_distributed
    tune run --nproc_per_node 2 knowledge_distillation_distributed --config quickstart/kd_distributed

The loss is ``(1 - kd_ratio) * CE + kd_ratio * KL(teacher || student)`` over target tokens, chunked
(torchft.modules.distillation.ChunkedDistillationLoss). The teacher (``teacher_model`` /
``teacher_checkpointer``: any checkpoint sharing the student's tokenizer; a ``qlora_*`` builder keeps
it in NF4) runs in eval mode without gradients. Everything else is lora_finetune_distributed, which this
recipe runs: its setup, loop, resume and step folders (see that file, read top to bottom).
"""
from omegaconf import DictConfig

from torchft._recipes import lora_finetune_distributed
from torchft.config import recipe_main


def main(cfg: DictConfig) -> None:
    # defined here, so the command line checks the config's keys against this recipe's configs
    lora_finetune_distributed.main(cfg)


if __name__ == "__main__":
    recipe_main(main)
