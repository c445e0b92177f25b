"""What a run leaves behind: console progress, metrics.jsonl, TensorBoard events, summary.json; sweep tables/plots."""
