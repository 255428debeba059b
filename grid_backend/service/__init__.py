"""The grid service: hosts secure elements and serves them to authenticated callers."""
