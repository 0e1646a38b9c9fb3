#!/usr/bin/env bash
# make bench-deploy [BASELINE=REV]: how long deployments take on a fresh Molecule host (the redeploy
# scenario's platform: one systemd container running Moshi with the tiny model, and the bridge).
# Not a test. Prints: site.yml on a fresh host, the idempotent re-run, and redeploy.yml -t bridge to
# healthy. With BASELINE (a git revision), the same three steps run first from a worktree of that
# revision on its own fresh host, then from this tree, and a ratio column compares them (same machine,
# same minutes: these VMs are noisy).
set -euo pipefail
cd "$(dirname "$0")/.."
scenario=redeploy
project=$PWD
baseline=${BASELINE:-}
export ANSIBLE_INJECT_FACT_VARS=False ANSIBLE_PIPELINING=True ANSIBLE_NOCOLOR=1
export ANSIBLE_GATHERING=smart ANSIBLE_CACHE_PLUGIN=memory ANSIBLE_CALLBACKS_ENABLED=profile_tasks  # as in .config/molecule
log=$project/build/bench-deploy.log
mkdir -p build && : >"$log"
STEPS=("site.yml, fresh host" "site.yml, idempotent re-run" "redeploy.yml -t bridge -> healthy")

fresh_host() {  # a new redeploy-host; sets ANSIBLE_CONFIG and inventory
  molecule destroy -s "$scenario" >/dev/null 2>&1
  molecule create -s "$scenario" >/dev/null 2>&1
  molecule prepare -s "$scenario" >/dev/null 2>&1
  local ephemeral
  ephemeral=$(ls -td "$HOME"/.ansible/tmp/molecule.*."$scenario" | head -1)
  export ANSIBLE_CONFIG=$ephemeral/ansible.cfg
  inventory=$ephemeral/inventory/ansible_inventory.yml
}

seconds() {  # seconds COMMAND...: run it (output to the log), print the elapsed seconds
  local start end
  start=$(date +%s.%N)
  "$@" >>"$log" 2>&1 || { echo "FAILED: $* (see $log)" >&2; exit 1; }
  end=$(date +%s.%N)
  echo "$end - $start" | bc
}

moshi_pid() { docker exec redeploy-host systemctl show -p MainPID --value moshi-server; }

bench_tree() {  # bench_tree DIR: the three steps with DIR's playbooks and roles; prints three numbers
  local tree=$1 copy=$project/build/bench-bridge
  export ANSIBLE_ROLES_PATH=$tree/roles ANSIBLE_FILTER_PLUGINS=$tree/plugins/filter
  fresh_host
  local fresh idem redeploy before
  fresh=$(seconds ansible-playbook -i "$inventory" "$tree/site.yml")
  idem=$(seconds ansible-playbook -i "$inventory" "$tree/site.yml")
  grep -E 'redeploy-host +: ok=' "$log" | tail -1 | grep -q 'changed=0 ' \
    || { echo "the re-run from $tree changed something (see $log)" >&2; exit 1; }
  rm -rf "$copy" && cp -r "$tree/bridge" "$copy" && rm -rf "$copy/build"
  echo "# bench $(date +%s.%N)" >>"$copy/src/personaplex_bridge/__init__.py"
  before=$(moshi_pid)
  redeploy=$(seconds ansible-playbook -i "$inventory" "$tree/playbooks/redeploy.yml" \
    -l redeploy-host -t bridge -e "personaplex_bridge_source_dir=$copy")
  [ "$(moshi_pid)" = "$before" ] || { echo "Moshi was restarted by the bridge redeploy ($tree)" >&2; exit 1; }
  echo "$fresh $idem $redeploy"
}

echo "bench-deploy on $(nproc) cores, one host ($scenario scenario), $(date -u +%FT%TZ)"
if [ -n "$baseline" ]; then
  rev=$(git rev-parse --short "$baseline")
  worktree=$project/build/bench-baseline
  git worktree remove --force "$worktree" >/dev/null 2>&1 || rm -rf "$worktree"
  git worktree add --detach "$worktree" "$rev" >/dev/null 2>&1
  read -r -a base <<<"$(bench_tree "$worktree")"
  git worktree remove --force "$worktree"
fi
read -r -a now <<<"$(bench_tree "$project")"
here=$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . ':!build' || echo '+changes')
if [ -n "$baseline" ]; then
  printf '%-36s %12s %18s %7s\n' step "$rev" "$here" ratio
  for i in 0 1 2; do
    printf '%-36s %10.1f s %16.1f s %7.2f\n' "${STEPS[$i]}" "${base[$i]}" "${now[$i]}" \
      "$(echo "${now[$i]} / ${base[$i]}" | bc -l)"
  done
else
  printf '%-36s %16s\n' step "$here"
  for i in 0 1 2; do printf '%-36s %14.1f s\n' "${STEPS[$i]}" "${now[$i]}"; done
fi
echo "Moshi main PID unchanged by every bridge redeploy"
molecule destroy -s "$scenario" >/dev/null 2>&1
