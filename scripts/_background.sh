# shellcheck shell=bash
# Helpers for scripts/kafka and scripts/mosquitto (sourced, not run): a server process
# started in the background with a pid file, probed until it answers, and stopped or
# killed by that pid file. Callers set NAME (for messages) and PATTERN (a string of
# the server's command line, so a recycled pid is never taken for the server).

die() { echo "scripts/$NAME: $*" >&2; exit 1; }

# running_pid PIDFILE: the server's pid if it runs (a zombie counts as gone), else "".
running_pid() {
  local pid state
  [ -f "$1" ] || return 0
  pid="$(cat "$1")"
  [ -n "$pid" ] && [ -r "/proc/$pid/stat" ] || return 0
  state="$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null || true)"
  if [ -n "$state" ] && [ "$state" != Z ] && grep -qaF -- "$PATTERN" "/proc/$pid/cmdline"; then
    echo "$pid"
  fi
  return 0
}

# launch PIDFILE LOGFILE COMMAND...: run COMMAND in its own session, in the background.
# The child writes its own pid before it execs, so the pid file names the server
# whether or not setsid had to fork; launch returns once the pid file exists.
launch() {
  local pidfile="$1" log="$2"
  shift 2
  rm -f "$pidfile"
  # shellcheck disable=SC2016  # $$, $1 and $@ are the inner shell's, on purpose
  setsid bash -c 'echo $$ >"$1.tmp" && mv "$1.tmp" "$1"; shift; exec "$@"' _ "$pidfile" "$@" \
    >>"$log" 2>&1 </dev/null &
  local tries=0
  until [ -s "$pidfile" ]; do
    tries=$((tries + 1))
    [ "$tries" -le 200 ] || fail_start "no pid file $pidfile after 10 s: is its directory writable?"
    sleep 0.05
  done
}

# wait_ready PIDFILE TIMEOUT_S WHAT PROBE...: run PROBE until it succeeds; fail (with
# the logs in LOGS) if the server exits or TIMEOUT_S passes first.
wait_ready() {
  local pidfile="$1" timeout_s="$2" what="$3" t0=$SECONDS
  shift 3
  until "$@"; do
    [ -n "$(running_pid "$pidfile")" ] || fail_start "$what exited during startup"
    [ $((SECONDS - t0)) -lt "$timeout_s" ] \
      || fail_start "$what did not answer within ${timeout_s} s"
    sleep 0.2
  done
}

# fail_start MESSAGE: print MESSAGE and the last lines of each log in LOGS, then exit 1.
fail_start() {
  echo "scripts/$NAME: $1" >&2
  local log
  for log in "${LOGS[@]}"; do
    if [ -s "$log" ]; then
      echo "--- last lines of $log:" >&2
      tail -n 40 "$log" >&2
    fi
  done
  exit 1
}

# signal_wait PIDFILE SIG BOUND_S: send SIG to the server, wait up to BOUND_S for its end.
signal_wait() {
  local pidfile="$1" sig="$2" bound_s="$3" pid t0=$SECONDS
  pid="$(running_pid "$pidfile")"
  [ -n "$pid" ] || return 0
  kill "-$sig" "$pid" 2>/dev/null || true
  while [ -n "$(running_pid "$pidfile")" ]; do
    [ $((SECONDS - t0)) -lt "$bound_s" ] || return 1
    sleep 0.05
  done
}

# stop_server PIDFILE: SIGTERM (the server saves its state), SIGKILL after 30 s.
stop_server() {
  if ! signal_wait "$1" TERM 30; then
    echo "scripts/$NAME: pid $(cat "$1") ignored SIGTERM for 30 s; sending SIGKILL" >&2
    signal_wait "$1" KILL 10 || die "pid $(cat "$1") survived SIGKILL"
  fi
  rm -f "$1"
}

# kill_server PIDFILE: SIGKILL, as a crash would; returns once the process is gone.
kill_server() {
  signal_wait "$1" KILL 10 || die "pid $(cat "$1") survived SIGKILL"
  rm -f "$1"
}
