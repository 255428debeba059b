"""Tests against real peers."""
