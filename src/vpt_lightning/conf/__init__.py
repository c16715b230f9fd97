"""Packaged Hydra configs of vpt-train (a package so that Hydra finds them as pkg://vpt_lightning.conf)."""
