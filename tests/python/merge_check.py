#!/usr/bin/env python3
"""mergekit's side of kiln's merge tests (called by tests/kiln/merge.rs).

make-models OUT: small Llama directories (float32 safetensors, config.json, a character
                 tokenizer): `base`; `a`, `b`, `c`, each the base plus independent noise on
                 every tensor; `far`, an independent model; `para`, twice the base (parallel to
                 it, which sends slerp to its linear fallback); `wide`, another shape; `gpt2a`,
                 `gpt2b`, two GPT-2s.
run RECIPE OUT:  mergekit (0.1.5, the reference) on the recipe, offline, on the CPU.

Every failure exits non-zero with a message; success prints one JSON line.
"""

import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM


def fail(message):
    print(f"merge_check: {message}", file=sys.stderr)
    sys.exit(1)


def save(model, out, vocab):
    from tokenizers import Tokenizer, decoders
    from tokenizers.models import BPE

    model.save_pretrained(out)
    chars = [chr(c) for c in range(32, 127)][:vocab]
    tok = Tokenizer(BPE(vocab={c: i for i, c in enumerate(chars)}, merges=[]))
    tok.decoder = decoders.Fuse()
    tok.save(f"{out}/tokenizer.json")
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast"}, open(f"{out}/tokenizer_config.json", "w"))


def make_models(args):
    vocab = 64
    shape = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                 rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
                 pad_token_id=None)

    def model(seed, **overrides):
        torch.manual_seed(seed)
        m = LlamaForCausalLM(LlamaConfig(**{**shape, **overrides}))
        with torch.no_grad():
            for p in m.parameters():
                p.normal_(0.0, 0.1)
        return m

    base = model(0)
    save(base, f"{args.out}/base", vocab)
    for i, name in enumerate(["a", "b", "c"]):
        m = model(0)
        generator = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=generator) * 0.02)
        save(m, f"{args.out}/{name}", vocab)
    save(model(7), f"{args.out}/far", vocab)
    para = model(0)
    with torch.no_grad():
        for p in para.parameters():
            p.mul_(2.0)
    save(para, f"{args.out}/para", vocab)
    save(model(8, intermediate_size=48), f"{args.out}/wide", vocab)
    for i, name in enumerate(["gpt2a", "gpt2b"]):
        torch.manual_seed(20 + i)
        gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=3, n_head=4,
                                          bos_token_id=None, eos_token_id=None))
        with torch.no_grad():
            for p in gpt2.parameters():
                p.normal_(0.0, 0.1)
        save(gpt2, f"{args.out}/{name}", vocab)
    print(json.dumps({"models": ["base", "a", "b", "c", "far", "para", "wide", "gpt2a", "gpt2b"]}))


def run(args):
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    config = MergeConfiguration.model_validate(yaml.safe_load(open(args.recipe)))
    run_merge(config, args.out, options=MergeOptions(copy_tokenizer=False, write_model_card=False,
                                                     random_seed=1, quiet=True))
    print(json.dumps({"out": args.out}))


def main():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("make-models")
    m.add_argument("out")
    r = sub.add_parser("run")
    r.add_argument("recipe")
    r.add_argument("out")
    args = parser.parse_args()
    {"make-models": make_models, "run": run}[args.command](args)


if __name__ == "__main__":
    main()
