#!/usr/bin/env python3
"""The Hugging Face side of kiln's compatibility tests (called by tests/kiln/hf.rs).

check-bundle:    load a kiln bundle with transformers and compare with kiln's logits and ids.
make-model:      save a random Llama, Qwen2, Mistral or GPT-2 with transformers (optionally
                 sharded, tied, GQA, F16/BF16) plus a character tokenizer (or the tokenizer
                 files of another directory), with reference logits and a greedy continuation.
make-tokenizers: build Llama-2-, Llama-3-, GPT-2- and T5-style tokenizer directories with the
                 tokenizers library, and record what transformers makes of a text with them.
eval-loss:       transformers' mean cross-entropy over kiln's evaluation windows.
generate:        transformers' greedy continuation, stopping where generation_config says.
check-dtype:     a bundle exported in float16/bfloat16 against the float32 export of the same
                 checkpoint: each tensor is torch's `.to(dtype)` of it, bit for bit, and
                 transformers loads it in that dtype with logits close to float32's.

Every failure exits non-zero with a message; success prints one JSON line.
"""

import argparse
import json
import sys

import numpy as np
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
CLASSES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mistral": "MistralForCausalLM",
    "gpt2": "GPT2LMHeadModel",
}


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
    if type(model).__name__ != CLASSES[args.arch]:
        fail(f"loaded as {type(model).__name__}, expected {CLASSES[args.arch]}")
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
    if args.tokenizer_as_is:
        # transformers 5 loads a qwen2 directory's tokenizer as Qwen2Tokenizer, which rebuilds
        # Qwen's own normalizer and split pattern whatever tokenizer.json holds; the file itself
        # is what kiln reads.
        from transformers import PreTrainedTokenizerFast
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=f"{args.dir}/tokenizer.json")
    text = open(args.text, encoding="utf-8").read()
    expected = json.load(open(args.text_ids))
    got = tokenizer(text).input_ids
    if got != expected:
        first = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
        fail(f"tokenizer ids differ from kiln's at position {first} ({len(got)} vs {len(expected)} ids)")
    decoded = tokenizer.decode(got, skip_special_tokens=True)
    if args.round_trip and decoded != text:
        fail(f"tokenizer round trip changed the text: {decoded[:80]!r}")
    print(json.dumps({"max_logit_diff": diff, "tokens": len(got), "params": model.num_parameters()}))


def check_dtype(args):
    import glob
    import os

    from safetensors.torch import load_file

    want = DTYPES[args.dtype]

    def tensors(directory):
        found = {}
        for path in sorted(glob.glob(os.path.join(directory, "*.safetensors"))):
            found.update(load_file(path))
        return found

    reference, narrowed = tensors(args.reference), tensors(args.dir)
    if reference.keys() != narrowed.keys():
        fail(f"tensor names differ: {sorted(reference.keys() ^ narrowed.keys())}")
    for name, full in reference.items():
        if full.dtype != torch.float32:
            fail(f"reference {name} is {full.dtype}, not float32")
        got = narrowed[name]
        if got.dtype != want:
            fail(f"{name} is {got.dtype}, expected {want}")
        if not torch.equal(full.to(want).view(torch.int16), got.view(torch.int16)):
            fail(f"{name} is not torch's .to({args.dtype}) of the float32 weights")
    config = json.load(open(os.path.join(args.dir, "config.json")))
    if config.get("torch_dtype") != args.dtype:
        fail(f"config.json torch_dtype is {config.get('torch_dtype')!r}, expected {args.dtype!r}")
    model = AutoModelForCausalLM.from_pretrained(args.dir, dtype="auto").eval()
    if model.dtype != want:
        fail(f"transformers loaded the bundle as {model.dtype}, expected {want}")
    full_model = AutoModelForCausalLM.from_pretrained(args.reference, dtype=torch.float32).eval()
    ids = torch.tensor([list(range(1, 25))])
    with torch.no_grad():
        expected = full_model(ids).logits.float()
        got = model(ids).logits.float()
    scale = float(expected.abs().max())
    diff = float((got - expected).abs().max())
    if not diff <= args.tolerance * scale:
        fail(f"{args.dtype} logits differ from float32 by {diff} (largest logit {scale}, tolerance {args.tolerance})")
    print(json.dumps({"max_logit_diff": diff, "max_logit": scale, "tensors": len(narrowed)}))


def char_tokenizer(vocab_size):
    from tokenizers import Tokenizer, decoders
    from tokenizers.models import BPE

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {c: i for i, c in enumerate(chars[:vocab_size])}
    tok = Tokenizer(BPE(vocab=vocab, merges=[]))
    tok.decoder = decoders.Fuse()
    return tok


def random_model(args):
    common = dict(vocab_size=args.vocab, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                  tie_word_embeddings=args.tied)
    if args.arch == "gpt2":
        config = GPT2Config(n_positions=args.max_positions, n_embd=args.hidden, n_layer=args.layers,
                            n_head=args.heads, n_inner=args.intermediate, **common)
        return GPT2LMHeadModel(config)
    llama_like = dict(hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, max_position_embeddings=args.max_positions,
                      rope_theta=args.rope_theta, rms_norm_eps=1e-5, **common)
    if args.arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**llama_like))
    if args.arch == "mistral":
        return MistralForCausalLM(MistralConfig(sliding_window=args.sliding_window, **llama_like))
    return LlamaForCausalLM(LlamaConfig(**llama_like))


def make_model(args):
    torch.manual_seed(args.seed)
    model = random_model(args)
    # Larger weights than the default init, so logits differ clearly between tokens.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.1)
            elif p.dim() == 1:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.15)
    model = model.to(DTYPES[args.dtype])
    model.save_pretrained(args.out, max_shard_size=args.shard_size)
    if args.torch_bin:
        # PyTorch's pickle format, as older Hub models ship it: alone, or beside the
        # safetensors with other (zeroed) values, which a loader must then ignore.
        import os
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if args.torch_bin == "beside-zeroed":
            state = {k: torch.zeros_like(v) for k, v in state.items()}
        else:
            for name in os.listdir(args.out):
                if name.startswith("model") and (name.endswith(".safetensors") or name.endswith(".index.json")):
                    os.remove(f"{args.out}/{name}")
        torch.save(state, f"{args.out}/pytorch_model.bin")
    if args.tokenizer_from:
        import shutil
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
            try:
                shutil.copy(f"{args.tokenizer_from}/{name}", f"{args.out}/{name}")
            except FileNotFoundError:
                pass
        if args.special_ids:
            bos, eos = (int(i) for i in args.special_ids.split(","))
            for name in ("config.json", "generation_config.json"):
                path = f"{args.out}/{name}"
                try:
                    config = json.load(open(path))
                except FileNotFoundError:
                    config = {}
                config.update(bos_token_id=bos, eos_token_id=eos)
                json.dump(config, open(path, "w"), indent=2)
    else:
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
    print(json.dumps({"params": reference.num_parameters(), "greedy": continuation}))


def eval_loss(args):
    """Mean cross-entropy of the text's ids in kiln's windows: consecutive windows of `window`
    predicted tokens, each seeing only its own context, the remainder as a last short one."""
    model = AutoModelForCausalLM.from_pretrained(args.dir, dtype=torch.float32).eval()
    ids = json.load(open(args.ids))
    window = args.window
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, window):
            chunk = ids[start:start + window + 1]
            if len(chunk) < 2:
                break
            logits = model(torch.tensor([chunk[:-1]])).logits[0]
            loss = torch.nn.functional.cross_entropy(logits, torch.tensor(chunk[1:]), reduction="sum")
            total += float(loss)
            count += len(chunk) - 1
    print(json.dumps({"cross_entropy": total / count, "tokens": count}))


def generate(args):
    """Greedy continuation as transformers' generate() gives it with the directory's
    generation_config.json (so it stops at that EOS), decoded as decode(skip_special_tokens)."""
    model = AutoModelForCausalLM.from_pretrained(args.dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.dir)
    ids = tokenizer(args.prompt).input_ids
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False, max_new_tokens=args.new_tokens, pad_token_id=0,
        )
    new = out[0, len(ids):].tolist()
    print(json.dumps({"prompt_ids": ids, "ids": new, "text": tokenizer.decode(new, skip_special_tokens=True)}))


CORPUS = (
    "The quick brown fox jumps over the lazy dog. 1234567890 and 42 apples.\n"
    "Un café à Paris, naïve façade, crème brûlée; Übermäßig große Straße.\n"
    "東京は日本の首都です。北京是中国的首都。\n"
    "  indented line with  two  spaces\tand a tab\n"
    "It's what we've said: they're here, isn't it? I'm sure you'll see.\n"
) * 20

LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def make_tokenizers(args):
    """Four tokenizer directories in the shapes real models ship, trained on a small corpus."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    os = __import__("os")
    lines = CORPUS.splitlines(keepends=True)

    def save(name, tok, config):
        d = f"{args.out}/{name}"
        os.makedirs(d, exist_ok=True)
        tok.save(f"{d}/tokenizer.json")
        json.dump(config, open(f"{d}/tokenizer_config.json", "w"), indent=2)

    # Llama-2 / TinyLlama / Mistral v0.1: byte-fallback BPE, "▁" for spaces, "<s>" prepended.
    normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trained = Tokenizer(models.BPE())
    trained.normalizer = normalizer
    trained.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=200, show_progress=False))
    # As SentencePiece lays it out: the special tokens, the 256 byte tokens, then the pieces.
    state = json.loads(trained.to_str())["model"]
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)])}
    for piece, _ in sorted(state["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizer
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    save("llama2", tok, {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                         "add_bos_token": True, "add_eos_token": False, "legacy": False, "clean_up_tokenization_spaces": False})

    # Llama-3: byte-level BPE with a tiktoken-like split, "<|begin_of_text|>" prepended.
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(lines, trainer)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                                      special_tokens=[("<|begin_of_text|>", 0)]),
    ])
    save("llama3", tok, {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
                         "eos_token": "<|end_of_text|>", "clean_up_tokenization_spaces": True,
                         "model_max_length": 131072,
                         "chat_template": "{% for m in messages %}<|begin_of_text|>{{ m['content'] }}{% endfor %}"})

    # GPT-2: byte-level BPE with its own split pattern and "<|endoftext|>".
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(lines, trainer)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    save("gpt2", tok, {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                       "unk_token": "<|endoftext|>", "add_prefix_space": False})

    # T5: a Unigram model with NFKC, Metaspace, and "</s>" appended.
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.Nmt(), normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(vocab_size=300, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False)
    tok.train_from_iterator(lines, trainer)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    save("t5", tok, {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
                     "clean_up_tokenization_spaces": True})

    text = open(args.text, encoding="utf-8").read()
    expected = {}
    for name in ("llama2", "llama3", "gpt2", "t5"):
        t = AutoTokenizer.from_pretrained(f"{args.out}/{name}")
        ids = t(text).input_ids
        expected[name] = {"ids": ids, "decoded": t.decode(ids, skip_special_tokens=True), "class": type(t).__name__}
    json.dump(expected, open(f"{args.out}/expected.json", "w"))
    print(json.dumps({name: len(v["ids"]) for name, v in expected.items()}))


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
    c.add_argument("--arch", choices=sorted(CLASSES), default="llama")
    c.add_argument("--round-trip", action=argparse.BooleanOptionalAction, default=True)
    c.add_argument("--tokenizer-as-is", action="store_true", help="read tokenizer.json itself, not AutoTokenizer's class")
    m = sub.add_parser("make-model")
    m.add_argument("out")
    m.add_argument("--ids", required=True)
    m.add_argument("--arch", choices=sorted(CLASSES), default="llama")
    m.add_argument("--vocab", type=int, default=96)
    m.add_argument("--hidden", type=int, default=64)
    m.add_argument("--intermediate", type=int, default=128)
    m.add_argument("--layers", type=int, default=2)
    m.add_argument("--heads", type=int, default=4)
    m.add_argument("--kv-heads", type=int, default=4)
    m.add_argument("--max-positions", type=int, default=128)
    m.add_argument("--rope-theta", type=float, default=10000.0)
    m.add_argument("--sliding-window", type=int, default=None)
    m.add_argument("--tied", action="store_true")
    m.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    m.add_argument("--shard-size", default="10GB")
    m.add_argument("--new-tokens", type=int, default=20)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--tokenizer-from", help="copy tokenizer files from this directory instead of a char tokenizer")
    m.add_argument("--special-ids", help="BOS,EOS ids to write into config.json and generation_config.json")
    m.add_argument("--torch-bin", choices=["only", "beside-zeroed"], help="also save pytorch_model.bin")
    t = sub.add_parser("make-tokenizers")
    t.add_argument("out")
    t.add_argument("--text", required=True)
    e = sub.add_parser("eval-loss")
    e.add_argument("dir")
    e.add_argument("--ids", required=True)
    e.add_argument("--window", type=int, required=True)
    g = sub.add_parser("generate")
    g.add_argument("dir")
    g.add_argument("--prompt", required=True)
    g.add_argument("--new-tokens", type=int, default=20)
    d = sub.add_parser("check-dtype")
    d.add_argument("reference", help="the float32 export")
    d.add_argument("dir", help="the export in --dtype")
    d.add_argument("--dtype", choices=["float16", "bfloat16"], required=True)
    d.add_argument("--tolerance", type=float, default=0.05, help="relative to the largest float32 logit")
    args = parser.parse_args()
    commands = {"check-bundle": check_bundle, "make-model": make_model, "make-tokenizers": make_tokenizers,
                "eval-loss": eval_loss, "generate": generate, "check-dtype": check_dtype}
    commands[args.command](args)


if __name__ == "__main__":
    main()
