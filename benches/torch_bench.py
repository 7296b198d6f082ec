#!/usr/bin/env python3
"""PyTorch / transformers / safetensors side of kiln's benchmark (benches/kiln_bench.rs).

Each subcommand runs one measurement and prints one JSON line. The Rust harness calls it in
alternation with kiln's own measurements, so both see the same machine state.

  train     tokens/s of LlamaForCausalLM + AdamW (eager, float32, or --precision bf16: autocast
            with fp32 master weights, as kiln's training.precision) on the given shape, on the
            CPU or (--device cuda) a GPU
  save      seconds for safetensors save_file (+ fsync) of the tensors of a file set
  load      seconds for safetensors load_file of a file set into torch tensors
  generate  tokens/s of transformers generate (greedy, KV cache)
"""

import argparse
import contextlib
import json
import os
import sys
import time

import torch


def llama(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(args.seq_len, 256) + args.new_tokens,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(args):
    device = torch.device(args.device)
    # float32 end to end, as kiln trains: no TF32 tensor-core shortcut for matmuls.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = llama(args).to(device)
    model.train()
    # PyTorch's AdamW defaults differ from kiln's config; set them to the same values.
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    g = torch.Generator().manual_seed(1)
    batches = [
        torch.randint(0, args.vocab, (args.batch, args.seq_len + 1), generator=g).to(device)
        for _ in range(args.warmup + args.steps)
    ]

    def autocast():
        if args.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=torch.bfloat16)

    def step(b):
        with autocast():
            out = model(input_ids=b[:, :-1], labels=None)
            logits = out.logits.float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, args.vocab), b[:, 1:].reshape(-1))
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()

    for b in batches[: args.warmup]:
        step(b)
    # GPU work is queued asynchronously: drain the queue before starting and stopping the clock.
    sync(device)
    # --profile: where the time goes, for comparison with kiln's own profile (docs/BENCHMARKS.md).
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    profiler = torch.profiler.profile(activities=activities) if args.profile else contextlib.nullcontext()
    start = time.perf_counter()
    with profiler:
        for b in batches[args.warmup :]:
            step(b)
        sync(device)
    seconds = time.perf_counter() - start
    if args.profile:
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(profiler.key_averages().table(sort_by=sort, row_limit=25), file=sys.stderr)
    tokens = args.steps * args.batch * args.seq_len
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(json.dumps({"tokens_per_sec": tokens / seconds, "seconds": seconds, "device": name, "torch": torch.__version__}))


def save(args):
    from safetensors.torch import load_file, save_file

    tensors = {}
    for f in args.files:
        tensors.update({f"{os.path.basename(f)}:{k}": v for k, v in load_file(f).items()})
    out = args.out
    start = time.perf_counter()
    save_file(tensors, out, metadata={"format": "pt"})
    fd = os.open(out, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    seconds = time.perf_counter() - start
    size = os.path.getsize(out)
    os.remove(out)
    print(json.dumps({"seconds": seconds, "bytes": size}))


def load(args):
    from safetensors.torch import load_file

    start = time.perf_counter()
    total = 0
    for f in args.files:
        tensors = load_file(f)
        # Touch every tensor so lazily mapped pages are really read.
        total += sum(float(t.float().sum()) for t in tensors.values())
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "checksum": total}))


def generate(args):
    model = llama(args).eval()
    prompt = torch.randint(0, args.vocab, (1, args.seq_len), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(prompt)
    with torch.no_grad():
        model.generate(prompt, attention_mask=mask, do_sample=False, max_new_tokens=8, pad_token_id=0)
        start = time.perf_counter()
        out = model.generate(
            prompt, attention_mask=mask, do_sample=False, max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens, pad_token_id=0,
        )
        seconds = time.perf_counter() - start
    new = out.shape[1] - prompt.shape[1]
    print(json.dumps({"tokens_per_sec": new / seconds, "seconds": seconds}))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("command", choices=["train", "save", "load", "generate"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu or cuda (train only)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="train: autocast to bf16")
    p.add_argument("--profile", action="store_true", help="train: print torch.profiler's table to stderr")
    p.add_argument("--vocab", type=int, default=84)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--intermediate", type=int, default=384)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=100)
    p.add_argument("--files", nargs="*", default=[])
    p.add_argument("--out", default="/tmp/kiln-bench-torch.safetensors")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    {"train": train, "save": save, "load": load, "generate": generate}[args.command](args)


if __name__ == "__main__":
    main()
