"""Command-line programs: scan-cluster (cluster.py), scan-bench (bench.py), scan-predict
(predict.py), scan-weights (weights.py); overrides.py is the config syntax they share."""
