"""Prefect flow for stage `finetune`."""

from flows.stage import main
from genpipe.stages import finetune

if __name__ == "__main__":
    main("finetune", finetune.run)
