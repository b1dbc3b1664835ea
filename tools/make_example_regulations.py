#!/usr/bin/env python3
"""Generate the non-UTF-8 example regulations from the UTF-8 test masters.

Masters (UTF-8, checked in):
    crates/rules/tests/data/site-management.utf8.txt
    crates/rules/tests/data/electrical-safety.utf8.md
Outputs (checked in, regenerate after editing a master):
    examples/regulations/site-management.txt     GB18030-encoded, LF line endings
    examples/regulations/electrical-safety.docx  Word document built with python-docx

Usage (from anywhere; paths are resolved relative to the repository root):
    python3 -m venv /work/venv-docx
    /work/venv-docx/bin/pip install python-docx
    /work/venv-docx/bin/python tools/make_example_regulations.py

Last run with python-docx 1.2.0 (lxml 6.1.3) on Python 3.11.7.

Docx mapping: a "# " line becomes a paragraph with style 'Title', a "## " line
becomes style 'Heading 1' (the Markdown '#' markers are stripped), and every
other non-empty line becomes one normal paragraph. Blank lines are dropped.
"""

from pathlib import Path

import docx

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "crates" / "rules" / "tests" / "data"
OUT = ROOT / "examples" / "regulations"


def write_gb18030(src: Path, dst: Path) -> None:
    text = src.read_text(encoding="utf-8")
    # newline="\n" keeps LF line endings on every platform.
    with open(dst, "w", encoding="gb18030", newline="\n") as f:
        f.write(text)


def write_docx(src: Path, dst: Path) -> None:
    document = docx.Document()
    for raw in src.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith("## "):
            document.add_paragraph(line[3:].strip(), style="Heading 1")
        elif line.startswith("# "):
            document.add_paragraph(line[2:].strip(), style="Title")
        else:
            document.add_paragraph(line)
    document.save(dst)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    write_gb18030(DATA / "site-management.utf8.txt", OUT / "site-management.txt")
    write_docx(DATA / "electrical-safety.utf8.md", OUT / "electrical-safety.docx")
    print(f"wrote {OUT / 'site-management.txt'}")
    print(f"wrote {OUT / 'electrical-safety.docx'}")


if __name__ == "__main__":
    main()
