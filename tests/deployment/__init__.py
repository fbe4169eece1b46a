"""Tests of real processes and the deployment files."""
