"""Full-weight preference tuning (DPO, IPO or SimPO) of a Llama model on many devices (FSDP2), torchrun.

    tune run --nproc_per_node 8 full_dpo_distributed --config llama3_1/8B_full_dpo
    tune run --nproc_per_node 2 full_dpo_distributed --config quickstart/full_dpo_distributed   (CPU, gloo)

``lora_dpo_distributed`` with a plain model builder (that file reads top to bottom): every weight trains,
the reference is a frozen copy of the input model sharded like the policy (its weights count once more
per rank; ``tune estimate`` includes them; SimPO builds none), and saves hold the whole model in
``step_<N>/`` plus ``distributed/`` (DCP: weights + optimizer). The loss, metrics and global batch sizes
are those of every preference recipe; the optimizer the full SFT recipes' (bf16 weights with stochastic
rounding). The reference stays the input model on a resumed run.
"""
from omegaconf import DictConfig

from torchft._recipes import lora_dpo_distributed
from torchft.config import recipe_main


def main(cfg: DictConfig) -> None:
    # defined here, so the command line checks the config's keys against this recipe's configs
    lora_dpo_distributed.main(cfg, recipe="full_dpo_distributed")


if __name__ == "__main__":
    recipe_main(main)
