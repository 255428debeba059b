"""Prints, as JSON, fresh identity tokens for the grid (the module's own gate, from the
module config in $P11GRID_CONF): for tests that speak the grid protocol by hand. Run as a
child process, so that the test process never loads the hypervisor token's SoftHSM2."""

from __future__ import annotations

import json

from provider import config as module_config
from provider.module import _authorizer

config = module_config.load()
assert config.identity is not None and config.grid is not None
print(json.dumps(_authorizer(config.identity, config.grid.certificate)()))
