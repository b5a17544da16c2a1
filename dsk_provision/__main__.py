"""`python -m dsk_provision` runs the CLI."""

from dsk_provision.cli import main

main()
