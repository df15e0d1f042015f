"""The byte-level tokenizer and the Hugging Face adapter, both offline."""
import importlib.util
import subprocess
import sys

import pytest

from kif_jax.models import ByteTokenizer, load_tokenizer


def test_byte_tokenizer_round_trip():
    tok = load_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer) and tok.vocab_size == 259
    ids = tok.encode_batch(["Answer: yes", "héllo"])
    assert ids[0][-1] == tok.eos_token_id and ids[0][0] == ord("A") + 3
    assert tok.decode_batch(ids) == ["Answer: yes", "héllo"]
    assert tok.decode_batch([[ord("o") + 3, ord("k") + 3, 1, 50, 60], [0, 0]]) == ["ok", ""]


def _write_word_level_tokenizer(path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "yes": 3, "no": 4, "answer": 5, ":": 6}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(path)


def test_hugging_face_tokenizer_from_a_local_directory(tmp_path):
    _write_word_level_tokenizer(tmp_path)
    tok = load_tokenizer(str(tmp_path))
    assert (tok.pad_token_id, tok.eos_token_id, tok.vocab_size) == (0, 1, 7)
    assert tok.encode_batch(["answer : yes", "no"]) == [[5, 6, 3, 1], [4, 1]]
    assert tok.decode_batch([[3, 1, 4], [4, 0, 0]]) == ["yes", "no"]


def _stderr_of(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stderr


@pytest.mark.parametrize("kind", ["directory", "gguf"])
def test_no_pytorch_notice_from_the_tokenizer_path_and_nothing_else_hidden(kind, tmp_path):
    if importlib.util.find_spec("torch") is not None:
        pytest.skip("torch is installed: transformers has no notice to give")
    notice = "PyTorch was not found"
    assert notice in _stderr_of("import transformers")  # what a bare import prints here
    if kind == "directory":
        _write_word_level_tokenizer(tmp_path)
        source = str(tmp_path)
    else:
        from test_tokenizers_gguf import write_tokenizer_gguf
        source = str(tmp_path / "tok.gguf")
        write_tokenizer_gguf(tmp_path / "tok.gguf")
    err = _stderr_of(
        "import logging\n"
        "from kif_jax.models import load_tokenizer\n"
        f"tok = load_tokenizer({source!r})\n"
        "assert tok.encode_batch(['yes'])\n"
        "assert not logging.getLogger('transformers').filters\n"
        "from transformers.utils import logging as hf_logging\n"
        "hf_logging.get_logger('transformers').warning('another transformers warning')\n")
    assert notice not in err
    assert "another transformers warning" in err


# Gemma's turn format (its tokenizers open the template with the BOS text and also add a BOS themselves).
GEMMA_STYLE_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<start_of_turn>"
                        "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] | trim }}"
                        "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def test_chat_template_that_opens_with_bos_gives_one_bos(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from kif_jax.models.decoder.tokenize import tokenize_causal_records

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<start_of_turn>": 4, "<end_of_turn>": 5, "user": 6,
             "model": 7, "is": 8, "it": 9, "yes": 10, "no": 11, "Answer": 12, ":": 13, "?": 14}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    hf = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                 unk_token="<unk>", additional_special_tokens=["<start_of_turn>", "<end_of_turn>"])
    hf.chat_template = GEMMA_STYLE_TEMPLATE
    hf.save_pretrained(tmp_path)
    tok = load_tokenizer(str(tmp_path))
    assert tok.apply_chat_template("is it ?") == "<start_of_turn>user\nis it ?<end_of_turn>\n<start_of_turn>model\n"
    data = tokenize_causal_records([{"input": "Is it?\nis it ?\nAnswer:", "output": "yes"}], tok, template="chat")
    # One BOS, the user turn ("Is" is unknown here), then the model turn the label follows.
    assert data.input_ids[0].tolist() == [2, 4, 6, 3, 9, 14, 8, 9, 14, 12, 13, 5, 4, 7]
    assert data.target_ids[0].tolist() == [10, 1]
