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
