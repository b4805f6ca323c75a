"""`python -m model`."""
from .cli import main

main()
