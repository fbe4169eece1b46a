"""Tests of anonymization."""
