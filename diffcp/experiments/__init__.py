"""Entry points of the experiments: settings in, results of record (``book/_data/*.json``) out."""
