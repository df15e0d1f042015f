"""The byte-level tokenizer and the Hugging Face adapter, both offline."""
from kif_jax.models import ByteTokenizer, load_tokenizer


def test_byte_tokenizer_round_trip():
    tok = load_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer) and tok.vocab_size == 259
    ids = tok.encode_batch(["Answer: yes", "héllo"])
    assert ids[0][-1] == tok.eos_token_id and ids[0][0] == ord("A") + 3
    assert tok.decode_batch(ids) == ["Answer: yes", "héllo"]
    assert tok.decode_batch([[ord("o") + 3, ord("k") + 3, 1, 50, 60], [0, 0]]) == ["ok", ""]


def test_hugging_face_tokenizer_from_a_local_directory(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "yes": 3, "no": 4, "answer": 5, ":": 6}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(tmp_path)
    tok = load_tokenizer(str(tmp_path))
    assert (tok.pad_token_id, tok.eos_token_id, tok.vocab_size) == (0, 1, 7)
    assert tok.encode_batch(["answer : yes", "no"]) == [[5, 6, 3, 1], [4, 1]]
    assert tok.decode_batch([[3, 1, 4], [4, 0, 0]]) == ["yes", "no"]
