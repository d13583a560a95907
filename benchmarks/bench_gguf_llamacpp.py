"""llama.cpp against torchft on the GGUF files `tune export` writes: tokenization, greedy tokens, logits.

Two models with the quickstart tokenizer: ``random`` (the quickstart base's random init, no
pretraining: flat predictions, so near-ties are common) and ``quickstart`` (the quickstart base,
pretrained, then LoRA fine-tuned by the quickstart recipe; its merged step folder). Each is exported at
f16, bf16 and q8_0 and loaded by llama.cpp (llama-cpp-python). Three more random models, at f16, exercise
what the quickstart does not: Llama 3.1 rope scaling (``rope_freqs.weight``, with an original context of
64 positions so that the scaled frequencies turn within the prompts), tied embeddings (no
``output.weight``) and a Llama 2 sentencepiece tokenizer (``tokenizer.ggml.model = llama``). For every
prompt (plain text with unicode, whitespace runs and digits, and chat prompts through the GGUF's own chat
template and through llama.cpp's built-in one):

* ``ids``: llama.cpp's tokenization equals torchft's tokenizer (``Llama.tokenize``; chat prompts
  rendered by the template, control tokens parsed);
* ``greedy``: how many of N=32 greedy tokens llama.cpp (temperature 0: llama.cpp's greedy sampler, no
  repeat penalty) shares with ``torchft.generation.generate`` on the source weights (fp32), and where
  they first differ;
* ``logits``: the largest |logit difference| at the first step and over the 32 steps (torchft given
  llama.cpp's tokens), relative to the largest |logit|; it must stay within the export's stated
  tolerance (``LOGIT_TOLERANCE``: f16 0.2%, bf16 1%, q8_0 3%).

A divergence is explained when, at the first differing step, torchft's own margin between its token
and llama.cpp's is at most twice the tolerance (each of the two logits may move by it): a near-tie that
the dtype's rounding can flip; the table gives that margin. ``near-ties`` counts the steps whose top-2
margin is that small. Differences and margins are relative to the largest |logit| of the 32 steps.
The adapter path: the quickstart's LoRA as ``tune export --adapter-only`` applied by llama.cpp on the
base's f16 GGUF (``Llama(model_path=base, lora_path=adapter)``) must give the merged f16 GGUF's greedy
tokens. The exit status is 1 when a tokenization differs, a logit difference exceeds the tolerance, a
divergence is not explained or the adapter's tokens differ from the merged model's (and, with one line
saying how to install it, when llama-cpp-python is missing).

    CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install llama-cpp-python   # builds llama.cpp from source
    python benchmarks/bench_gguf_llamacpp.py          # CPU, tiny: a short pretraining and LoRA run
    python benchmarks/bench_gguf_llamacpp.py --full   # the quickstart as documented (a few minutes)
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from torchft.checkpoint.gguf import LOGIT_TOLERANCE
from torchft.cli.main import main as tune

NEW_TOKENS = 32
TEXTS = {
    "words": "apple river stone . apple",
    "sum": "3 + 4 =",
    "unicode": "héllo 日本 🦙 naïve café",
    "whitespace": "a   b\t\tc\n\n  d  ",
    "digits": "It's 12345 and 3.14!",
}
CHAT = [{"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Add the two numbers.\n\n3 + 4"}]
# Random models for the export's other paths (f16 only), as LlamaArgs overrides of the quickstart's shape.
VARIANTS = {
    "llama3.1 rope scaling": dict(rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                    high_freq_factor=4.0, original_max_position_embeddings=64)),
    "tied embeddings": dict(tie_word_embeddings=True),
    "llama2 sentencepiece": dict(rope_base=10000.0),  # with a sentencepiece tokenizer.model
}
# The quickstart (recipes/configs/quickstart/lora_single_device.yaml) at two lengths.
TINY = dict(pretrain_steps=100, lora_steps=60)
FULL = dict(pretrain_steps=400, lora_steps=500)


@dataclass
class Row:
    model: str
    dtype: str
    prompt: str
    ids_equal: bool
    same_tokens: int  # leading greedy tokens llama.cpp shares with the reference (of NEW_TOKENS)
    explained: bool  # a divergence (if any) is a near-tie within the tolerance
    near_ties: int
    first_step_diff: float  # max |logit difference| at the first step, relative to the largest |logit|
    max_diff: float  # the same over all NEW_TOKENS steps
    sampler_is_argmax: bool  # llama.cpp's sampled token is the arg-max of its own logits at every step
    margin: float | None  # at the first differing step: torchft's logit of its token minus of llama.cpp's (relative)
    same_as_merged: int | None = None  # adapter rows: greedy tokens shared with the merged GGUF
    problems: list[str] = field(default_factory=list)


def make_models(work: Path, pretrain_steps: int, lora_steps: int) -> dict[str, Path]:
    """The step folders to export: ``random`` (base init), ``base`` (pretrained) and ``quickstart`` (LoRA)."""
    from torchft._recipes import lora_finetune_single_device
    from torchft.config import load_config
    from torchft.training.quickstart import tiny_base_model

    random_init = tiny_base_model(str(work / "random"), seed=1, pretrain_steps=0)
    cfg = load_config("quickstart/lora_single_device", [
        f"output_dir={work / 'lora'}", f"base_model.path={work / 'base'}",
        f"base_model.pretrain_steps={pretrain_steps}", f"max_steps={lora_steps}",
        f"save_every_n_steps={lora_steps}", f"eval_every_n_steps={lora_steps}", "progress_bar=false",
        "sample_prompts=null", "overwrite_output_dir=true",  # a rerun in the same --workdir starts afresh
    ])
    lora_finetune_single_device.main(cfg)  # makes the base first (the config's base_model node)
    return {"random": random_init, "base": work / "base", "quickstart": work / "lora" / f"step_{lora_steps}"}


def sentencepiece_model(path: Path) -> Path:
    """A small Llama-2-style sentencepiece model (BPE, byte fallback, digits split) on quickstart-like text."""
    import io
    import random

    import sentencepiece as spm

    from torchft.training.quickstart import pretraining_text

    rng = random.Random(0)
    lines = [pretraining_text(rng) for _ in range(500)] + ["[INST] <<SYS>>\nYou are helpful.\n<</SYS>>\n\n[/INST]"]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=384,
                                   model_type="bpe", byte_fallback=True, split_digits=True, unk_id=0, bos_id=1,
                                   eos_id=2, pad_id=-1, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, minloglevel=2)
    path.write_bytes(model.getvalue())
    return path


def random_variant(folder: Path, tokenizer_file: Path, **overrides) -> Path:
    """A random model of the quickstart's shape (2 layers) with ``overrides``, saved as a step folder."""
    import shutil

    from torchft.checkpoint import save_hf_checkpoint
    from torchft.data.tokenizers import model_tokenizer
    from torchft.models import LlamaArgs, build_from_args

    vocab_size = model_tokenizer(str(tokenizer_file)).vocab_size
    args = LlamaArgs(**{**dict(vocab_size=vocab_size, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=128,
                               intermediate_dim=384, max_seq_len=512, rope_base=500000.0), **overrides})
    with torch.random.fork_rng(devices=[]):  # the caller's RNG state stays as it was
        torch.manual_seed(0)
        model = build_from_args(args)  # the modules' own random init
    save_hf_checkpoint(model.state_dict(), folder, config=args.to_hf_config(torch.float32), overwrite=True)
    shutil.copyfile(tokenizer_file, folder / "tokenizer.model")
    return folder


def prompts(tokenizer) -> dict[str, tuple[list[int], object]]:
    """name -> (torchft's ids, what llama.cpp tokenizes: text, or ("chat", how) for chat prompts)."""
    out = {name: (tokenizer.encode(text, add_bos=True, add_eos=False), text) for name, text in TEXTS.items()}
    chat_ids = list(tokenizer.tokenize_messages(CHAT, add_eos=False, add_generation_prompt=True)[0])
    out["chat (GGUF template)"] = (chat_ids, ("chat", "jinja"))
    out["chat (llama.cpp built-in)"] = (chat_ids, ("chat", "builtin"))
    return out


def llamacpp_ids(llm, what) -> list[int]:
    """llama.cpp's ids for a text, or for the chat prompt rendered as llama-cpp-python / llama-cli do."""
    import ctypes

    import llama_cpp
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    if isinstance(what, str):
        return llm.tokenize(what.encode(), add_bos=True, special=False)
    if what[1] == "jinja":  # Llama.create_chat_completion's path for a GGUF with a chat template
        eos, bos = (llm.detokenize([i], special=True).decode() for i in (llm.token_eos(), llm.token_bos()))
        rendered = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], eos, bos)(messages=CHAT)
        return llm.tokenize(rendered.prompt.encode(), add_bos=not rendered.added_special, special=True)
    # llama-cli without --jinja: llama.cpp's C++ template named by the GGUF's template, then BOS per the GGUF
    messages = (llama_cpp.llama_chat_message * len(CHAT))(
        *(llama_cpp.llama_chat_message(m["role"].encode(), m["content"].encode()) for m in CHAT))
    template = llm.metadata["tokenizer.chat_template"].encode()
    buffer = ctypes.create_string_buffer(4096)
    size = llama_cpp.llama_chat_apply_template(template, messages, len(CHAT), True, buffer, len(buffer))
    if size < 0:
        raise RuntimeError("llama.cpp does not recognise the GGUF's chat template")
    return llm.tokenize(buffer.raw[:size], add_bos=True, special=True)


def llamacpp_greedy(llm, ids: list[int]) -> tuple[list[int], np.ndarray]:
    """NEW_TOKENS greedy tokens and the logits [NEW_TOKENS, vocab] each was chosen from."""
    llm.reset()
    tokens = []
    for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
        tokens.append(token)
        if len(tokens) == NEW_TOKENS:
            break
    logits = np.array(llm.scores[len(ids) - 1: len(ids) - 1 + NEW_TOKENS])  # logits_all=True keeps every row
    return tokens, logits


def compare(model: str, dtype: str, prompt: str, ids_equal: bool, ref_tokens: list[int], ref_logits: np.ndarray,
            tokens: list[int], logits: np.ndarray, tolerance: float) -> Row:
    """One table row: ``ref_logits`` [NEW_TOKENS, vocab] are the reference's on llama.cpp's tokens."""
    scale = float(np.abs(ref_logits).max())
    diff = np.abs(ref_logits - logits).max(axis=-1) / scale  # [NEW_TOKENS]
    top2 = np.sort(ref_logits, axis=-1)[:, -2:]
    bound = 2 * tolerance * scale  # both logits of a pair may move by tolerance * scale
    same = next((i for i, (a, b) in enumerate(zip(ref_tokens, tokens)) if a != b), NEW_TOKENS)
    margin = None if same == NEW_TOKENS else float(ref_logits[same].max() - ref_logits[same, tokens[same]])
    explained = margin is None or margin <= bound
    row = Row(model, dtype, prompt, ids_equal, same, explained, int(((top2[:, 1] - top2[:, 0]) <= bound).sum()),
              float(diff[0]), float(diff.max()), bool((logits.argmax(-1) == np.array(tokens)).all()),
              None if margin is None else margin / scale)
    if not ids_equal:
        row.problems.append("llama.cpp tokenizes the prompt differently")
    if row.max_diff > tolerance:
        row.problems.append(f"logits differ by {row.max_diff:.2e} of the largest, above {tolerance:g}")
    if not explained:
        row.problems.append(f"greedy tokens differ at step {same} without a near-tie")
    if not row.sampler_is_argmax:
        row.problems.append("llama.cpp's sampler did not pick the arg-max")
    return row


def reference(step: Path, prompt_ids: dict, llamacpp_tokens: dict) -> tuple[dict, dict]:
    """torchft on the source weights (fp32): greedy tokens per prompt, and its logits on llama.cpp's tokens."""
    from torchft.generation import generate, load_model

    model = load_model(step, dtype=torch.float32)
    greedy, logits = {}, {}
    with torch.no_grad():
        for name, ids in prompt_ids.items():
            greedy[name] = generate(model, ids, NEW_TOKENS)
            for key, tokens in llamacpp_tokens.items():
                if key[1] == name:
                    sequence = torch.tensor([ids + tokens[:-1]])  # [1, prompt + NEW_TOKENS - 1]
                    logits[key] = model(sequence)[0, len(ids) - 1:].numpy()  # [NEW_TOKENS, vocab]
    return greedy, logits


def run_llamacpp(path: Path, prompt_set: dict, lora: Path | None = None) -> dict:
    """prompt name -> (ids equal, greedy tokens, logits) from llama.cpp on one GGUF (+ a LoRA file)."""
    from llama_cpp import Llama

    # One thread: a model this small gains nothing from more, and ggml's spinning threads crawl on a busy CPU.
    llm = Llama(model_path=str(path), lora_path=str(lora) if lora else None, n_ctx=512, n_threads=1,
                n_threads_batch=1, logits_all=True, verbose=False)
    try:
        return {name: (llamacpp_ids(llm, what) == ids, *llamacpp_greedy(llm, ids))
                for name, (ids, what) in prompt_set.items()}
    finally:
        llm.close()


def measure(work: Path, pretrain_steps: int, lora_steps: int) -> list[Row]:
    """Every row of the table (see the module docstring)."""
    from torchft.data.tokenizers import model_tokenizer

    folders = make_models(work, pretrain_steps, lora_steps)
    spm_file = sentencepiece_model(work / "sentencepiece.model")
    for name, overrides in VARIANTS.items():
        tokenizer_file = spm_file if "sentencepiece" in name else folders["base"] / "tokenizer.model"
        folders[name] = random_variant(work / name.replace(" ", "_"), tokenizer_file, **overrides)

    def export(folder, name, *options):
        out = work / "gguf" / f"{name.replace(' ', '_')}.gguf"
        if tune(["export", "--checkpoint_dir", str(folder), "--output", str(out), *options]) != 0:
            raise RuntimeError(f"tune export of {folder} failed")
        return out

    rows = []
    for model in ("random", "quickstart", *VARIANTS):
        prompt_set = prompts(model_tokenizer(str(folders[model])))
        dtypes = LOGIT_TOLERANCE if model in ("random", "quickstart") else ("f16",)
        runs = {dtype: run_llamacpp(export(folders[model], f"{model}-{dtype}", "--dtype", dtype), prompt_set)
                for dtype in dtypes}
        if model == "quickstart":  # the adapter on the base's GGUF, in llama.cpp
            base, adapter = export(folders["base"], "base-f16"), export(folders[model], "lora-f16", "--adapter-only")
            runs["f16 + lora"] = run_llamacpp(base, prompt_set, lora=adapter)
        greedy, ref_logits = reference(folders[model], {name: ids for name, (ids, _) in prompt_set.items()},
                                       {(dtype, name): out[1] for dtype, run in runs.items()
                                        for name, out in run.items()})
        for dtype, run in runs.items():
            for name, (ids_equal, tokens, logits) in run.items():
                row = compare(model, dtype, name, ids_equal, greedy[name], ref_logits[dtype, name], tokens,
                              logits, LOGIT_TOLERANCE[dtype.split()[0]])
                if dtype == "f16 + lora":
                    merged = runs["f16"][name][1]
                    row.same_as_merged = next((i for i, (a, b) in enumerate(zip(merged, tokens)) if a != b),
                                              NEW_TOKENS)
                    if row.same_as_merged != NEW_TOKENS:
                        row.problems.append("the adapter on the base gives other tokens than the merged GGUF")
                rows.append(row)
    return rows


def table(rows: list[Row]) -> str:
    """One line per model and GGUF file, over its prompts; the prompts whose greedy tokens part are named."""
    lines = ["| model | GGUF | prompts with equal ids | greedy tokens equal (per prompt) | near-ties | "
             "max logit diff: first step / all steps | = merged GGUF |", "|---|---|---|---|---|---|---|"]
    groups: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        groups.setdefault((r.model, r.dtype), []).append(r)
    for (model, dtype), group in groups.items():
        equal = sum(r.same_tokens == NEW_TOKENS for r in group)
        greedy = "; ".join([f"{equal} x {NEW_TOKENS}/{NEW_TOKENS}"] * bool(equal) + [
            f"{r.prompt}: {r.same_tokens} (margin {r.margin:.1e})" for r in group if r.margin is not None])
        merged = [r.same_as_merged for r in group if r.same_as_merged is not None]
        merged_text = f"{sum(m == NEW_TOKENS for m in merged)} x {NEW_TOKENS}/{NEW_TOKENS}" if merged else ""
        lines.append(f"| {model} | {dtype} | {sum(r.ids_equal for r in group)}/{len(group)} | {greedy} | "
                     f"{sum(r.near_ties for r in group)} | {max(r.first_step_diff for r in group):.1e} / "
                     f"{max(r.max_diff for r in group):.1e} | {merged_text} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the quickstart's own lengths (400 + 500 steps)")
    parser.add_argument("--workdir", help="where the models and GGUF files go (default: a temporary folder)")
    args = parser.parse_args(argv)
    try:
        import llama_cpp
    except ImportError:
        print('llama-cpp-python is not installed: CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install llama-cpp-python '
              "(it builds llama.cpp from source)", file=sys.stderr)
        return 1

    shape = FULL if args.full else TINY
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as llama.cpp runs here (and the quickstart trains): one thread
    try:
        with tempfile.TemporaryDirectory() as tmp:
            rows = measure(Path(args.workdir or tmp), **shape)
    finally:
        torch.set_num_threads(threads)
    print(f"llama-cpp-python {llama_cpp.__version__}, torch {torch.__version__}; quickstart pretraining "
          f"{shape['pretrain_steps']} steps, LoRA {shape['lora_steps']} steps; {NEW_TOKENS} greedy tokens; "
          "logit differences and margins relative to the largest |logit|")
    print(table(rows))
    problems = [f"{r.model} {r.dtype} {r.prompt}: {p}" for r in rows for p in r.problems]
    print("\n".join(problems) if problems else "OK: every difference is within the stated tolerance")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
