"""Prints the lowest declared version of every requirement the tests need.

Reads pyproject.toml: the runtime dependencies and the `cli`, `equinox` and
`test` extras (the documentation and packaging tools aside), each `name>=v`
becoming `name==v`.
"""

import re
import sys
import tomllib

EXTRAS = ("cli", "equinox", "test")
NOT_NEEDED = {"nso_jax", "sphinx", "sphinx-book-theme", "myst-parser", "mypy", "build"}

with open(sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml", "rb") as file:
  project = tomllib.load(file)["project"]
requirements = list(project["dependencies"])
for extra in EXTRAS:
  requirements += project["optional-dependencies"][extra]
for requirement in requirements:
  match = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*>=\s*([^,;\s]+)", requirement)
  name = re.match(r"[A-Za-z0-9_.-]+", requirement).group(0)
  if name in NOT_NEEDED:
    continue
  if match is None:
    sys.exit(f"no lower bound to test in requirement {requirement!r}")
  print(f"{match.group(1)}=={match.group(3)}")
