"""ExecuTorch export: the .pte's logits equal eager torchft's on prefill and decode, and ExecuTorch's own LLM
runner generates torchft's greedy text. Runs where the `executorch` extra is installed."""
import pytest
import torch

from tests.checkpoint.test_gguf import step_folder
from tests.data.conftest import llama3_ranks_path  # noqa: F401 (fixture)

pytest.importorskip("executorch")
from executorch.runtime import Runtime  # noqa: E402

from torchft.cli import main as cli_main  # noqa: E402
from torchft.generation._executorch import prepare_model  # noqa: E402

# Largest |logit difference| allowed, relative to the largest |logit|: fp32 is the same math in another
# order; XNNPACK's 8da4w kernels round the int8 activations as torchao's reference does, within 2%.
BOUNDS = {"fp32": 1e-5, "8da4w": 2e-2}


@pytest.fixture(scope="module")
def folder(tmp_path_factory, llama3_ranks_path):  # noqa: F811
    """A step-like folder of a random tiny Llama whose output never prefers a stop token or a token that is
    not whole UTF-8 text: the runner hands each generated piece to Python as a str, which a lone byte
    cannot be, and it does not stop at a stop token that comes straight out of the prefill."""
    folder, model, tokenizer = step_folder(tmp_path_factory.mktemp("pte"), "llama3", llama3_ranks_path)
    avoid = [i for i in range(tokenizer.vocab_size) if "\ufffd" in tokenizer.decode([i])] + tokenizer.stop_tokens
    with torch.no_grad():
        model.lm_head.weight[avoid] = 0.0  # logit 0, below the largest of the others
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("dtype", ["fp32", "8da4w"])
def test_pte_equals_eager_on_prefill_and_8_decode_steps(folder, tmp_path, capsys, dtype):
    out = tmp_path / "model.pte"
    assert cli_main.main(["export", "--checkpoint_dir", str(folder), "--format", "executorch", "--dtype", dtype,
                          "--max_seq_len", "64", "--output", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {out} (")
    program = Runtime.get().load_program(str(out))
    method = program.load_method("forward")
    assert program.load_method("get_max_seq_len").execute([])[0] == 64
    eager = prepare_model(folder, dtype, 64)  # the same (quantized) weights, run by torch
    prompt = torch.randint(0, 96, (1, 7), generator=torch.Generator().manual_seed(0))
    for restart in range(2):  # the runner restarts at position 0 without a reset: so does this loop
        tokens, pos = prompt, 0
        for _ in range(9):  # the prefill, then 8 decode steps of one token
            with torch.no_grad():
                expected = eager(tokens, torch.tensor([pos]))
            got = method.execute([tokens, torch.tensor([pos])])[0]
            assert got.shape == expected.shape == (1, eager.model.args.vocab_size)
            assert (got - expected).abs().max() <= BOUNDS[dtype] * expected.abs().max(), (restart, pos)
            pos += tokens.shape[1]
            tokens = expected.argmax(-1, keepdim=True)  # [1, 1]
        eager.model.reset_caches()


def test_executorch_llm_runner_generates_torchft_greedy_text(folder, tmp_path):
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    from torchft.data.tokenizers import model_tokenizer
    from torchft.generation import generate, load_model

    out = tmp_path / "model.pte"
    assert cli_main.main(["export", "--checkpoint_dir", str(folder), "--format", "executorch",
                          "--max_seq_len", "64", "--output", str(out)]) == 0
    ours = model_tokenizer(str(folder))
    prompt = "Hello world, the cat"
    runner = TextLLMRunner(str(out), str(folder / "tokenizer.json"))
    pieces = []
    stats = []
    runner.generate(prompt, GenerationConfig(echo=False, max_new_tokens=12, temperature=0.0, num_bos=1),
                    token_callback=pieces.append, stats_callback=stats.append)
    expected = generate(load_model(folder, dtype=torch.float32), ours.encode(prompt, add_eos=False),
                        max_new_tokens=12, temperature=0.0, stop_tokens=[])
    assert stats[0].num_prompt_tokens == len(ours.encode(prompt, add_eos=False))  # BOS + the text's ids
    assert not set(expected) & set(ours.stop_tokens)  # else the runner would stop where generate did not
    assert "".join(pieces) == ours.decode(expected, skip_special_tokens=False)


def test_unknown_dtype_is_one_line_and_writes_nothing(folder, tmp_path, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli_main.main(["export", "--checkpoint_dir", str(folder), "--format", "executorch", "--dtype", "q8_0",
                       "--output", str(tmp_path / "m.pte")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code != 0 and len(err) == 1 and "dtype 'q8_0' is not one of fp32, 8da4w" in err[0]
    assert list(tmp_path.iterdir()) == []
