#!/bin/bash
# pairs N A B ...: N rounds, each variant's probe once per round, interleaved; lines to /work/sizes/speed.log
n=$1; shift
for i in $(seq $n); do for v in "$@"; do
  cd /work/sizes/serve-$v
  j=$(NOGPU=1 SECS=${SECS:-100} DCL_BIN=$HOME/.cache/dcl-target/release/dcl timeout 300 node probe-cpu.mjs 2>&1 | grep '^{')
  echo "$j" >> /work/sizes/speed.jsonl
  r=$(echo "$j" | python3 -c 'import json,sys; d=json.loads(sys.stdin.read()); print("ips=%.1f step=%s epoch=%s device=%s" % (d["ips"], d["step"], d["epoch"], d["device"]))')
  echo "$(date -u +%H:%M:%S) round=$i $v $r load=$(cut -d' ' -f1 /proc/loadavg)" | tee -a /work/sizes/speed.log
done; done
