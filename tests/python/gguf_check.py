#!/usr/bin/env python3
"""The `gguf` package's side of kiln's GGUF tests (called by tests/kiln/gguf.rs).

check FILE.gguf BUNDLE --type T [--dequantized FILE.safetensors]:
    reads a GGUF file `kiln quantize` wrote with `gguf.GGUFReader` and checks it against the
    bundle it came from, with the package's own pieces as the reference:
    - metadata: what llama.cpp's converter writes for a Llama (architecture, shape, RoPE, norm
      epsilon) or a GPT-2 (shape, LayerNorm epsilon), and the tokenizer: `gpt2` model, `gpt-2` pre-tokenizer, tokens in id order,
      merges as in tokenizer.json, special tokens typed CONTROL, the end-of-text id;
    - tensors: the names `gguf.get_tensor_name_map` gives the bundle's tensors, shapes, types
      (1-D tensors F32, matrices T), and every tensor's bytes equal to
      `gguf.quants.quantize` of the bundle's tensor, query and key rows permuted as
      convert_hf_to_gguf.py's `LlamaModel.permute` does (a GPT-2's Conv1D weights transposed,
      as its `GPT2Model` does);
    - with --dequantized (kiln convert FILE.gguf OUT.safetensors): kiln's dequantization equals
      `gguf.quants.dequantize`, permuted back.
    Prints one JSON line: per tensor type, the largest dequantization error relative to the
    largest magnitude of the tensor's block (of 32 values).

Every failure exits non-zero with a message.
"""

import argparse
import json
import sys

import numpy as np
import gguf
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize
from safetensors.numpy import load_file

TYPES = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}


def fail(message):
    print(f"gguf_check: {message}", file=sys.stderr)
    sys.exit(1)


def permute(weights, n_head, n_head_kv):
    """convert_hf_to_gguf.py's LlamaModel.permute."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def field(reader, key):
    f = reader.fields.get(key)
    if f is None:
        fail(f"metadata {key} is missing")
    return f.contents()


def check(args):
    reader = gguf.GGUFReader(args.file)
    config = json.load(open(f"{args.bundle}/config.json"))
    tokenizer = json.load(open(f"{args.bundle}/tokenizer.json"))
    weights = load_file(f"{args.bundle}/model.safetensors")
    if config["model_type"] == "gpt2":
        return check_gpt2(reader, config, tokenizer, weights, args)
    check_tokenizer(reader, config, tokenizer)
    expected = {
        "general.architecture": "llama",
        "llama.block_count": config["num_hidden_layers"],
        "llama.embedding_length": config["hidden_size"],
        "llama.feed_forward_length": config["intermediate_size"],
        "llama.attention.head_count": config["num_attention_heads"],
        "llama.attention.head_count_kv": config["num_key_value_heads"],
        "llama.context_length": config["max_position_embeddings"],
        "llama.rope.dimension_count": config["hidden_size"] // config["num_attention_heads"],
    }
    for key, value in expected.items():
        if field(reader, key) != value:
            fail(f"{key} is {field(reader, key)!r}, expected {value!r}")
    for key, value in [("llama.rope.freq_base", config["rope_theta"]), ("llama.attention.layer_norm_rms_epsilon", config["rms_norm_eps"])]:
        if field(reader, key) != np.float32(value):
            fail(f"{key} is {field(reader, key)}, expected {value} as float32")
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]

    def to_gguf(hf, value):
        if hf.endswith("q_proj.weight"):
            return permute(value, heads, heads)
        if hf.endswith("k_proj.weight"):
            return permute(value, heads, kv_heads)
        return value

    check_tensors(reader, weights, args, gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"], to_gguf)


CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")


def check_gpt2(reader, config, tokenizer, weights, args):
    check_tokenizer(reader, config, tokenizer)
    expected = {
        "general.architecture": "gpt2",
        "gpt2.block_count": config["n_layer"],
        "gpt2.embedding_length": config["n_embd"],
        "gpt2.feed_forward_length": config.get("n_inner") or 4 * config["n_embd"],
        "gpt2.attention.head_count": config["n_head"],
        "gpt2.context_length": config["n_positions"],
    }
    for key, value in expected.items():
        if field(reader, key) != value:
            fail(f"{key} is {field(reader, key)!r}, expected {value!r}")
    if field(reader, "gpt2.attention.layer_norm_epsilon") != np.float32(config["layer_norm_epsilon"]):
        fail("gpt2.attention.layer_norm_epsilon differs")
    # The converter's GPT2Model transposes the Conv1D weights to Linear's [out, in].
    check_tensors(reader, weights, args, gguf.MODEL_ARCH.GPT2, config["n_layer"],
                  lambda hf, value: value.T.copy() if hf.endswith(CONV1D) else value)


def check_tokenizer(reader, config, tokenizer):
    for key, value in [("tokenizer.ggml.model", "gpt2"), ("tokenizer.ggml.pre", "gpt-2")]:
        if field(reader, key) != value:
            fail(f"{key} is {field(reader, key)!r}, expected {value!r}")
    vocab = tokenizer["model"]["vocab"]
    for added in tokenizer["added_tokens"]:
        vocab[added["content"]] = added["id"]
    by_id = {i: t for t, i in vocab.items()}
    tokens = field(reader, "tokenizer.ggml.tokens")
    if len(tokens) != config["vocab_size"] or any(tokens[i] != by_id[i] for i in range(len(by_id))):
        fail("tokenizer.ggml.tokens are not the tokenizer's tokens in id order")
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]]
    if field(reader, "tokenizer.ggml.merges") != merges:
        fail("tokenizer.ggml.merges differ from tokenizer.json's")
    types = field(reader, "tokenizer.ggml.token_type")
    for added in tokenizer["added_tokens"]:
        if added["special"] and types[added["id"]] != gguf.TokenType.CONTROL:
            fail(f"special token {added['content']} is typed {types[added['id']]}, not CONTROL")
    eos = field(reader, "tokenizer.ggml.eos_token_id")
    if by_id.get(eos) != "<|endoftext|>":
        fail(f"tokenizer.ggml.eos_token_id {eos} is {by_id.get(eos)!r}")



def check_tensors(reader, weights, args, arch, layers, to_gguf):
    qtype = TYPES[args.type]
    names = gguf.get_tensor_name_map(arch, layers)
    tensors = {t.name: t for t in reader.tensors}
    dequantized = load_file(args.dequantized) if args.dequantized else None
    seen = set()
    errors = {}
    for hf, value in weights.items():
        name = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        if name is None or name not in tensors:
            fail(f"no tensor for {hf} (expected {name})")
        seen.add(name)
        t = tensors[name]
        value = to_gguf(hf, value)
        if list(reversed([int(d) for d in t.shape])) != list(value.shape):
            fail(f"{name}: shape {list(t.shape)} (ggml order) for {hf} {list(value.shape)}")
        want = Q.F32 if value.ndim == 1 else qtype
        if t.tensor_type != want:
            fail(f"{name} is {t.tensor_type.name}, expected {want.name}")
        reference = quantize(value.astype(np.float32), want)
        if t.data.tobytes() != reference.tobytes():
            diff = np.flatnonzero(np.frombuffer(t.data.tobytes(), np.uint8) != np.frombuffer(reference.tobytes(), np.uint8))
            fail(f"{name} ({want.name}): bytes differ from gguf.quants.quantize at {len(diff)} places, first {diff[:5]}")
        back = dequantize(t.data, want).reshape(value.shape)
        if dequantized is not None:
            ours = to_gguf(hf, dequantized[hf])
            if not np.array_equal(ours.reshape(value.shape), back):
                fail(f"{hf}: kiln's dequantization differs from gguf.quants.dequantize")
        blocks = value.reshape(-1, 32) if value.size % 32 == 0 else value.reshape(-1, value.size)
        amax = np.abs(blocks).max(axis=1, keepdims=True)
        err = float((np.abs(blocks - back.reshape(blocks.shape)) / np.where(amax == 0, 1, amax)).max())
        errors[want.name] = max(errors.get(want.name, 0.0), err)
    extra = set(tensors) - seen
    if extra:
        fail(f"tensors the bundle does not have: {sorted(extra)}")
    print(json.dumps({"tensors": len(seen), "max_relative_error": errors}))


def main():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check")
    c.add_argument("file")
    c.add_argument("bundle")
    c.add_argument("--type", choices=sorted(TYPES), required=True)
    c.add_argument("--dequantized")
    args = parser.parse_args()
    {"check": check}[args.command](args)


if __name__ == "__main__":
    main()
