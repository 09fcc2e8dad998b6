"""``python -m amslocal``: the same as the ``amslocal`` command."""

from .cli import main

main(prog_name="amslocal")
