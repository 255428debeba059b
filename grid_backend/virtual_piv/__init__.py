"""A virtual PIV card (NIST SP 800-73-4) for tests, plugged into pcscd through vpcd.

`applet.PivApplet` is the card: it answers command APDUs from a persistent `CardState`.
`vpicc` connects it to vsmartcard's vpcd driver; `python -m grid_backend.virtual_piv`
runs it (`init` creates a card first). See `__main__.py` for the command line.
"""
