"""The README's Python examples run as pasted into a fresh ``python`` prompt.

Each ```python block is fed, line by line, to an interactive console in a new
interpreter, as a paste into the prompt is: a compound statement must end in a
blank line before the next statement, no ``>>>`` prompts, no names from an
earlier block.
"""

import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
BLOCKS = re.findall(
  r"^```python\n(.*?)^```", (ROOT / "README.md").read_text("utf-8"), re.M | re.S
)

_CONSOLE = """
import code
import sys


class Console(code.InteractiveConsole):
  failed = False

  def showtraceback(self):
    Console.failed = True
    super().showtraceback()

  def showsyntaxerror(self, *args, **kwargs):
    Console.failed = True
    super().showsyntaxerror(*args, **kwargs)


console = Console()
more = False
for line in sys.stdin.read().splitlines():
  more = console.push(line)
if more:
  console.push("")
sys.exit(1 if Console.failed else 0)
"""


def test_the_readme_has_a_python_example():
  assert BLOCKS


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_example_runs_when_pasted_into_a_fresh_prompt(index):
  block = BLOCKS[index]
  assert ">>>" not in block, "a pasted `>>>` prompt is a syntax error"
  result = subprocess.run(
    [sys.executable, "-c", _CONSOLE],
    input=block,
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert result.returncode == 0, (
    f"README example {index + 1} fails when pasted:\n{result.stderr[-3000:]}"
  )
