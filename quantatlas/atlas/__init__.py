"""The atlas ledger: experiments, runs, statistical verdicts, confidence, reproductions,
duplicates. Imports no torch, so a server that only hosts the atlas stays light.

    from quantatlas.atlas import Ledger, environment_key
"""
from quantatlas.atlas.ids import environment_key
from quantatlas.atlas.ledger import Ledger, LedgerError

__all__ = ["Ledger", "LedgerError", "environment_key"]
