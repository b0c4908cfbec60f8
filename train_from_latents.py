"""`python train_from_latents.py SHARDS --config CFG [...]` — shorthand for `python cli.py train`."""

from vaedec.cli import train

if __name__ == "__main__":
    train()
