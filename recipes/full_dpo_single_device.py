"""Full-weight preference tuning (DPO, IPO or SimPO) of a Llama model on one device.

    tune run full_dpo_single_device --config quickstart/full_dpo_single_device

This is ``lora_dpo_single_device`` with a plain model builder (see that file, read top to bottom): every
weight trains, and the reference is a frozen copy of the input model loaded once beside the policy (its
weights count twice, and ``tune estimate`` includes them; SimPO needs no reference and loads none). The
reference stays the input model on a resumed run. Saves are those of ``full_finetune_single_device``.
"""
from omegaconf import DictConfig

from torchft._recipes import lora_dpo_single_device
from torchft.config import recipe_main


def main(cfg: DictConfig) -> None:
    # defined here, so the command line checks the config's keys against this recipe's configs
    lora_dpo_single_device.main(cfg)


if __name__ == "__main__":
    recipe_main(main)
