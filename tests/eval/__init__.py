"""Tests of torchft.eval."""
