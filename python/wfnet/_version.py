"""The package version, in one place (imported by the modules that record it, never via the package __init__)."""
__version__ = "0.1.0"
