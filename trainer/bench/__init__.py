"""Development benchmarks of the trainer (where a step's GPU time goes, attention
backends), run by hand on one GPU. The probes that ``dsk-provision validate`` runs on the
nodes live in trainer/probes."""
