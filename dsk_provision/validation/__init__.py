"""`dsk-provision validate`: is the cluster healthy and fast, and if not, which node is to blame.

  flow          the validate command: thresholds, facts, probes, checks, report
  profiles      hardware profiles (profiles/*.yml) and the thresholds they set
  parsers       raw node outputs (nvidia-smi, kernel log, InfiniBand, dcgmi, nccl-tests)
  node_checks   one node's facts against thresholds and inventory pins
  bench_checks  all-reduce and compute benchmark results against thresholds
  probes        the measurements run on the nodes (all-reduce, compute, nccl-tests)
  isolation     pairs of nodes to name the slow node or link
  results       CheckResult, shared by all of the above
  report, plots report.json, report.md and the busbw plot
"""
