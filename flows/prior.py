"""Prefect flow for stage `prior`."""

from flows.stage import main
from genpipe.stages import prior

if __name__ == "__main__":
    main("prior", prior.run)
