"""Mend the paragraph macros scdoc writes around headings and indented blocks.

scdoc puts a `.P` after every heading, where it does nothing, and closes each indented
block with `.P` then `.RE`, where the `.P` is empty: mandoc -Tlint warns about both
("skipping paragraph macro"), and the text after the block runs on without a blank line.
So the first kind is dropped and the second moved after the `.RE`. Reads roff on stdin,
writes it to stdout.
"""

import sys

HEADINGS = (".TH ", ".SH ", ".SS ")
ENDS_A_PARAGRAPH = (".SH ", ".SS ", ".RE", ".P")


def tidy(lines: list[str]) -> list[str]:
    out: list[str] = []
    lines = _after_blocks(lines)
    for i, line in enumerate(lines):
        if line.rstrip() == ".P":
            after = lines[i + 1] if i + 1 < len(lines) else ""
            before = out[-1] if out else ""
            if before.startswith(HEADINGS) or after.startswith(ENDS_A_PARAGRAPH) or not after:
                continue
        out.append(line)
    return out


def _after_blocks(lines: list[str]) -> list[str]:
    """ ".P, .RE" -> ".RE, .P": the paragraph break belongs after the block."""
    out = list(lines)
    for i in range(len(out) - 1):
        if out[i].rstrip() == ".P" and out[i + 1].rstrip() == ".RE":
            out[i], out[i + 1] = out[i + 1], out[i]
    return out


if __name__ == "__main__":
    sys.stdout.writelines(tidy(sys.stdin.readlines()))
