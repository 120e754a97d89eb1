"""The package builds as a wheel and an sdist that install and work.

Each distribution is installed into a fresh virtual environment that sees
the dependencies installed for the tests (their site-packages folders added
to its path; the project itself is not importable from there), then imported
and used once.
"""

import importlib.metadata
import pathlib
import site
import subprocess
import sys
import venv

import pytest
from optional import require

import nso_jax

ROOT = pathlib.Path(__file__).resolve().parent.parent

SMOKE = """
import jax, jax.numpy as jnp, optax, nso_jax, pathlib, sys
assert nso_jax.__file__.startswith(sys.prefix), nso_jax.__file__
tx = nso_jax.nso(optax.sgd(0.1), sigma=0.01, num_perturbations=2, key=0)
params = jnp.ones(3)
updates, _ = tx.update(None, tx.init(params), params, grad_fn=lambda p: 2 * p)
assert jnp.allclose(updates, -0.2 * params), updates
from nso_jax import hessian
loss = lambda w, x: jnp.sum(x * w**2)
estimate = hessian.trace(loss, params, jnp.ones(3), 0, num_matvecs=2)
assert float(estimate.value) == 6.0
typed = pathlib.Path(nso_jax.__file__).with_name("py.typed")
assert typed.is_file()
print(nso_jax.__version__)
"""


@pytest.fixture(scope="module")
def distributions(tmp_path_factory):
  require("build", reason="the `build` package is part of the test extra")
  out = tmp_path_factory.mktemp("dist")
  result = subprocess.run(
    [sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)],
    capture_output=True,
    text=True,
    timeout=900,
  )
  if (
    result.returncode != 0
    and "Could not find a version" in result.stdout + result.stderr
  ):
    pytest.skip("the build backend cannot be downloaded here")
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return {
    "wheel": next(out.glob("nso_jax-*.whl")),
    "sdist": next(out.glob("nso_jax-*.tar.gz")),
  }


def test_version_is_defined_once():
  assert importlib.metadata.version("nso_jax") == nso_jax.__version__


@pytest.mark.parametrize("kind", ["wheel", "sdist"])
def test_distribution_installs_and_works(distributions, kind, tmp_path):
  environment = tmp_path / "env"
  venv.create(environment, with_pip=True)
  python = environment / "bin" / "python"
  own_site = subprocess.run(
    [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
    capture_output=True,
    text=True,
    check=True,
  ).stdout.strip()
  # Plain path entries: the test environment's .pth files (the editable
  # install of the project among them) are not processed from there.
  pathlib.Path(own_site, "test_dependencies.pth").write_text(
    "\n".join(site.getsitepackages()) + "\n"
  )
  install = subprocess.run(
    [
      str(python),
      "-m",
      "pip",
      "install",
      "--quiet",
      "--no-deps",
      str(distributions[kind]),
    ],
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
  smoke = subprocess.run(
    [str(python), "-c", SMOKE],
    capture_output=True,
    text=True,
    timeout=600,
    cwd=tmp_path,
  )
  assert smoke.returncode == 0, smoke.stderr[-3000:]
  assert smoke.stdout.strip() == nso_jax.__version__
  scripts = list((environment / "bin").glob("nso-jax"))
  assert scripts, "the nso-jax console script is installed"
