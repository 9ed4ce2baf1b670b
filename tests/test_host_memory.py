"""keep_freed_memory (dsv3_jax/host_memory.py): XLA:CPU's per-call temporaries stop page-faulting.

Each case runs in a child process: the malloc settings are process-wide and must be made before
JAX starts its CPU client.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent("""
    import json, resource, sys
    from dsv3_jax.host_memory import keep_freed_memory
    applied = keep_freed_memory() if sys.argv[1] == "keep" else False
    import jax, jax.numpy as jnp
    x = jnp.ones((4096, 4096), jnp.float32)  # 64 MB: temporaries above glibc's mmap threshold
    f = jax.jit(lambda x: jnp.sum(jnp.sin(x) * jnp.cumsum(jnp.cos(x), axis=0)))
    temp = f.lower(x).compile().memory_analysis().temp_size_in_bytes
    faults = []
    for _ in range(30):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        f(x).block_until_ready()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps({"applied": applied, "temp": temp, "faults": faults}))
""")


def _transparent_hugepages() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read()
    except OSError:
        return ""


def _run(mode: str) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    out = subprocess.run([sys.executable, "-c", CHILD, mode], env=env, capture_output=True,
                         text=True, timeout=300, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_temporaries_are_reused_instead_of_page_faulted_on_every_call():
    plain, kept = _run("plain"), _run("keep")
    pages = plain["temp"] // os.sysconf("SC_PAGE_SIZE")
    assert plain["temp"] > 64 << 20
    # the premise: by default every call faults its temporaries in again, page by page (with
    # transparent huge pages always on, 2 MB at a time: far fewer faults)
    if "[always]" not in _transparent_hugepages():
        assert min(plain["faults"][-5:]) > pages // 2, plain
    # kept: the heap grows over the first few calls (glibc's aligned allocations need a freed
    # chunk a little larger than the request), then the temporaries are the previous call's
    assert kept["applied"] is True
    assert max(kept["faults"][-5:]) < pages // 100, kept
