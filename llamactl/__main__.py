"""`python -m llamactl` runs the CLI (used to start a serve in the background)."""

from llamactl.entry import main

main()
