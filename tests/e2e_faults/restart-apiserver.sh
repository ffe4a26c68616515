#!/usr/bin/env bash
# Stops the k8s harness's kube-apiserver (the PID in $K8S_HARNESS_HOME/run/kube-apiserver.pid,
# only if that PID still runs kube-apiserver), keeps it down for DOWN_SECONDS (default 10), and
# starts it again with exactly the arguments it had, the same log file and pid file, then waits
# for /readyz. Used by tests/e2e_faults.rs (api_server_restart); nothing else of the harness is
# touched. Prints the outage it caused.
set -euo pipefail
RUN=${K8S_HARNESS_HOME:-$HOME/k8s-harness}/run
DOWN_SECONDS=${DOWN_SECONDS:-10}
pid=$(cat "$RUN/kube-apiserver.pid")
[[ -r /proc/$pid/cmdline ]] || { echo "restart-apiserver: pid $pid is not running" >&2; exit 1; }
mapfile -d '' args < "/proc/$pid/cmdline"
[[ "${args[0]}" == *kube-apiserver ]] || { echo "restart-apiserver: pid $pid runs ${args[0]}, not kube-apiserver" >&2; exit 1; }
t0=$(date +%s.%N)
kill -TERM "$pid"
for _ in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid"; sleep 0.5; fi
t_down=$(date +%s.%N)
sleep "$DOWN_SECONDS"
nohup "${args[@]}" >>"$RUN/kube-apiserver.log" 2>&1 </dev/null &
echo $! > "$RUN/kube-apiserver.pid"
ca=$(dirname "$RUN")/pki/ca.crt
for _ in $(seq 1 600); do
  if curl -sf --cacert "$ca" https://127.0.0.1:6443/readyz >/dev/null 2>&1; then
    t_up=$(date +%s.%N)
    awk -v a="$t0" -v b="$t_down" -v c="$t_up" 'BEGIN{printf "restart-apiserver: stopped in %.1fs, down %.1fs in all, ready again\n", b-a, c-a}'
    exit 0
  fi
  kill -0 "$(cat "$RUN/kube-apiserver.pid")" || { echo "restart-apiserver: kube-apiserver exited; see $RUN/kube-apiserver.log" >&2; exit 1; }
  sleep 0.2
done
echo "restart-apiserver: not ready after 120s" >&2
exit 1
