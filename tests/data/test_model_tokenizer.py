"""model_tokenizer: a model folder's own tokenizer (tokenizer.json, tokenizer.model, original/tokenizer.model)."""
import shutil
import sys
from pathlib import Path

import pytest

from torchft.data.tokenizers import HFTokenizer, Llama2Tokenizer, Llama3Tokenizer, model_tokenizer

sys.path.insert(0, str(Path(__file__).parents[1] / "assets"))
from tiny_llama_pair import save_tiny_tokenizer  # noqa: E402


def test_each_folder_layout_gets_its_own_tokenizer(tmp_path, llama3_ranks_path, sp_model_path, llama3_tok):
    hf_dir = save_tiny_tokenizer(tmp_path / "hf")
    shutil.copy(llama3_ranks_path, hf_dir / "tokenizer.model")  # tokenizer.json wins: it has the chat template
    assert isinstance(model_tokenizer(hf_dir), HFTokenizer)
    assert isinstance(model_tokenizer(hf_dir / "tokenizer.json"), HFTokenizer)

    meta = tmp_path / "meta" / "original"
    meta.mkdir(parents=True)
    shutil.copy(llama3_ranks_path, meta / "tokenizer.model")
    tok = model_tokenizer(meta.parent, max_seq_len=7)
    assert isinstance(tok, Llama3Tokenizer) and tok.max_seq_len == 7
    assert tok.encode("the cat sat") == llama3_tok.encode("the cat sat")

    sp = tmp_path / "llama2"
    sp.mkdir()
    shutil.copy(sp_model_path, sp / "tokenizer.model")
    assert isinstance(model_tokenizer(sp), Llama2Tokenizer)
    assert isinstance(model_tokenizer(sp / "tokenizer.model"), Llama2Tokenizer)


def test_a_folder_without_tokenizer_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no tokenizer in this folder \(looked for tokenizer.json, "
                                                r"tokenizer.model, original/tokenizer.model\)"):
        model_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="tokenizer path .*missing does not exist"):
        model_tokenizer(tmp_path / "missing")
