#!/usr/bin/env python3
"""The Hugging Face side of kiln's compatibility tests (called by tests/kiln/hf.rs).

check-bundle: load a kiln bundle with transformers and compare with kiln's logits and ids.
make-model:   save a random Llama with transformers (optionally sharded, tied, GQA, F16/BF16)
              plus a character tokenizer, with reference logits and a greedy continuation.

Every failure exits non-zero with a message; success prints one JSON line.
"""

import argparse
import json
import sys

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def fail(message):
    print(f"hf_compat: {message}", file=sys.stderr)
    sys.exit(1)


def check_bundle(args):
    model, info = AutoModelForCausalLM.from_pretrained(
        args.dir, output_loading_info=True, dtype=torch.float32
    )
    problems = {k: v for k, v in info.items() if v}
    if problems:
        fail(f"loading info is not empty: {problems}")
    if type(model).__name__ != "LlamaForCausalLM":
        fail(f"loaded as {type(model).__name__}")
    model.eval()
    ids = json.load(open(args.ids))
    kiln = np.fromfile(args.logits, dtype="<f4").reshape(len(ids), -1)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].numpy()
    if logits.shape != kiln.shape:
        fail(f"logits shape {logits.shape} vs kiln {kiln.shape}")
    diff = float(np.abs(logits - kiln).max())
    if diff > args.tolerance:
        fail(f"logits differ from kiln's by {diff} (tolerance {args.tolerance})")

    tokenizer = AutoTokenizer.from_pretrained(args.dir)
    # transformers 5 names the tokenizers-backed class TokenizersBackend.
    if type(tokenizer).__name__ not in ("PreTrainedTokenizerFast", "TokenizersBackend"):
        fail(f"tokenizer class is {type(tokenizer).__name__}")
    text = open(args.text, encoding="utf-8").read()
    expected = json.load(open(args.text_ids))
    got = tokenizer(text, add_special_tokens=False).input_ids
    if got != expected:
        first = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
        fail(f"tokenizer ids differ from kiln's at position {first} ({len(got)} vs {len(expected)} ids)")
    decoded = tokenizer.decode(got)
    if decoded != text:
        fail(f"tokenizer round trip changed the text: {decoded[:80]!r}")
    print(json.dumps({"max_logit_diff": diff, "tokens": len(got), "params": model.num_parameters()}))


def char_tokenizer(vocab_size):
    from tokenizers import Tokenizer, decoders
    from tokenizers.models import BPE

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {c: i for i, c in enumerate(chars[:vocab_size])}
    tok = Tokenizer(BPE(vocab=vocab, merges=[]))
    tok.decoder = decoders.Fuse()
    return tok


def make_model(args):
    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.max_positions,
        rope_theta=args.rope_theta,
        rms_norm_eps=1e-5,
        tie_word_embeddings=args.tied,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    model = LlamaForCausalLM(config)
    # Larger weights than the default init, so logits differ clearly between tokens.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.15)
    model = model.to(DTYPES[args.dtype])
    model.save_pretrained(args.out, max_shard_size=args.shard_size)
    tok = char_tokenizer(args.vocab)
    tok.save(f"{args.out}/tokenizer.json")
    json.dump(
        {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": args.max_positions},
        open(f"{args.out}/tokenizer_config.json", "w"),
    )

    # References are computed in float32 from the saved (possibly rounded) weights.
    reference = AutoModelForCausalLM.from_pretrained(args.out, dtype=torch.float32).eval()
    ids = json.load(open(args.ids))
    with torch.no_grad():
        logits = reference(torch.tensor([ids])).logits[0].numpy().astype("<f4")
        # An explicit all-ones mask: otherwise generate() masks every token equal to the pad id.
        out = reference.generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False, max_new_tokens=args.new_tokens, pad_token_id=0, eos_token_id=None,
        )
    logits.tofile(f"{args.out}/reference_logits.f32")
    continuation = out[0, len(ids):].tolist()
    json.dump(continuation, open(f"{args.out}/reference_greedy.json", "w"))
    print(json.dumps({"params": model.num_parameters(), "greedy": continuation}))


def main():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check-bundle")
    c.add_argument("dir")
    c.add_argument("--ids", required=True)
    c.add_argument("--logits", required=True)
    c.add_argument("--text", required=True)
    c.add_argument("--text-ids", required=True)
    c.add_argument("--tolerance", type=float, default=1e-4)
    m = sub.add_parser("make-model")
    m.add_argument("out")
    m.add_argument("--ids", required=True)
    m.add_argument("--vocab", type=int, default=96)
    m.add_argument("--hidden", type=int, default=64)
    m.add_argument("--intermediate", type=int, default=128)
    m.add_argument("--layers", type=int, default=2)
    m.add_argument("--heads", type=int, default=4)
    m.add_argument("--kv-heads", type=int, default=4)
    m.add_argument("--max-positions", type=int, default=128)
    m.add_argument("--rope-theta", type=float, default=10000.0)
    m.add_argument("--tied", action="store_true")
    m.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    m.add_argument("--shard-size", default="10GB")
    m.add_argument("--new-tokens", type=int, default=20)
    m.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    {"check-bundle": check_bundle, "make-model": make_model}[args.command](args)


if __name__ == "__main__":
    main()
