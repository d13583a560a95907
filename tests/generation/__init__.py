"""Tests of torchft.generation."""
