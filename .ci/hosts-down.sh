#!/usr/bin/env bash
# Take down the hosts that .ci/hosts-up.sh DIR made: end every process running inside them (by
# their namespaces, found from the holders' pids in DIR), then the holders, which takes the
# namespaces and the veth ends with them; delete a veth pair left in this namespace by a start
# that failed half-way, and the files hosts-up.sh wrote in DIR. Safe to run twice.
set -uo pipefail

dir=$(realpath -m "${1:?usage: $0 DIR}")
[ -d "$dir" ] || exit 0

stop_pid() {  # stop_pid PID: SIGTERM, up to 5 s, then SIGKILL
    kill "$1" 2>/dev/null || return 0
    for _ in $(seq 50); do
        kill -0 "$1" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -9 "$1" 2>/dev/null
}

holders=()
for pidfile in "$dir"/*.pid; do
    [ -f "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    # Only a holder: a `sleep` whose network namespace differs from ours (a recycled pid would not).
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = sleep ] || continue
    [ "$(readlink "/proc/$pid/ns/net")" != "$(readlink /proc/self/ns/net)" ] || continue
    holders+=("$pid")
done
ended=0
for holder in "${holders[@]}"; do
    netns=$(readlink "/proc/$holder/ns/net") || continue
    for nsfile in /proc/[0-9]*/ns/net; do
        pid=${nsfile#/proc/}; pid=${pid%/ns/net}
        [ "$pid" = "$holder" ] && continue
        [ "$(readlink "$nsfile" 2>/dev/null)" = "$netns" ] || continue
        stop_pid "$pid" & ended=$((ended + 1))
    done
    wait
    stop_pid "$holder"
done
if [ -f "$dir/veth" ]; then
    for end in $(cat "$dir/veth"); do ip link del "$end" 2>/dev/null; done
fi
names=$(cat "$dir/names" 2>/dev/null)
for host in $names; do rm -f "$dir/$host.pid" "$dir/$host.ready"; done
rm -f "$dir/names" "$dir/veth" "$dir/hosts" "$dir/on" "$dir/env" "$dir/mpiexec"
rmdir "$dir" 2>/dev/null
echo "hosts-down: ${#holders[@]} host(s) of $dir taken down, $ended process(es) on them ended"
