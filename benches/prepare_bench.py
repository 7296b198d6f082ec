"""The data section's Python side for benches/kiln_bench.rs.

    corpus OUT MB         writes about MB megabytes (MiB) of documents from data/shakespeare.txt,
                          half as jsonl files under OUT/jsonl, half as parquet under OUT/parquet;
                          prints one JSON line: bytes on disk, bytes of text
    reference TOKENIZER EOS OUT FILE...
                          tokenizes the files as nanoGPT's prepare.py does (HF tokenizers'
                          encode_batch on all threads, EOS after each document, numpy uint16
                          tofile) and prints one JSON line: seconds, tokens, sha256

Needs numpy, tokenizers and pyarrow (`bash scripts/test.sh` puts them in .venv).
"""

import hashlib
import json
import os
import sys
import time
from pathlib import Path

# Documents are grouped into files of about this many bytes, as corpora usually ship.
FILE_BYTES = 32 << 20
# About this many bytes are tokenized per encode_batch call, as kiln does.
BATCH_BYTES = 8 << 20


def documents(target_bytes):
    """Shakespeare's paragraphs grouped into documents of about 3 kB, cycled until the target.

    After the first pass, one word in twenty is replaced by a seeded random one, so that the
    corpus keeps a long tail of words never seen before, as real corpora do, rather than
    repeating 5 MB (which would flatter any tokenizer's cache)."""
    import random

    rng = random.Random(0)
    text = (Path(__file__).resolve().parent.parent / "data" / "shakespeare.txt").read_text()
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    letters = "abcdefghijklmnopqrstuvwxyz"
    written, doc, first = 0, [], True

    def perturb(p):
        words = p.split(" ")
        for i in range(len(words)):
            if rng.random() < 0.05:
                words[i] = "".join(rng.choice(letters) for _ in range(rng.randint(3, 10)))
        return " ".join(words)

    while written < target_bytes:
        for p in paragraphs:
            doc.append(p if first else perturb(p))
            if sum(len(d) for d in doc) >= 3000:
                body = "\n\n".join(doc)
                doc = []
                written += len(body.encode())
                yield body
                if written >= target_bytes:
                    return
        first = False


def corpus(out, mb):
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out)
    (out / "jsonl").mkdir(parents=True, exist_ok=True)
    (out / "parquet").mkdir(parents=True, exist_ok=True)
    total = int(mb * (1 << 20))
    docs = documents(total)
    text_bytes = 0
    for kind, budget in (("jsonl", total // 2), ("parquet", total - total // 2)):
        index, done = 0, 0
        while done < budget:
            batch, size = [], 0
            for d in docs:
                batch.append(d)
                size += len(d.encode())
                if size >= min(FILE_BYTES, budget - done):
                    break
            if not batch:
                break
            path = out / kind / f"part-{index:03}.{kind}"
            if kind == "jsonl":
                with open(path, "w") as f:
                    for d in batch:
                        f.write(json.dumps({"text": d}) + "\n")
            else:
                pq.write_table(pa.table({"text": batch}), path, row_group_size=4096)
            index += 1
            done += size
            text_bytes += size
    print(json.dumps({"bytes": sum(f.stat().st_size for f in out.rglob("part-*")), "text_bytes": text_bytes}))


def read_documents(path):
    if path.endswith(".jsonl"):
        with open(path) as f:
            return [json.loads(line)["text"] for line in f if line.strip()]
    import pyarrow.parquet as pq

    return pq.read_table(path, columns=["text"]).column("text").to_pylist()


def reference(tokenizer_path, eos, out, files):
    import numpy as np
    from tokenizers import Tokenizer

    start = time.perf_counter()
    tok = Tokenizer.from_file(tokenizer_path)
    eos = int(eos)
    sha = hashlib.sha256()
    tokens = 0
    with open(out, "wb") as f:
        for path in files:
            docs = read_documents(path)
            i = 0
            while i < len(docs):
                j, size = i, 0
                while j < len(docs) and size < BATCH_BYTES:
                    size += len(docs[j])
                    j += 1
                encoded = tok.encode_batch(docs[i:j], add_special_tokens=False)
                flat = []
                for e in encoded:
                    flat.extend(e.ids)
                    flat.append(eos)
                ids = np.array(flat, dtype=np.uint16)
                ids.tofile(f)
                sha.update(ids.tobytes())
                tokens += len(ids)
                i = j
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "tokens": tokens, "sha256": sha.hexdigest(), "threads": os.cpu_count()}))


def main():
    if len(sys.argv) >= 4 and sys.argv[1] == "corpus":
        corpus(sys.argv[2], float(sys.argv[3]))
    elif len(sys.argv) >= 6 and sys.argv[1] == "reference":
        reference(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
