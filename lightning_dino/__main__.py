"""``python -m lightning_dino`` runs the ``lightning-dino`` command."""

from lightning_dino.cli import main

if __name__ == "__main__":
    main()
