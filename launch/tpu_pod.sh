#!/usr/bin/env bash
# Runs the same training command on every worker of a Cloud TPU pod slice.
#
#   launch/tpu_pod.sh TPU_NAME ZONE configs/cambrian_4b_image.py:stage=2 gs://bucket/runs/x \
#       [--config.key=value ...]
#
# Each worker installs the repo (with the [tpu] extra) and starts
# `python -m gazejax.train ... --config.distributed.enabled=True`; jax.distributed.initialize() finds the
# coordinator from the TPU metadata, so no address is needed. Logs go to ~/gazejax.log on each
# worker; worker 0 writes metrics and checkpoints to WORKDIR (a GCS path or a shared disk).
set -euo pipefail
if [ $# -lt 4 ]; then
  sed -n '2,10p' "$0"
  exit 2
fi
tpu=$1 zone=$2 config=$3 workdir=$4
shift 4
repo_url=${GAZEJAX_REPO:-$(git config --get remote.origin.url)}
revision=${GAZEJAX_REVISION:-$(git rev-parse HEAD)}
overrides=$(printf ' %q' "$@")

gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "
  set -e
  if [ ! -d gazejax ]; then git clone $repo_url gazejax; fi
  cd gazejax && git fetch -q origin && git checkout -q $revision
  python3 -m venv .venv && .venv/bin/pip install -q -e '.[tpu]'
  nohup .venv/bin/python -m gazejax.train --config $config --workdir $workdir \
      --config.distributed.enabled=True $overrides > ~/gazejax.log 2>&1 &
"
echo "started on all workers of $tpu; follow with:"
echo "  gcloud compute tpus tpu-vm ssh $tpu --zone $zone --worker=0 --command 'tail -f ~/gazejax.log'"
