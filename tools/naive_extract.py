#!/usr/bin/env python3
"""The naive baseline for `cargo bench -p inspector-rules --bench extract`.

The approach of the well-known tutorial this product grows from: read each regulation file as
UTF-8 and run two regular expressions over it, `第(\\d+)条` and `(\\d+\\.\\d+)`. It misses
Chinese numerals, counts a nested clause twice and reads no Word or PDF files; it is here only
as a speed reference. Prints one JSON line: bytes, seconds (reading + matching, interpreter
start-up excluded), and matches found.

Usage: python3 tools/naive_extract.py DIR   (standard library only)
"""
import json
import os
import re
import sys
import time

ARTICLE = re.compile(r"第(\d+)条")
CLAUSE = re.compile(r"(\d+\.\d+)")


def main() -> None:
    folder = sys.argv[1]
    paths = sorted(os.path.join(folder, f) for f in os.listdir(folder))
    start = time.perf_counter()
    total_bytes = 0
    matches = 0
    for path in paths:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        total_bytes += len(text.encode("utf-8"))
        matches += len(ARTICLE.findall(text)) + len(CLAUSE.findall(text))
    seconds = time.perf_counter() - start
    print(json.dumps({"bytes": total_bytes, "seconds": seconds, "matches": matches}))


if __name__ == "__main__":
    main()
