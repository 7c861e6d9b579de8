"""`python -m kdforge ...` is the `kdforge` command (what torchrun and subprocess-based benchmarks launch)."""
import sys

from kdforge.cli import main

sys.exit(main())
