#!/usr/bin/env python3
"""llama.cpp's side of the benchmark harness's `gguf` section (benches/kiln_bench.rs): loads a
GGUF file kiln wrote with llama-cpp-python (which compiles llama.cpp from source:
`pip install cmake ninja llama-cpp-python`), scores a token sequence (mean cross-entropy of
each next token, one window) and continues a prompt greedily, both on token ids so that no
tokenizer stands between the two sides.

    llama_cpp_check.py MODEL.gguf IDS.json --prompt-len N --new-tokens K [--text FILE]
    llama_cpp_check.py tokens MODEL.gguf TEXT      (tokenizer only: {"ids": [...]})

Prints one JSON line: cross_entropy, greedy (the K new ids), seconds, and with --text the ids
llama.cpp's own tokenizer gives that text (no BOS, special tokens as text).
"""

import argparse
import json
import time

import numpy as np
from llama_cpp import Llama


def tokens(model, text):
    """`tokens MODEL.gguf TEXT`: the ids llama.cpp's tokenizer (from the file alone) gives a text."""
    llm = Llama(model_path=model, vocab_only=True, verbose=False)
    print(json.dumps({"ids": llm.tokenize(open(text, "rb").read(), add_bos=False, special=False)}))


def main():
    import sys
    if sys.argv[1:2] == ["tokens"]:
        return tokens(sys.argv[2], sys.argv[3])
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("ids")
    parser.add_argument("--prompt-len", type=int, required=True)
    parser.add_argument("--new-tokens", type=int, required=True)
    parser.add_argument("--text")
    args = parser.parse_args()
    ids = json.load(open(args.ids))
    started = time.time()
    llm = Llama(model_path=args.model, n_ctx=max(len(ids), args.prompt_len + args.new_tokens) + 8,
                n_batch=512, logits_all=True, n_threads=2, seed=0, verbose=False,
                # An F32 key/value cache (llama.cpp's default is F16): the f32 file is compared
                # with kiln's f32 arithmetic.
                type_k=0, type_v=0)
    llm.reset()
    llm.eval(ids)
    logits = np.array(llm.scores[: len(ids)], dtype=np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    ce = float(-np.mean([logp[i, ids[i + 1]] for i in range(len(ids) - 1)]))
    llm.reset()
    greedy = []
    for token in llm.generate(ids[: args.prompt_len], temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        greedy.append(int(token))
        if len(greedy) == args.new_tokens:
            break
    reply = {"cross_entropy": ce, "greedy": greedy, "seconds": time.time() - started}
    if args.text:
        reply["text_ids"] = llm.tokenize(open(args.text, "rb").read(), add_bos=False, special=False)
    print(json.dumps(reply))


if __name__ == "__main__":
    main()
