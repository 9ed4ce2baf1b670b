"""Test setup: 8 fake CPU devices (set before JAX initialises) and fixture paths."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

FIXTURES = Path(__file__).parent / "fixtures" / "data"
ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.exists():
        pytest.fail(f"golden fixtures missing at {FIXTURES}: run tests/fixtures/make_fixtures.py")
    return FIXTURES


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    """Drop each module's compiled programs when it ends. XLA:CPU maps the code of every
    executable into the process (a few mappings each); the whole suite in one process passed
    Linux's vm.max_map_count (65,530), after which compiles and serialisations segfaulted
    (the serving tests alone reach ~32,000)."""
    yield
    import gc
    jax.clear_caches()
    gc.collect()
