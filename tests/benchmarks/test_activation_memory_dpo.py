"""benchmarks/activation_memory.py --dpo in its CPU-tiny mode: what DPO keeps beside SFT."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_dpo_keeps_what_sft_keeps_per_token_and_the_lora_reference_holds_no_weights():
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "activation_memory.py"), "--dpo", "--shape",
                          "tiny", "--tokens", "64"], capture_output=True, text=True, check=True).stdout
    row = json.loads(out.splitlines()[-1])
    assert row["shape"] == "tiny"
    # the reference forward runs without gradients: the DPO micro-batch keeps what the SFT forward keeps
    assert row["dpo_kib_per_token_per_layer"] == row["sft_kib_per_token_per_layer"] == pytest.approx(1.37, abs=0.01)
    # LoRA: the reference is the policy with adapters off; full DPO: a frozen copy doubles the weights
    assert row["lora_policy_and_reference_param_bytes"] == row["policy_param_bytes"] > 0
    assert row["full_policy_and_reference_param_bytes"] == 2 * row["policy_param_bytes"]
