"""Identity management: the IAM root CA, VM-/APP-Auth-Tokens, the OpenID provider, the
module's identity gate and the grid's three-element check (the lowest room: it imports
nothing else of ours)."""
