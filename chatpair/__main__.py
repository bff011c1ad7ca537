"""``python -m chatpair`` runs the same click group as the ``chatpair`` script."""

from chatpair.cli import main

if __name__ == "__main__":
    main()
