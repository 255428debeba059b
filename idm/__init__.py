"""Identity management: IAM root CA, VM-/APP-Auth-Tokens, OpenID provider (later issues)."""
