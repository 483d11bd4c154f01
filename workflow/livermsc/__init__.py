"""livermsc: test the mechanisms claimed for MSC therapy in liver scRNA-seq data."""

__version__ = "0.1.0"
