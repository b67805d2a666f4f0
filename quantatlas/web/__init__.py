"""The atlas on the web: a FastAPI app over the ledger (pages and a JSON API). Imports no torch.

    from quantatlas.web import create_app
    app = create_app("sqlite:///runs/atlas.db")
"""
__all__ = ["create_app"]


def __getattr__(name):          # lazy: `quantatlas.web.records` alone need not import FastAPI
    if name == "create_app":
        from quantatlas.web.app import create_app

        return create_app
    raise AttributeError(name)
