"""``python -m marvin_faust``: the ``marvin-faust`` command."""

from .app import main

if __name__ == "__main__":
    main()
