"""Tests of medfed."""
