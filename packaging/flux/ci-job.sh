#!/bin/bash
# The same CI job under Flux: `flux run` hands the task its cores (the shell's
# cpu-affinity, on by default) and GPUs (its gpu-affinity plugin sets
# CUDA_VISIBLE_DEVICES and CUDA_DEVICE_ORDER=PCI_BUS_ID); the job's private rpool-agent
# shares exactly those. See docs/cluster.md.
#
#   flux run -N1 -n1 -c32 -g4 packaging/flux/ci-job.sh
#   flux batch -N1 --wrap flux run -n1 -c32 -g4 packaging/flux/ci-job.sh
set -euo pipefail

harnesses() {
  rpool-agent run --gpus 2 -- ctest --test-dir build --resource-spec-file {ctest_spec} -j8 &
  local ctest=$!
  rpool-agent run --gpus 2 --cpus 2 -- canary --resource-pool-file {pool_nodes} run tests/ &
  local canary=$!
  local status=0
  for pid in "$ctest" "$canary"; do
    wait "$pid" || status=$?
  done
  return "$status"
}
export -f harnesses

# The job shell's own temporary directory, removed with the job: the agent's goes there.
export TMPDIR="${FLUX_JOB_TMPDIR:-${TMPDIR:-/tmp}}"
exec rpool-agent job -- bash -c harnesses
