#!/usr/bin/env python3
"""llama.cpp's side of the benchmark harness's `gguf` section (benches/kiln_bench.rs): loads a
GGUF file kiln wrote with llama-cpp-python (which compiles llama.cpp from source:
`pip install cmake ninja llama-cpp-python`), scores a token sequence (mean cross-entropy of
each next token, one window) and continues a prompt greedily, both on token ids so that no
tokenizer stands between the two sides.

    llama_cpp_check.py MODEL.gguf IDS.json --prompt-len N --new-tokens K

Prints one JSON line: cross_entropy, greedy (the K new ids), seconds.
"""

import argparse
import json
import time

import numpy as np
from llama_cpp import Llama


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("ids")
    parser.add_argument("--prompt-len", type=int, required=True)
    parser.add_argument("--new-tokens", type=int, required=True)
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
    print(json.dumps({"cross_entropy": ce, "greedy": greedy, "seconds": time.time() - started}))


if __name__ == "__main__":
    main()
