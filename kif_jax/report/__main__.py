"""`python -m kif_jax.report <workdir>`: rebuild the comparison report of a finished run."""
import sys

from kif_jax.report.markdown import main

sys.exit(main())
