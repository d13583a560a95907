"""`tune estimate`: the text report, the --json object, the fit advice, one-line errors and the figures
the docs quote."""
import json
import re
from pathlib import Path

import pytest

from torchft.cli import main as cli_main
from tests.training.test_estimate import TINY_CONFIG, one_thread  # noqa: F401  (an autouse fixture)


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_CONFIG)
    return str(path)


def test_json_has_peak_host_fits_and_breakdown(config, capsys):
    assert cli_main.main(["estimate", "--config", config, "batch_size=1", "--gpu-memory", "80GiB", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["fits"] is True and result["fits_with"] is None and result["gpu_gib"] == 80
    assert result["settings"]["batch_size"] == 1 and result["host_gib"] == 0
    assert 0 < result["peak_gib"] < result["needed_gib"]
    assert set(result["breakdown"]) >= {"weights", "adapters", "gradients", "optimizer_states", "saved_activations"}
    assert abs(sum(result["breakdown"].values()) - result["peak_gib"]) < 0.01


def test_text_report_names_the_settings_that_fit(config, capsys):
    with_ac = json.loads(_run_json(config, capsys, "enable_activation_checkpointing=true"))
    budget = f"{with_ac['needed_gib'] + 0.001}GiB"
    assert cli_main.main(["estimate", "--config", config, "--gpu-memory", budget]) == 1  # not as it is
    out = capsys.readouterr().out
    assert "peak GPU memory (allocated):" in out and "saved activations" in out
    assert "fits with: enable_activation_checkpointing=true (peak" in out


@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_a_config_that_does_not_fit_exits_1(config, capsys, json_flag):
    assert cli_main.main(["estimate", "--config", config, "--gpu-memory", "1MiB", *json_flag]) == 1
    assert cli_main.main(["estimate", "--config", config, "--gpu-memory", "80GiB", *json_flag]) == 0


def test_advice_and_memory_name_follow_the_config(config, capsys):
    # a 128-token CPU config: the report speaks of host memory and never of 512-token sequences
    cli_main.main(["estimate", "--config", config, "+device=cpu", "tokenizer.max_seq_len=128", "--gpu-memory", "1MiB"])
    out = capsys.readouterr().out
    assert "peak memory on the cpu (host memory) (allocated):" in out and "GPU memory" not in out
    assert out.rstrip().endswith("QLoRA and sequences of 128 tokens")


def _run_json(config, capsys, *overrides):
    assert cli_main.main(["estimate", "--config", config, *overrides, "--json"]) == 0
    return capsys.readouterr().out


def test_bad_memory_size_is_one_line_and_exit_1(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main.main(["estimate", "--config", config, "--gpu-memory", "24XB"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err == "tune: error: memory size '24XB' is not understood; write e.g. 24GiB, 80GB or 40000000000"


def test_distributed_estimate_is_per_rank_on_its_share_of_the_batch(config, capsys):
    one_sample = json.loads(_run_json(config, capsys, "batch_size=1"))
    per_rank = json.loads(_run_json(config, capsys, "batch_size=4", "--nproc-per-node", "4"))
    assert per_rank["settings"]["nproc_per_node"] == 4 and per_rank["settings"]["batch_size_per_rank"] == 1
    assert per_rank["breakdown"]["all_gather_buffers"] > 0
    assert per_rank["breakdown"]["saved_activations"] == one_sample["breakdown"]["saved_activations"]
    assert cli_main.main(["estimate", "--config", config, "batch_size=4", "+cpu_offload=true", "+fp32_reduce=true",
                          "--nproc-per-node", "4"]) == 0
    out = capsys.readouterr().out
    assert "batch 4 (1 per rank) x 1024 tokens" in out
    assert "per rank of 4 (cpu_offload on, fp32_reduce on)" in out
    assert "host (pinned CPU) memory for offloaded activations and the cpu_offload state:" in out


def test_batch_not_divisible_by_the_ranks_is_one_line(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main.main(["estimate", "--config", config, "--nproc-per-node", "4"])  # batch_size 2
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err == ("tune: error: batch_size (2) is the global batch and must be divisible by the world size (4); "
                   "nearest batch sizes that work: 4; world sizes that work: 1, 2")


def test_overhead_line_states_the_cublas_workspaces(config, capsys):
    assert cli_main.main(["estimate", "--config", config, "batch_size=1"]) == 0
    out = capsys.readouterr().out
    assert "  cuBLAS workspaces" + " " * 15 + "0.06 GiB" in out
    assert ("needed with allocator overhead (+5% fragmentation, +0.75 GiB CUDA context; the peak includes "
            "64 MiB of cuBLAS workspaces):") in out


@pytest.mark.parametrize("dtype,per_param", [("bf16", 4.0), ("fp32", 8.0)])
def test_optimizer_states_are_stated_per_trainable_parameter(config, capsys, dtype, per_param):
    # AdamW's two moments: bf16 (stochastically rounded) on bf16 weights, fp32 on fp32 weights. Wide
    # enough that the allocator's 512-byte rounding of each state is lost in the first decimal.
    assert cli_main.main(["estimate", "--config", config, "batch_size=1", f"dtype={dtype}", "model.embed_dim=512",
                          "model.intermediate_dim=1024", "tokenizer.max_seq_len=64"]) == 0
    out = capsys.readouterr().out
    stated = re.search(r"^  optimizer states +[\d.]+ GiB  \(([\d.]+) bytes per trainable parameter\)$", out, re.M)
    # the step counters (one 512-byte block each) add a little at this size
    assert stated and per_param <= float(stated.group(1)) <= per_param + 0.15, out


# docs/cli.md prints GiB to 2 decimals, the shipped-config table of docs/finetuning.md to 1: each figure
# must be a fresh estimate rounded, within half a unit of its last digit (plus 0.001 for float noise).
DOCS_TOLERANCE_GIB = 0.006
TABLE_TOLERANCE_GIB = 0.051
DOCS = Path(__file__).resolve().parents[2] / "docs"


def _quoted_runs(page: Path):
    """(config, overrides, {what: GiB}) for every `$ tune estimate` in the page's `tune estimate` example."""
    block = re.search(r"## Will it fit\? `tune estimate`\n+```text\n(.*?)```", page.read_text(), re.S).group(1)
    for command in re.split(r"^\$ ", block, flags=re.M)[1:]:
        line, *output = command.splitlines()
        words = line.split()[3:]  # after "tune estimate --config"
        config, overrides = words[0], [w for w in words[1:] if "=" in w]
        text = "\n".join(output)
        figures = {}
        if peak := re.search(r"^peak GPU memory \(allocated\): ([\d.]+) GiB", text, re.M):
            figures["peak"] = float(peak.group(1))
            figures["needed"] = float(re.search(r"^needed with allocator overhead.*: ([\d.]+) GiB", text, re.M).group(1))
            for label, kind in (("weights", "weights"), ("quantized base weights", "quantized_base")):
                if quoted := re.search(rf"^  {label} +([\d.]+) GiB", text, re.M):
                    figures[kind] = float(quoted.group(1))
            if quoted := re.search(r"^  optimizer states .*\(([\d.]+) bytes per trainable parameter\)", text, re.M):
                figures["optimizer_bytes_per_param"] = float(quoted.group(1))
        if fix := re.search(r"fits with: (.*) \(peak ([\d.]+) GiB, needed ([\d.]+) GiB\)", text):
            overrides += fix.group(1).split()
            figures.update(peak=float(fix.group(2)), needed=float(fix.group(3)))
        if figures:
            yield config, overrides, figures


def _table_row(config: str) -> dict[str, float]:
    """peak and needed of ``config``'s row in docs/finetuning.md's table of shipped configs."""
    row = re.search(rf"^\| `{re.escape(config)}` \| [^|]+ \| [^|]+ \| ([\d.]+) \| ([\d.]+) \|",
                    (DOCS / "finetuning.md").read_text(), re.M)
    return {"peak": float(row.group(1)), "needed": float(row.group(2))}


def test_docs_quote_what_estimate_gives():
    from torchft.training.estimate import GIB, estimate_memory

    runs = list(_quoted_runs(DOCS / "cli.md"))
    assert len(runs) == 2  # the QLoRA 8B report and the 1B LoRA advice
    for config, overrides, figures in runs:
        estimate = estimate_memory(config, overrides)
        actual = {"peak": estimate.peak_bytes, "needed": estimate.needed_bytes, **estimate.breakdown}
        if (per_param := figures.pop("optimizer_bytes_per_param", None)) is not None:  # printed to 1 decimal
            stated = estimate.breakdown["optimizer_states"] / estimate.settings["trainable_params"]
            assert abs(stated - per_param) <= 0.051, (config, stated, per_param)
        for what, quoted in figures.items():
            assert abs(actual[what] / GIB - quoted) <= DOCS_TOLERANCE_GIB, (config, overrides, what, quoted)
        if not overrides:  # the same config's row in the table of shipped configs
            for what, quoted in _table_row(config).items():
                assert abs(actual[what] / GIB - quoted) <= TABLE_TOLERANCE_GIB, (config, what, quoted)


def test_kd_estimate_counts_the_teachers_weights_sharded_over_the_ranks(capsys):
    """The 8B teacher in bf16: every parameter's bytes (rounded to 512-byte blocks), halved per rank of 2."""
    import torch

    from torchft.models.llama3_1 import llama3_1_8b

    with torch.device("meta"):
        teacher = llama3_1_8b()
    teacher_bytes = sum(-(-t.numel() * (2 if t.is_floating_point() else t.element_size()) // 512) * 512
                        for t in [*teacher.parameters(), *teacher.buffers()])
    assert cli_main.main(["estimate", "--config", "llama3_2/1B_lora_kd_distributed", "--nproc-per-node", "2",
                          "tokenizer.max_seq_len=64", "batch_size=2", "gradient_accumulation_steps=1", "--json"]) == 0
    breakdown = json.loads(capsys.readouterr().out)["breakdown"]
    assert breakdown["teacher_weights"] == round(-(-teacher_bytes // 2) / 2**30, 6)
