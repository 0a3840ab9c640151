"""The one list of data sources: each name and where its loader lives ("module:function").

`base.source` in params and `genpipe data fetch` take their choices from it without importing
any loader, so a stage that reads params imports this file only, not the loaders (and their
dependencies) it would otherwise have to list as DVC deps."""

SOURCES: dict[str, str] = {
    "digits": "genpipe.data.sources:digits",
    "mnist": "genpipe.data.mnist:mnist",
    "fashion_mnist": "genpipe.data.sources:fashion_mnist",
    "cifar10": "genpipe.data.sources:cifar10",
    "folder": "genpipe.data.sources:folder",
}
