"""Static checks that vLLM can serve a folder: an HF Llama folder and/or its LoRA adapter folder.

Nothing is loaded but JSON and safetensors headers; each problem is one line naming the file and the rule.
The conditions are vLLM's (its ``LoRAConfig`` and PEFT loading): a rank of at most 512 (``--max-lora-rank``
takes 1, 8, 16, 32, 64, 128, 256, 320 or 512), LoRA only on the decoder's linear layers (q/k/v/o, gate/up/down),
no ``modules_to_save``, no DoRA, no trained biases.
"""
from __future__ import annotations

import json
from pathlib import Path

from torchft.checkpoint._io import require_dir

VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_LORA_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def _read_json(path: Path, problems: list[str]) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        problems.append(f"{path}: unreadable ({e})")
        return None
    if not isinstance(data, dict):
        problems.append(f"{path}: must hold a JSON object")
        return None
    return data


def _weight_names(folder: Path) -> set[str] | None:
    """The tensor names of the folder's safetensors files (headers only); None when it has none."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    names = set()
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            names.update(f.keys())
    return names


def model_problems(folder: Path) -> list[str]:
    """What keeps vLLM from serving the HF model folder ``folder``."""
    problems: list[str] = []
    config_path = folder / "config.json"
    config = _read_json(config_path, problems)
    if config is None:
        return problems
    if "LlamaForCausalLM" not in (config.get("architectures") or []):
        problems.append(f"{config_path}: architectures must list LlamaForCausalLM (vLLM picks its model by it)")
    if config.get("model_type") != "llama":
        problems.append(f"{config_path}: model_type {config.get('model_type')!r} is not 'llama'")
    for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "max_position_embeddings"):
        if not isinstance(config.get(field), int):
            problems.append(f"{config_path}: {field} is missing or not an integer")
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        problems.append(f"{folder}: no tokenizer.json / tokenizer_config.json (vLLM loads the tokenizer with transformers)")
    names = _weight_names(folder)
    if names is None:
        problems.append(f"{folder}: no *.safetensors weights")
    elif not config.get("tie_word_embeddings") and "lm_head.weight" not in names:
        problems.append(f"{folder}: tie_word_embeddings is false but the weights have no lm_head.weight")
    return problems


def adapter_problems(folder: Path) -> list[str]:
    """What keeps vLLM from serving the PEFT LoRA adapter folder ``folder``."""
    problems: list[str] = []
    path = folder / "adapter_config.json"
    config = _read_json(path, problems)
    if config is None:
        return problems
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"{path}: peft_type {config.get('peft_type')!r}: vLLM serves LORA adapters only")
    rank = config.get("r")
    ranks = [rank, *(config.get("rank_pattern") or {}).values()]
    if not isinstance(rank, int) or max(r for r in ranks if isinstance(r, int)) > max(VLLM_MAX_LORA_RANKS):
        problems.append(f"{path}: rank {rank} must be an integer of at most {max(VLLM_MAX_LORA_RANKS)} "
                        f"(vLLM --max-lora-rank takes {', '.join(map(str, VLLM_MAX_LORA_RANKS))})")
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else targets
    unsupported = sorted({t.split(".")[-1] for t in targets} - VLLM_LORA_MODULES)
    if unsupported:
        problems.append(f"{path}: target_modules {', '.join(unsupported)}: vLLM applies LoRA to "
                        f"{', '.join(sorted(VLLM_LORA_MODULES))} only")
    if config.get("modules_to_save"):
        problems.append(f"{path}: modules_to_save {config['modules_to_save']}: vLLM serves adapters without them")
    if config.get("use_dora"):
        problems.append(f"{path}: use_dora is true: vLLM does not serve DoRA adapters (serve the merged folder)")
    if config.get("bias", "none") != "none":
        problems.append(f"{path}: bias {config['bias']!r}: vLLM serves adapters with bias 'none' only")
    return problems


def vllm_problems(path: str) -> list[str]:
    """Problems vLLM would have with a step folder: its merged model and its ``adapter/`` (when present).

    ``path`` may also be a plain HF folder or an adapter folder. Returns one line per problem.
    """
    folder = require_dir(path, "folder to check")
    adapter = folder / "adapter" if (folder / "adapter" / "adapter_config.json").is_file() else None
    if (folder / "adapter_config.json").is_file():
        adapter = folder
    if adapter is None and not (folder / "config.json").is_file():
        return [f"{folder}: neither config.json (a model) nor adapter_config.json (a LoRA adapter)"]
    problems = model_problems(folder) if (folder / "config.json").is_file() else []
    return problems + (adapter_problems(adapter) if adapter is not None else [])
