"""Prefect flow for stage `tokenizer`."""

from flows.stage import main
from genpipe.stages import tokenizer

if __name__ == "__main__":
    main("tokenizer", tokenizer.run)
