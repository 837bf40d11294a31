"""Test helpers shared by official_conadv tests (not used by the library)."""
