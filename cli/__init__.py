"""The Typer app behind the `irtrain` console script.

Installed as `irtrain.cli` (``irtrain/cli`` links here), never as a bare
top-level `cli` package.
"""
