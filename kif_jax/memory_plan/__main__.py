"""`python -m kif_jax.memory_plan`: the command's body is `kif_jax.cli.memory_plan_main` (one flag parser for
both commands); the plan itself (this package) imports neither the command line nor the training code."""
from kif_jax.cli import memory_plan_main

raise SystemExit(memory_plan_main())
