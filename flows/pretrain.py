"""Prefect flow for stage `pretrain`."""

from flows.stage import main
from genpipe.stages import pretrain

if __name__ == "__main__":
    main("pretrain", pretrain.run)
