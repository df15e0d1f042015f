#!/usr/bin/env bash
# Run a queue of long experiments one after another, each from a snapshot of the commit it names, so that
# later commits cannot touch a run in progress; a run resumes from its checkpoints when started again.
#
#   nohup tools/run_queue.sh tools/queues/seven_methods.txt ~/runs/smollm2 > ~/runs/smollm2/queue.out 2>&1 &
#
# A queue line: <name>|<commit>|<workdir>|<extra main.py args> (lines starting with # are skipped; workdirs
# relative to the runs directory; {runs} in the arguments stands for it). The config is
# configs/smollm2_standard.py unless the arguments begin with --config=<file>. The file is read again after
# each job, so lines may be appended while it runs. A finished job leaves <runs>/done/<name>; its output goes
# to <runs>/logs/<name>.log. A job that fails (or is stopped: exit 75 after SIGTERM) is left undone and the
# queue stops, so a rerun retries it.
set -u
queue="$(realpath "$1")"
runs="$(realpath -m "$2")"
repo="$(cd "$(dirname "$0")/.." && pwd)"
export KIF_DATA_DIR="${KIF_DATA_DIR:-$(dirname "$repo")/shared/cl_benchmark}"
export KIF_SUPERNI_DIR="${KIF_SUPERNI_DIR:-$(dirname "$repo")/shared/superni_benchmark}"
mkdir -p "$runs/done" "$runs/logs" "$runs/code"
cd "$runs"
while true; do
  job=""
  while IFS='|' read -r name commit workdir args; do
    case "$name" in ""|\#*) continue;; esac
    [ -e "done/$name" ] || { job="$name|$commit|$workdir|$args"; break; }
  done < "$queue"
  [ -z "$job" ] && { echo "$(date -u +%FT%T) queue done"; exit 0; }
  IFS='|' read -r name commit workdir args <<< "$job"
  args="${args//\{runs\}/$runs}"
  config=configs/smollm2_standard.py
  if [[ "$args" == --config=* ]]; then
    config="${args%% *}" && config="${config#--config=}"
    [[ "$args" == *" "* ]] && args="${args#* }" || args=""
  fi
  code="$runs/code/$commit"
  if [ ! -d "$code" ]; then
    mkdir -p "$code.tmp" && git -C "$repo" archive "$commit" | tar -x -C "$code.tmp" && mv "$code.tmp" "$code" || exit 2
  fi
  echo "$(date -u +%FT%T) start $name (commit $commit, $config, $workdir, $args)"
  # shellcheck disable=SC2086  # the extra arguments are words
  (cd "$code" && python main.py --config="$config" --workdir="$runs/$workdir" $args) \
    >> "logs/$name.log" 2>&1
  rc=$?
  echo "$(date -u +%FT%T) end $name rc=$rc"
  [ $rc -eq 0 ] || exit $rc
  touch "done/$name"
done
