#!/usr/bin/env bash
# make bench-deploy: how long deployments take on a fresh Molecule host (the redeploy scenario's
# platform, one systemd container running Moshi with the tiny model and the bridge). Not a test.
# Prints: site.yml on a fresh host, the idempotent re-run, and redeploy.yml -t bridge to healthy.
set -euo pipefail
cd "$(dirname "$0")/.."
scenario=redeploy
project=$PWD
export ANSIBLE_ROLES_PATH=$project/roles ANSIBLE_FILTER_PLUGINS=$project/plugins/filter
export ANSIBLE_INJECT_FACT_VARS=False ANSIBLE_PIPELINING=True ANSIBLE_NOCOLOR=1
export ANSIBLE_GATHERING=smart ANSIBLE_CACHE_PLUGIN=memory ANSIBLE_CALLBACKS_ENABLED=profile_tasks  # as in .config/molecule

molecule destroy -s "$scenario" >/dev/null 2>&1
molecule create -s "$scenario" >/dev/null 2>&1
molecule prepare -s "$scenario" >/dev/null 2>&1
ephemeral=$(ls -td "$HOME"/.ansible/tmp/molecule.*."$scenario" | head -1)
export ANSIBLE_CONFIG=$ephemeral/ansible.cfg
inventory=$ephemeral/inventory/ansible_inventory.yml
log=$project/build/bench-deploy.log
mkdir -p build && : >"$log"

timed() {  # timed LABEL COMMAND...: run, log, print seconds
  local start end
  start=$(date +%s.%N)
  "${@:2}" >>"$log" 2>&1 || { echo "$1 FAILED (see $log)"; exit 1; }
  end=$(date +%s.%N)
  printf '%-44s %6.1f s\n' "$1" "$(echo "$end - $start" | bc)"
}
moshi_pid() { docker exec redeploy-host systemctl show -p MainPID --value moshi-server; }

echo "bench-deploy on $(nproc) cores, one host ($scenario scenario), $(date -u +%FT%TZ)"
timed "site.yml, fresh host" ansible-playbook -i "$inventory" site.yml
timed "site.yml, idempotent re-run" ansible-playbook -i "$inventory" site.yml
grep -E 'redeploy-host +: ok=' "$log" | tail -1 | grep -q 'changed=0 ' || { echo "the re-run changed something (see $log)"; exit 1; }
rm -rf build/bench-bridge && cp -r bridge build/bench-bridge && rm -rf build/bench-bridge/build
echo "# bench $(date +%s)" >>build/bench-bridge/src/personaplex_bridge/__init__.py
before=$(moshi_pid)
timed "redeploy.yml -t bridge, changed bridge -> healthy" ansible-playbook -i "$inventory" playbooks/redeploy.yml \
  -l redeploy-host -t bridge -e "personaplex_bridge_source_dir=$project/build/bench-bridge"
[ "$(moshi_pid)" = "$before" ] && echo "Moshi main PID unchanged ($before)" || echo "Moshi was restarted!"
molecule destroy -s "$scenario" >/dev/null 2>&1
