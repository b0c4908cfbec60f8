"""`python encode_latents.py SRC OUT --vae VAE [...]` — shorthand for `python cli.py encode`."""

from vaedec.cli import encode

if __name__ == "__main__":
    encode()
