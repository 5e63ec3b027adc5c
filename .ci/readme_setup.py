"""Print one of the README's set-up commands, read mechanically from README.md so CI cannot drift from it.

    python .ci/readme_setup.py README.md 1     # the first fenced bash block under "## Set-up": the main job
    python .ci/readme_setup.py README.md 2     # the second: the tests

Exits non-zero (naming what is missing) when the section or the block is not there.
"""
import re
import sys


def setup_blocks(text: str) -> list[str]:
    section = re.search(r"^## Set-up\n(.*?)(?=^## )", text, re.S | re.M)
    if section is None:
        raise SystemExit("README.md has no '## Set-up' section")
    return [b.strip() for b in re.findall(r"^```bash\n(.*?)^```", section.group(1), re.S | re.M)]


if __name__ == "__main__":
    path, number = sys.argv[1], int(sys.argv[2])
    blocks = setup_blocks(open(path, encoding="utf-8").read())
    if len(blocks) < number:
        raise SystemExit(f"{path}: '## Set-up' has {len(blocks)} bash block(s); block {number} was asked for")
    print(blocks[number - 1])
