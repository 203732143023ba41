"""Test support shared by the test modules and scripts: real serves, the soak's clients."""
