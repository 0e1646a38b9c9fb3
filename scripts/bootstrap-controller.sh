#!/usr/bin/env bash
# Set up the controller's Python environment on a fresh Debian 12 / Ubuntu 22.04 / 24.04 machine.
#
#   bootstrap-controller.sh controller VENV
#       apt packages the controller needs (as root), a Python >= 3.11 (Ubuntu 22.04: python3.11 from
#       its universe repository), VENV created or repaired when a failed run left it half-made, and
#       requirements/controller.txt (ansible, molecule, lint tools; no torch).
#   bootstrap-controller.sh torch VENV WHEELHOUSE [PIP-ARGS...]
#       the CPU torch build into VENV, from where plugins/filter/torch_source.py says (the wheelhouse,
#       else PyTorch's CPU index, else exit 3 with what to do; the test and demo hosts use the same
#       decision), then PIP-ARGS (e.g. -r requirements) with the same pip options.
#
# PYTHON=/path/to/python3.X picks the interpreter. Idempotent: a second run installs nothing new.
set -euo pipefail

cd "$(dirname "$0")/.."
MIN_MAJOR=3 MIN_MINOR=11
log() { printf '[bootstrap] %s\n' "$*"; }
die() { printf '[bootstrap] %s\n' "$*" >&2; exit "${2:-1}"; }

# "3.11" when $1 runs and is >= 3.11, else nothing (and status 1).
python_ok() {
  "$1" -c "import sys; v = sys.version_info; print(f'{v[0]}.{v[1]}'); sys.exit(v[:2] < ($MIN_MAJOR, $MIN_MINOR))" 2>/dev/null
}

apt_install() {
  if [[ $(id -u) != 0 ]]; then
    die "missing: $*. Fix: sudo apt-get install -y $*  (or run this as root)"
  fi
  command -v apt-get >/dev/null 2>&1 || die "missing: $*, and this is not a Debian/Ubuntu machine: install them"
  log "apt-get install $*"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# The newest python3.X (X >= 11) the distribution's apt sources offer, if any.
apt_python() {
  command -v apt-cache >/dev/null 2>&1 || return 1
  local minor
  for minor in 13 12 11; do
    # Not a pipe into grep -q: with pipefail, apt-cache's SIGPIPE would read as "no candidate".
    if [[ $(apt-cache policy "python3.$minor-venv" 2>/dev/null) == *"Candidate: "[0-9]* ]]; then
      echo "python3.$minor"
      return 0
    fi
  done
  return 1
}

too_old_fix() {
  local found=$1 id="" version=""
  if [[ -r /etc/os-release ]]; then
    id=$(. /etc/os-release && echo "${ID:-}") version=$(. /etc/os-release && echo "${VERSION_ID:-}")
  fi
  local fix="install Python >= $MIN_MAJOR.$MIN_MINOR and run again with PYTHON=/path/to/python3.X"
  if [[ $id == ubuntu && $version == 22.04 ]]; then
    fix="apt-get install -y python3.11 python3.11-venv (as root; Ubuntu's universe component), then run again"
  fi
  die "Python >= $MIN_MAJOR.$MIN_MINOR is needed (ansible 12.x), found $found. Fix: $fix"
}

choose_python() {
  local candidate version
  if [[ -n ${PYTHON:-} ]]; then
    command -v "$PYTHON" >/dev/null 2>&1 || die "PYTHON=$PYTHON is not a command"
    version=$(python_ok "$PYTHON") || too_old_fix "$PYTHON $("$PYTHON" -c 'import platform; print(platform.python_version())' 2>/dev/null || echo '(does not run)')"
    echo "$PYTHON"
    return
  fi
  for candidate in python3 python3.13 python3.12 python3.11; do
    if command -v "$candidate" >/dev/null 2>&1 && python_ok "$candidate" >/dev/null; then
      echo "$candidate"
      return
    fi
  done
  # Too old or none at all: the distribution's own newer Python, when its sources have one.
  if [[ $(id -u) == 0 ]] && ! apt_python >/dev/null && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq >&2
  fi
  if candidate=$(apt_python) && [[ $(id -u) == 0 ]]; then
    apt_install "$candidate" "$candidate-venv" >&2
    if python_ok "$candidate" >/dev/null; then
      echo "$candidate"
      return
    fi
  fi
  too_old_fix "python3 $(python3 -c 'import platform; print(platform.python_version())' 2>/dev/null || echo '(none)')"
}

# Why VENV cannot be used as it is (empty when it can).
venv_problem() {
  local venv=$1
  [[ -e $venv ]] || { echo absent; return; }
  [[ -x $venv/bin/python ]] || { echo "it has no bin/python"; return; }
  python_ok "$venv/bin/python" >/dev/null || { echo "its Python does not run or is older than $MIN_MAJOR.$MIN_MINOR"; return; }
  "$venv/bin/python" -m pip --version >/dev/null 2>&1 || { echo "it has no pip (python3 -m venv failed half-way)"; return; }
}

controller() {
  local venv=$1 missing=() python problem venv_bin
  # The Makefile puts VENV/bin first on PATH: its python3 is not a base to build VENV from.
  venv_bin=$(realpath -m "$venv/bin")
  PATH=$(tr ':' '\n' <<<"$PATH" | grep -vxF -e "$venv_bin" -e "$venv/bin" | paste -sd: -)
  python=$(choose_python)
  python=$(command -v "$python")
  "$python" -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=("$(basename "$python")-venv")
  command -v ssh >/dev/null 2>&1 || missing+=(openssh-client)
  [[ -e /etc/ssl/certs/ca-certificates.crt ]] || missing+=(ca-certificates)
  if ((${#missing[@]})); then
    apt_install "${missing[@]}"
  fi
  log "Python: $(command -v "$python") $("$python" -c 'import platform; print(platform.python_version())')"

  problem=$(venv_problem "$venv")
  if [[ -n $problem && $problem != absent ]]; then
    log "repairing $venv: $problem; making it again"
    rm -rf "$venv"
  fi
  if [[ -n $problem ]]; then
    log "creating $venv"
    if ! "$python" -m venv "$venv"; then
      rm -rf "$venv"
      die "$python -m venv failed. Fix: apt-get install -y $(basename "$python")-venv, then run again"
    fi
  fi
  "$venv/bin/python" -m pip install -q --upgrade pip
  log "installing requirements/controller.txt (ansible, molecule, lint tools)"
  "$venv/bin/python" -m pip install -q -r requirements/controller.txt
  log "controller tooling ready: $("$venv/bin/ansible" --version | head -n 1)"
}

torch() {
  local venv=$1 wheelhouse=$2
  shift 2
  [[ -z $(venv_problem "$venv") ]] || die "$venv is not ready: run make controller first"
  local TORCH_ORIGIN TORCH_SPEC TORCH_INDEX_URL TORCH_PIP_ARGS TORCH_REASON decision
  # Exit status 3 and the what-to-do text on stderr when no source works.
  decision=$("$venv/bin/python" plugins/filter/torch_source.py --wheelhouse "$wheelhouse" --format shell) || exit $?
  eval "$decision"
  log "torch: $TORCH_SPEC from $TORCH_ORIGIN ($TORCH_REASON)"
  local -a pip_args index_args=()
  read -r -a pip_args <<<"$TORCH_PIP_ARGS"
  [[ -z $TORCH_INDEX_URL ]] || index_args=(--index-url "$TORCH_INDEX_URL")
  "$venv/bin/python" -m pip install -q "$TORCH_SPEC" "${index_args[@]}" "${pip_args[@]}"
  if (($#)); then
    "$venv/bin/python" -m pip install -q "${pip_args[@]}" "$@"
  fi
}

case ${1:-} in
  controller) (($# == 2)) || die "usage: $0 controller VENV" 2; controller "$2" ;;
  torch) (($# >= 3)) || die "usage: $0 torch VENV WHEELHOUSE [PIP-ARGS...]" 2; shift; torch "$@" ;;
  *) die "usage: $0 controller VENV | torch VENV WHEELHOUSE [PIP-ARGS...]" 2 ;;
esac
