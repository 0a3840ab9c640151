"""Prefect flow for stage `prepare`."""

from flows.stage import main
from genpipe.stages import prepare

if __name__ == "__main__":
    main("prepare", prepare.run)
