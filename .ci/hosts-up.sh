#!/usr/bin/env bash
# Two emulated hosts on this machine: each a network + UTS + mount namespace with its own
# hostname, its own loopback and one end of a veth pair, optionally shaped to a rate.
#
#   .ci/hosts-up.sh DIR                    # hostA 10.199.0.1 <-> hostB 10.199.0.2, unshaped
#   .ci/hosts-up.sh DIR 1gbit              # the same, each direction shaped to 1 Gbit/s (tbf); again to change the rate
#   DIR/on hostB ip -s link                # a command on one host (what `ssh hostB CMD` would do)
#   DIR/mpiexec -hosts hostA:2,hostB:2 -n 4 python -m mpitrain train ...    # an MPI job on both hosts
#   .ci/hosts-down.sh DIR                  # ends everything that runs on the hosts, and the hosts
#
# Why namespaces and not containers: only the network stack and the hostname differ, so the
# file system, the Python environment and /dev/shm stay shared, as on nodes with a shared home.
# Each host's /etc/hosts (a bind mount inside its own mount namespace) names both hosts; the
# machine's own /etc/hosts is not touched. The veth link is the only way between the hosts, so
# inter-host MPI traffic is TCP over it (counted by `DIR/on hostB ip -s link show mpt0`).
#
# MPI: DIR/mpiexec runs MPICH's mpiexec on the first host with Hydra's ssh launcher pointed at
# DIR/on, which starts each proxy inside the named host; DIR/env exports FI_TCP_IFACE=mpt0 and
# FI_PROVIDER=tcp so libfabric uses the veth (the only other interface in a host is loopback).
#
# Knobs: MPITRAIN_HOSTS ("hostA hostB"), MPITRAIN_HOSTS_SUBNET (10.199.0; the hosts get .1 and .2),
# MPITRAIN_HOSTS_TTL (7200: seconds after which a host that was never taken down ends by itself),
# MPITRAIN_HOSTS_CPUS (unset: both hosts share every core; "0 1": each host's processes run on its
# own cores, a taskset list per host, so a host has the cores a real node of its own would have).
# Idempotent: on a DIR whose hosts are up it only applies the rate. Needs root.
set -euo pipefail

dir=$(realpath -m "${1:?usage: $0 DIR [RATE, e.g. 1gbit; none or empty: unshaped]}")
rate=${2:-}
read -r -a hosts <<<"${MPITRAIN_HOSTS:-hostA hostB}"
subnet=${MPITRAIN_HOSTS_SUBNET:-10.199.0}
ttl=${MPITRAIN_HOSTS_TTL:-7200}
read -r -a cpus <<<"${MPITRAIN_HOSTS_CPUS:-}"
[ "${#cpus[@]}" -eq 0 ] || [ "${#cpus[@]}" -eq 2 ] || { echo "hosts-up: MPITRAIN_HOSTS_CPUS must give two CPU lists" >&2; exit 2; }
iface=mpt0
repo=$(cd "$(dirname "$0")/.." && pwd)
[ "${#hosts[@]}" -eq 2 ] || { echo "hosts-up: MPITRAIN_HOSTS must name two hosts" >&2; exit 2; }

alive() { [ -f "$dir/$1.pid" ] && kill -0 "$(cat "$dir/$1.pid")" 2>/dev/null; }
on() { nsenter --target "$(cat "$dir/$1.pid")" --uts --net --mount -- "${@:2}"; }

shape() {  # shape HOST: tbf at RATE on the host's end of the link, or no qdisc of ours
    if [ -z "$rate" ] || [ "$rate" = none ]; then
        on "$1" tc qdisc del dev "$iface" root 2>/dev/null || true
        return
    fi
    # burst: at least one GSO super-packet (64 KiB) and about 2 ms at the rate, or tbf drops and
    # the rate is not reached.
    local bits
    bits=$(awk -v r="$rate" 'BEGIN {
        n = r + 0; u = tolower(substr(r, length(n "") + 1, 1))
        printf "%d", n * (u == "k" ? 1e3 : u == "m" ? 1e6 : u == "g" ? 1e9 : 1) }')
    local burst=$(( bits / 8 / 500 > 131072 ? bits / 8 / 500 : 131072 ))
    on "$1" tc qdisc replace dev "$iface" root tbf rate "$rate" burst "$burst" latency 20ms
}

if alive "${hosts[0]}" && alive "${hosts[1]}"; then
    shape "${hosts[0]}"; shape "${hosts[1]}"
    echo "hosts-up: ${hosts[*]} already up in $dir; link ${rate:-unshaped} (CPUs as when they were made)"
    exit 0
fi
"$repo/.ci/hosts-down.sh" "$dir" >/dev/null 2>&1 || true

started=$(date +%s.%N)
mkdir -p "$dir"
cleanup_on_failure() { [ $? -eq 0 ] || "$repo/.ci/hosts-down.sh" "$dir" >&2 || true; }
trap cleanup_on_failure EXIT

{
    echo "127.0.0.1 localhost"
    echo "$subnet.1 ${hosts[0]}"
    echo "$subnet.2 ${hosts[1]}"
} >"$dir/hosts"
echo "${hosts[*]}" >"$dir/names"
rm -f "$dir"/*.cpus
if [ "${#cpus[@]}" -eq 2 ]; then
    echo "${cpus[0]}" >"$dir/${hosts[0]}.cpus"
    echo "${cpus[1]}" >"$dir/${hosts[1]}.cpus"
fi

for i in 0 1; do
    host=${hosts[$i]}
    rm -f "$dir/$host.ready"
    # The holder keeps the namespaces alive: it sets the hostname, mounts the hosts file over
    # /etc/hosts in its own mount namespace, says it is ready and sleeps (at most ttl seconds).
    setsid unshare --uts --net --mount --propagation private -- sh -c '
        echo $$ >"$1/$2.pid"; hostname "$2"; mount --bind "$1/hosts" /etc/hosts; ip link set lo up
        touch "$1/$2.ready"; exec sleep "$3"' holder "$dir" "$host" "$ttl" </dev/null >/dev/null 2>&1 &
done
for _ in $(seq 100); do
    [ -f "$dir/${hosts[0]}.ready" ] && [ -f "$dir/${hosts[1]}.ready" ] && break
    sleep 0.05
done
alive "${hosts[0]}" && alive "${hosts[1]}" || { echo "hosts-up: the namespaces did not start" >&2; exit 1; }

# The veth pair is made in the root namespace under names unique to this run, then each end
# moves into its host and takes the name mpt0 there.
ends=("mptA$$" "mptB$$")
echo "${ends[*]}" >"$dir/veth"
ip link add "${ends[0]}" type veth peer name "${ends[1]}"
for i in 0 1; do
    host=${hosts[$i]}
    ip link set "${ends[$i]}" netns "$(cat "$dir/$host.pid")"
    on "$host" ip link set "${ends[$i]}" name "$iface"
    on "$host" ip addr add "$subnet.$((i + 1))/24" dev "$iface"
    on "$host" ip link set "$iface" up
    shape "$host"
done
rm -f "$dir/veth"  # both ends now live and die with their namespaces

cat >"$dir/on" <<EOF
#!/bin/sh
# $dir/on [-x] HOST COMMAND...: run COMMAND (joined and run by sh, as ssh does) on HOST,
# in the caller's working folder. Hydra's ssh launcher calls it with -x.
[ "\$1" = -x ] && shift
host=\$1; shift
pid=\$(cat "$dir/\$host.pid" 2>/dev/null) || { echo "on: no host \$host in $dir" >&2; exit 255; }
pin=""
[ -f "$dir/\$host.cpus" ] && pin="taskset -c \$(cat "$dir/\$host.cpus")"
exec \$pin nsenter --target "\$pid" --uts --net --mount -- sh -c "cd '\$PWD' 2>/dev/null; \$*"
EOF
cat >"$dir/env" <<EOF
export MPITRAIN_HOSTS_DIR=$dir
export MPIR_CVAR_CH4_NETMOD=ofi
export FI_PROVIDER=tcp
export FI_TCP_IFACE=$iface
EOF
cat >"$dir/mpiexec" <<EOF
#!/bin/sh
# $dir/mpiexec ARGS: MPICH's mpiexec run on ${hosts[0]}, its proxies started on the hosts by $dir/on.
. "$dir/env"
mpiexec=\$(command -v mpiexec)
pid=\$(cat "$dir/${hosts[0]}.pid") || exit 255
pin=""  # the proxy of ${hosts[0]} may be started by mpiexec itself, not through $dir/on
[ -f "$dir/${hosts[0]}.cpus" ] && pin="taskset -c \$(cat "$dir/${hosts[0]}.cpus")"
exec \$pin nsenter --target "\$pid" --uts --net --mount --wd="\$PWD" -- "\$mpiexec" -launcher ssh -launcher-exec "$dir/on" "\$@"
EOF
chmod +x "$dir/on" "$dir/mpiexec"

for _ in $(seq 100); do  # the link is up once both ends are (LOWER_UP)
    on "${hosts[0]}" ip link show "$iface" | grep -q LOWER_UP && on "${hosts[1]}" ip link show "$iface" | grep -q LOWER_UP && break
    sleep 0.05
done
on "${hosts[0]}" ip link show "$iface" | grep -q LOWER_UP || { echo "hosts-up: the link did not come up" >&2; exit 1; }
echo "hosts-up: ${hosts[0]} ($subnet.1) <-> ${hosts[1]} ($subnet.2) over $iface, link ${rate:-unshaped}," \
    "$(awk -v a="$started" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }') s; run with $dir/mpiexec, $dir/on"
