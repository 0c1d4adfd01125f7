"""driverd: syringe-driver daemon for burst subcutaneous ketamine courses."""

__version__ = "0.1.0"
