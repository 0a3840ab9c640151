"""Prefect flow for stage `tokenize`."""

from flows.stage import main
from genpipe.stages import tokenize

if __name__ == "__main__":
    main("tokenize", tokenize.run)
