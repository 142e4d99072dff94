"""The commented configuration `ember sim --example-config` prints: every setting at its default."""

EXAMPLE_CONFIG = """\
# Ember simulator configuration (YAML). Run: ember sim --config THIS_FILE [--json out.json]
# Every value below is its default; delete what you do not change. All numbers are modelled
# parameters of a hypothetical cluster, not measurements: results are simulated.

seed: 1                      # same seed -> same workload and same results
policies: [ember, ember-no-migration, serverlessllm, kserve, rayserve]
loads: []                    # request rates (req/s) to sweep, e.g. [2, 6, 12]; empty = workload.rate_rps
heartbeat_interval_s: 2.0    # how often nodes report request counts (the controller's default)
memory_factor: 1.2           # GPU memory of an instance / checkpoint size (the controller's default)

cluster:
  nodes: 16
  gpus_per_node: 8
  gpu_memory_gb: 80.0        # A100/H100 80 GB class
  dram_gb: 512.0             # per node, DRAM checkpoint cache
  disk_gb: 2000.0            # per node, NVMe checkpoint cache
  dram_gbps: 20.0            # DRAM -> GPU (PCIe 4.0 x16 is ~25 GB/s peak)
  disk_gbps: 5.0             # NVMe -> GPU (a fast NVMe or a small RAID)
  s3_gbps: 1.5               # remote storage -> node (a 12-25 Gb/s share of the network)
  network_gbps: 12.5         # node -> node for KV migration (100 Gb/s)
  bandwidth_jitter: 0.1      # each node's bandwidths differ by up to +-10 % (seeded)
  prestaged_disk_copies: 1   # each checkpoint starts on the disk cache of this many nodes (0 = cold cluster)

gpu:                         # roofline constants for inference time (see docs/simulation.md)
  tflops: 312.0              # dense bf16 peak
  mfu: 0.5                   # share of it a prefill reaches
  hbm_gbps: 2039.0
  hbm_efficiency: 0.6        # share of HBM bandwidth a decode step reaches

models:
  count: 100                 # model-000 (most popular) ... model-099
  mix: {7b: 0.4, 13b: 0.3, 34b: 0.2, 70b: 0.1}   # shapes: 7b 8b 13b 34b 70b (Llama family)
  init_s: 2.0                # init after weights are on the GPU ...
  init_s_per_billion: 0.02   # ... plus this per billion parameters
  entries: []                # explicit models, e.g. [{name: chat, shape: 70b}] (for CSV traces)

deployment:                  # every model's deployment settings (as `ember deploy` takes them)
  min_instances: 0
  max_instances: 4
  target_concurrency: 8
  keep_alive_s: 60.0
  queue_limit: 100
  request_timeout_s: 300.0

workload:                    # modelled on Azure Functions and BurstGPT shapes; NOT real trace data
  duration_s: 3600.0
  rate_rps: 4.0              # mean requests/s over all models
  popularity_zipf: 1.1       # model k gets a share ~ k^-1.1
  arrivals: gamma            # gamma | weibull | mmpp | poisson, per model
  cv: 4.0                    # gamma: coefficient of variation of gaps (> 1 = bursty)
  weibull_shape: 0.5         # weibull: shape (< 1 = bursty)
  mmpp_on_s: 60.0            # mmpp: mean active period
  mmpp_off_s: 600.0          # mmpp: mean silent period
  input_tokens: {dist: zipf, alpha: 1.5, scale: 64.0, median: 200.0, sigma: 0.9, value: 128, min: 1, max: 4096}
  output_tokens: {dist: lognormal, alpha: 1.5, scale: 64.0, median: 200.0, sigma: 0.9, value: 128, min: 1, max: 2048}
  trace: null                # or a CSV file: timestamp,model,input_tokens,output_tokens

migration:                   # the planner of the ember and serverlessllm policies
  min_gain_s: 1.0            # migrate only when it beats the best free node by this much
  max_targets: 4             # full nodes examined per decision
  recompute_overhead_s: 0.05 # b in a*(tokens_in + tokens_out) + b (a = the model's prefill time per token)
  kv_overhead_s: 0.05        # c in kv_bytes / network bandwidth + c

baselines:
  safetensors_efficiency: 0.3  # kserve/rayserve loader speed / disk bandwidth (MEASURED.md: 0.44 vs ~1.4 GB/s)
  serverlessllm_poll_s: 1.0    # serverlessllm scale-out decisions wait for the next tick
"""
