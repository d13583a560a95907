"""The GPU benchmark suite runs end to end in its CPU toy mode and writes its table into the results file."""
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# HF+PEFT and torchtune rows come from the shared peer harness (shared/bench beside the checkout)
HARNESS_FOUND = (REPO / "benchmarks" / "peer_harness.py").is_file() and any(
    (d / "shared" / "bench" / "bench_peers.py").is_file() for d in (REPO, REPO.parent, REPO.parent.parent))
PEER_ROWS = {("lora_1b", "hf_peft_lora"), ("full_1b", "hf_full")}


def test_suite_tiny_runs_and_writes_its_table(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\nearlier sections stay\n")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_finetune.py"), "--suite", "--tiny",
                           "--results", str(results)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = results.read_text()
    assert "earlier sections stay" in text and "<!-- suite-cpu-tiny:begin -->" in text
    assert "torch " in text and "commit " in text
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 6 and re.fullmatch(r"[\d,.]+", cells[2]):
            rows[(cells[0], cells[1])] = float(cells[2].replace(",", ""))
    expected = [("lora_1b", "torchft, eager"), ("lora_1b", "hf_peft_lora"), ("qlora_8b", "torchft, eager"),
                ("qlora_8b", "torchft, eager + AC"), ("full_1b", "torchft, eager"), ("full_1b", "hf_full"),
                ("decode_tiny", "torchft generate (eager)"),
                ("decode_tiny", "transformers generate (dynamic cache)")]
    for key in expected:
        if key in PEER_ROWS and not HARNESS_FOUND and "PEER_HARNESS_DIR" not in os.environ:
            assert key[1] in text, (key, text)  # listed, with the reason it was not measured
            continue
        assert rows.get(key, 0) > 0, (key, text)
    # torchtune is measured where it is installed, and otherwise says why not
    assert "tt_lora_best" in text
