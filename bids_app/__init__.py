"""The rwcflow BIDS App (installed as ``rwcflow.bids_app``)."""
