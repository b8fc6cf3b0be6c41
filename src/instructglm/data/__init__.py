"""Data components: readers per input format -> one record type, templates, convert, stats, tokenize."""
