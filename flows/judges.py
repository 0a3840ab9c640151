"""Prefect flow for stage `judges`."""

from flows.stage import main
from genpipe.stages import judges

if __name__ == "__main__":
    main("judges", judges.run)
