"""The `p11grid` command: operator tools and the sandbox that builds a ready-to-use world."""
