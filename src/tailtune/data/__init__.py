"""Data sources, long-tail construction, splits and the datamodule."""
