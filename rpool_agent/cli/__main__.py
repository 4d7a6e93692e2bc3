"""`python -m rpool_agent.cli`: the same as the `rpool-agent` script."""

from . import main

main()
