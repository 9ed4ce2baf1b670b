import sys

from dsv3_jax.aot.cli import main

sys.exit(main())
