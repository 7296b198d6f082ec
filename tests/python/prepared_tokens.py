"""Checks a dataset `kiln prepare` wrote against Hugging Face `tokenizers` and numpy, and writes
the parquet sources the test prepares (with pyarrow, as real datasets are written).

    python3 prepared_tokens.py check PREPARED_DIR DOCUMENTS.json
    python3 prepared_tokens.py write-parquet OUT.parquet DOCUMENTS.json CODEC [ROW_GROUP_ROWS]

For `check`, DOCUMENTS.json lists each source's documents in order (a list of lists of strings). For every
source, its shards (read with numpy as the manifest's dtype, little-endian, no header) must
hold exactly `tokenizer.encode(doc, add_special_tokens=False).ids + [eos]` for each document,
in order; each shard's SHA-256 and token count must be the manifest's. Prints a JSON summary;
exits 1 on the first difference, saying where. For `write-parquet` it is a list of documents
(strings, or null for a null row), written as the column `text` beside an `id` column.
"""

import hashlib
import json
import os
import sys

try:
    import numpy as np
    from tokenizers import Tokenizer
except ImportError as e:  # pragma: no cover - the test says what to install
    print(f"prepared_tokens: needs numpy and tokenizers: {e}", file=sys.stderr)
    sys.exit(2)


def fail(message):
    print(f"prepared_tokens: {message}", file=sys.stderr)
    sys.exit(1)


def write_parquet(out, documents_path, codec, row_group_rows):
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover
        print(f"prepared_tokens: needs pyarrow: {e}", file=sys.stderr)
        sys.exit(2)
    with open(documents_path) as f:
        documents = json.load(f)
    table = pa.table({"id": list(range(len(documents))), "text": pa.array(documents, type=pa.string())})
    pq.write_table(table, out, compression=codec, row_group_size=row_group_rows)


def main():
    if sys.argv[1] == "write-parquet":
        rows = int(sys.argv[5]) if len(sys.argv) > 5 else 1 << 20
        write_parquet(sys.argv[2], sys.argv[3], sys.argv[4], rows)
        return
    assert sys.argv[1] == "check", sys.argv
    prepared, documents_path = sys.argv[2], sys.argv[3]
    with open(os.path.join(prepared, "manifest.json")) as f:
        manifest = json.load(f)
    with open(documents_path) as f:
        sources = json.load(f)
    tokenizer = Tokenizer.from_file(os.path.join(prepared, "tokenizer.json"))
    dtype = {"u16": "<u2", "u32": "<u4"}[manifest["dtype"]]
    eos = manifest["eos_token_id"]
    if len(sources) != len(manifest["sources"]):
        fail(f"{len(manifest['sources'])} sources in the manifest, {len(sources)} expected")
    for index, documents in enumerate(sources):
        shards = [s for s in manifest["shards"] if s["source"] == index]
        parts = []
        for shard in shards:
            path = os.path.join(prepared, shard["path"])
            with open(path, "rb") as f:
                data = f.read()
            if hashlib.sha256(data).hexdigest() != shard["sha256"]:
                fail(f"{path}: SHA-256 differs from the manifest's")
            tokens = np.frombuffer(data, dtype=dtype)
            if len(tokens) != shard["num_tokens"]:
                fail(f"{path}: {len(tokens)} tokens, the manifest says {shard['num_tokens']}")
            parts.append(tokens.astype(np.int64))
        got = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        expected = []
        for doc in documents:
            expected.extend(tokenizer.encode(doc, add_special_tokens=False).ids)
            if eos is not None:
                expected.append(eos)
        expected = np.array(expected, dtype=np.int64)
        if len(got) != len(expected) or not np.array_equal(got, expected):
            n = min(len(got), len(expected))
            first = next((i for i in range(n) if got[i] != expected[i]), n)
            fail(f"source {index}: {len(got)} tokens, expected {len(expected)}; first difference at token {first}")
        entry = manifest["sources"][index]
        if entry["num_tokens"] != len(expected) or entry["num_documents"] != len(documents):
            fail(f"source {index}: manifest counts {entry['num_tokens']} tokens / {entry['num_documents']} documents")
    print(json.dumps({"sources": len(sources), "tokens": manifest["num_tokens"], "shards": len(manifest["shards"])}))


if __name__ == "__main__":
    main()
