"""Knowledge distillation on many devices (FSDP2, torchrun): a LoRA or full student, a frozen sharded teacher.

    tune run --nproc_per_node 8 knowledge_distillation_distributed --config llama3_2/1B_lora_kd_distributed
    tune run --nproc_per_node 2 knowledge_distillation_distributed --config quickstart/kd_distributed

As knowledge_distillation_single_device, sharded: both models are sharded per decoder layer and
``batch_size`` is global, so N ranks train as one device with the same global batch. The student's
builder picks what runs: lora_finetune_distributed for a ``lora_*`` / ``qlora_*`` builder (or LoRA
targets), full_finetune_distributed for any other (see those files, read top to bottom).
"""
from omegaconf import DictConfig

from torchft._recipes import full_finetune_distributed, lora_finetune_distributed
from torchft.config import recipe_main
from torchft.training.wiring import builds_adapters


def main(cfg: DictConfig) -> None:
    # defined here, so the command line checks the config's keys against this recipe's configs
    (lora_finetune_distributed if builds_adapters(cfg.model) else full_finetune_distributed).main(cfg)


if __name__ == "__main__":
    recipe_main(main)
