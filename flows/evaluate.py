"""Prefect flow for stage `evaluate`."""

from flows.stage import main
from genpipe.stages import evaluate

if __name__ == "__main__":
    main("evaluate", evaluate.run)
