"""Tests of site_client."""
