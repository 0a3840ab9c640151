"""Prefect flow for stage `register`."""

from flows.stage import main
from genpipe.stages import register

if __name__ == "__main__":
    main("register", register.run)
